/*
 * Threads x sessions sharing one model, its adapters and a hypernetwork give results
 * bit-identical to a serial run. Eight jobs (adapter sets in both apply modes, one identity
 * per image, a UNet evaluation, a hypernetwork prediction used at once) first run one after
 * the other on the main thread; then 6 threads, each with its own sessions, run every job
 * three times in a different order (with HDB_TEST_QUICK set, as under valgrind, two jobs
 * once). Every output must equal the serial one byte for byte.
 * The model, adapters and hypernetwork are `const` objects shared by all threads (the header's
 * threading rule); each session stays on its thread. The same program is the ThreadSanitizer
 * run's workload (scripts/tsan.sh).
 */
#include "common.h"

enum { THREADS = 6, JOBS = 8, W = 64, H = 64, IMG = W * H * 3 };
/* Rounds per thread and jobs per round: 3 x all 8, or 1 x 2 under valgrind (which runs one
 * thread at a time, ~50x slower; there the point is memory errors, not breadth). */
static int g_rounds = 3, g_jobs_per_round = JOBS;
enum { UB = 2, UC = 4, UH = 16, UW = 16, UL = 77, UCTX = 16, UNET_OUT = UB * UC * UH * UW };

static hdb_model *g_model;
static hdb_adapter *g_id1, *g_id2;
static hdb_hypernet *g_net;
static uint8_t g_face[40 * 40 * 3];
static float g_sample[UNET_OUT], g_ctx[UB * UL * UCTX]; /* written once, before any thread */

/* One job's output: two images, or a UNet output, or a predicted adapter's first image. */
typedef struct {
    uint8_t img[2][IMG];
    float unet[UNET_OUT];
} result;

static result g_serial[JOBS];

static hdb_status generate2(hdb_session *s, uint64_t seed, result *r) {
    hdb_generate_params p = hdb_generate_params_default();
    p.prompt = "a photo of sks person";
    p.steps = 2;
    p.width = W;
    p.height = H;
    p.batch = 2;
    p.seed = seed;
    p.sampler = HDB_SAMPLER_EULER_A;
    hdb_image out[2] = {{.data = r->img[0], .data_len = IMG}, {.data = r->img[1], .data_len = IMG}};
    return hdb_generate(s, &p, out, 2);
}

/* Runs job `j` on a fresh session of this thread; returns false on any failure. */
static bool run_job(int j, result *r) {
    memset(r, 0, sizeof *r);
    hdb_session *s = NULL;
    if (hdb_session_new(g_model, NULL, &s) != HDB_STATUS_OK) return false;
    const hdb_adapter *both[2] = {g_id1, g_id2};
    const float scales[2] = {0.8f, 0.6f};
    hdb_status st = HDB_STATUS_OK;
    switch (j) {
    case 0: /* no adapters */
        st = generate2(s, 1, r);
        break;
    case 1: /* id1, merged */
        st = hdb_session_set_adapters(s, both, NULL, 1, HDB_APPLY_MERGE);
        if (st == HDB_STATUS_OK) st = generate2(s, 2, r);
        break;
    case 2: /* id1 x 0.8 + id2 x 0.6, merged */
        st = hdb_session_set_adapters(s, both, scales, 2, HDB_APPLY_MERGE);
        if (st == HDB_STATUS_OK) st = generate2(s, 3, r);
        break;
    case 3: /* both at run time */
        st = hdb_session_set_adapters(s, both, scales, 2, HDB_APPLY_RUNTIME);
        if (st == HDB_STATUS_OK) st = generate2(s, 4, r);
        break;
    case 4: { /* one identity per image */
        int32_t idx[2] = {1, 0};
        st = hdb_session_set_adapters(s, both, NULL, 2, HDB_APPLY_RUNTIME);
        if (st == HDB_STATUS_OK) st = hdb_session_set_sample_adapters(s, idx, 2);
        if (st == HDB_STATUS_OK) st = generate2(s, 5, r);
        break;
    }
    case 5: { /* one UNet evaluation with id2 merged (inputs shared read-only by all threads) */
        const float t[UB] = {981.0f, 1.0f};
        st = hdb_session_set_adapters(s, both + 1, NULL, 1, HDB_APPLY_MERGE);
        if (st == HDB_STATUS_OK)
            st = hdb_session_unet(s, g_sample, UNET_OUT, t, UB, g_ctx, UB * UL * UCTX, UB, UH, UW, UL, r->unet,
                                  UNET_OUT);
        break;
    }
    case 6: { /* predict an identity from the face, use it at once */
        hdb_image face = {.data = g_face, .data_len = sizeof g_face, .width = 40, .height = 40, .format = HDB_PIXEL_RGB8};
        hdb_adapter *a = NULL;
        st = hdb_hypernet_predict(g_net, g_model, &face, NULL, &a);
        const hdb_adapter *set[1] = {a};
        if (st == HDB_STATUS_OK) st = hdb_session_set_adapters(s, set, NULL, 1, HDB_APPLY_MERGE);
        hdb_adapter_free(a); /* the session keeps what it needs */
        if (st == HDB_STATUS_OK) st = generate2(s, 7, r);
        break;
    }
    case 7: /* swaps on one session: id1, id2 runtime, empty set, then generate */
        st = hdb_session_set_adapters(s, both, NULL, 1, HDB_APPLY_MERGE);
        if (st == HDB_STATUS_OK) st = hdb_session_set_adapters(s, both + 1, NULL, 1, HDB_APPLY_RUNTIME);
        if (st == HDB_STATUS_OK) st = hdb_session_set_adapters(s, NULL, NULL, 0, HDB_APPLY_MERGE);
        if (st == HDB_STATUS_OK) st = generate2(s, 1, r); /* job 0's seed: must equal it */
        break;
    }
    hdb_session_free(s);
    if (st != HDB_STATUS_OK) fprintf(stderr, "job %d: %s: %s\n", j, hdb_status_name(st), hdb_last_error_message());
    return st == HDB_STATUS_OK;
}

typedef struct {
    int id;
    int mismatches;
    int failures;
    result r; /* per thread: large, kept off the stack */
} worker;

static void *work(void *arg) {
    worker *w = arg;
    for (int round = 0; round < g_rounds; round++) {
        for (int k = 0; k < g_jobs_per_round; k++) {
            int j = (k * 3 + w->id + round * 5) % JOBS; /* every thread its own order */
            if (!run_job(j, &w->r)) {
                w->failures++;
                continue;
            }
            if (memcmp(&w->r, &g_serial[j], sizeof w->r) != 0) {
                fprintf(stderr, "thread %d round %d: job %d differs from the serial run\n", w->id, round, j);
                w->mismatches++;
            }
        }
    }
    return NULL;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work_dir;
    parse_args(argc, argv, &fixtures, &work_dir);
    char dir[4096], id1[4096], id2[4096], net[4096];
    path_join(dir, sizeof dir, fixtures, "tiny-sd");
    path_join(id1, sizeof id1, fixtures, "adapter/id1.lidb.safetensors");
    path_join(id2, sizeof id2, fixtures, "adapter/id2.peft.safetensors");
    path_join(net, sizeof net, fixtures, "hypernet/tiny.hypernet.safetensors");
    if (getenv("HDB_TEST_QUICK") != NULL) g_rounds = 1, g_jobs_per_round = 2;
    for (size_t i = 0; i < sizeof g_face; i++) g_face[i] = (uint8_t)((i * 31) % 251);
    for (int i = 0; i < UNET_OUT; i++) g_sample[i] = (float)((i * 7919) % 200) / 100.0f - 1.0f;
    for (int i = 0; i < UB * UL * UCTX; i++) g_ctx[i] = (float)((i * 104729) % 200) / 100.0f - 1.0f;

    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    rp.num_threads = 2;
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "runtime (cpu, 2 threads)");
    CHECK_STATUS(hdb_model_load(rt, dir, NULL, &g_model), HDB_STATUS_OK, "model");
    CHECK_STATUS(hdb_adapter_load(g_model, id1, &g_id1), HDB_STATUS_OK, "id1 (LiDB)");
    CHECK_STATUS(hdb_adapter_load(g_model, id2, &g_id2), HDB_STATUS_OK, "id2 (PEFT LoRA)");
    CHECK_STATUS(hdb_hypernet_load(rt, net, &g_net), HDB_STATUS_OK, "hypernetwork");

    for (int j = 0; j < JOBS; j++) CHECK(run_job(j, &g_serial[j]), "serial job %d", j);
    CHECK(memcmp(g_serial[0].img, g_serial[7].img, sizeof g_serial[0].img) == 0,
          "an emptied adapter set gives the pristine model's images");
    CHECK(memcmp(g_serial[0].img, g_serial[1].img, sizeof g_serial[0].img) != 0 &&
              memcmp(g_serial[3].img, g_serial[4].img, sizeof g_serial[3].img) != 0,
          "the jobs differ from each other (adapters change the images)");

    static worker w[THREADS];
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i].id = i;
        CHECK(pthread_create(&t[i], NULL, work, &w[i]) == 0, "start thread %d", i);
    }
    int mismatches = 0, failures = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        mismatches += w[i].mismatches;
        failures += w[i].failures;
    }
    CHECK(failures == 0, "%d threads x %d rounds x %d jobs: no call failed (%d did)", THREADS, g_rounds,
          g_jobs_per_round, failures);
    CHECK(mismatches == 0, "every threaded result is bit-identical to the serial one (%d differ)", mismatches);

    hdb_hypernet_free(g_net);
    hdb_adapter_free(g_id1);
    hdb_adapter_free(g_id2);
    hdb_model_free(g_model);
    hdb_runtime_free(rt);
    return test_done("threads");
}
