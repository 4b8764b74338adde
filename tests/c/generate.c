/*
 * hdb_generate on the tiny SD fixture: defaults, RGB8 output with a caller stride, seeded
 * reproducibility, per-image identities, a progress callback that cancels, progress for every
 * stage (progress_stages), and bad arguments.
 * Parity with diffusers is tested in tests/pipeline.rs.
 */
#include "common.h"

#include <math.h>

enum { W = 64, H = 64 };

typedef struct {
    int calls;
    int cancel_at;
} progress_ctx;

static bool on_progress(void *ud, uint64_t done, uint64_t total, const char *stage) {
    progress_ctx *p = ud;
    p->calls++;
    if (done > total || strcmp(stage, "denoise") != 0) return false;
    return p->cancel_at == 0 || p->calls < p->cancel_at;
}

/* Records every (stage, done, total) as "stage done/total," and cancels at `cancel_stage`
 * (when set) once it starts. */
typedef struct {
    char log[1024];
    const char *cancel_stage;
} stages_ctx;

static bool on_stage(void *ud, uint64_t done, uint64_t total, const char *stage) {
    stages_ctx *c = ud;
    size_t n = strlen(c->log);
    snprintf(c->log + n, sizeof c->log - n, "%s %u/%u,", stage, (unsigned)done, (unsigned)total);
    return c->cancel_stage == NULL || strcmp(stage, c->cancel_stage) != 0;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char dir[4096], id1[4096];
    path_join(dir, sizeof dir, fixtures, "tiny-sd");
    path_join(id1, sizeof id1, fixtures, "adapter/id1.lidb.safetensors");

    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(NULL, &rt), HDB_STATUS_OK, "runtime");
    hdb_model *model = NULL;
    CHECK_STATUS(hdb_model_load(rt, dir, NULL, &model), HDB_STATUS_OK, "model");
    hdb_session *s = NULL;
    CHECK_STATUS(hdb_session_new(model, NULL, &s), HDB_STATUS_OK, "session");

    hdb_generate_params p = hdb_generate_params_default();
    CHECK(p.struct_size == sizeof p && p.steps == 25 && p.width == 512 && p.batch == 1, "defaults");
    p.prompt = "a photo of sks person";
    p.negative_prompt = "blurry";
    p.steps = 3;
    p.width = W;
    p.height = H;
    p.seed = 11;
    p.sampler = HDB_SAMPLER_DDIM;

    /* A caller stride wider than the row: padding bytes stay untouched. */
    enum { STRIDE = W * 3 + 5 };
    static uint8_t a[H * STRIDE], b[H * STRIDE];
    memset(a, 0xAB, sizeof a);
    hdb_image img = {.data = a, .data_len = sizeof a, .stride = STRIDE};
    CHECK_STATUS(hdb_generate(s, &p, &img, 1), HDB_STATUS_OK, "generate 64x64");
    CHECK(img.width == W && img.height == H && img.stride == STRIDE && img.format == HDB_PIXEL_RGB8,
          "image header set (%ux%u stride %u)", img.width, img.height, img.stride);
    CHECK(a[W * 3] == 0xAB && a[STRIDE - 1] == 0xAB, "bytes between rows untouched");
    memset(b, 0xAB, sizeof b);
    hdb_image img2 = {.data = b, .data_len = sizeof b, .stride = STRIDE};
    CHECK_STATUS(hdb_generate(s, &p, &img2, 1), HDB_STATUS_OK, "generate again");
    CHECK(memcmp(a, b, sizeof a) == 0, "same seed, same image");
    p.seed = 12;
    CHECK_STATUS(hdb_generate(s, &p, &img2, 1), HDB_STATUS_OK, "another seed");
    CHECK(memcmp(a, b, sizeof a) != 0, "another seed, another image");

    /* Per-image identities: image 0 none, image 1 id1. */
    hdb_adapter *ad = NULL;
    CHECK_STATUS(hdb_adapter_load(model, id1, &ad), HDB_STATUS_OK, "adapter");
    const hdb_adapter *set[1] = {ad};
    CHECK_STATUS(hdb_session_set_adapters(s, set, NULL, 1, HDB_APPLY_RUNTIME), HDB_STATUS_OK, "set runtime");
    int32_t idx[2] = {-1, 0};
    CHECK_STATUS(hdb_session_set_sample_adapters(s, idx, 2), HDB_STATUS_OK, "per-image indices");
    static uint8_t c0[H * W * 3], c1[H * W * 3];
    hdb_image two[2] = {{.data = c0, .data_len = sizeof c0}, {.data = c1, .data_len = sizeof c1}};
    p.batch = 2;
    p.seed = 11;
    CHECK_STATUS(hdb_generate(s, &p, two, 2), HDB_STATUS_OK, "batch of 2, one identity each");
    CHECK(two[0].stride == W * 3, "stride 0 means packed rows");
    CHECK(memcmp(c0, c1, sizeof c0) != 0, "the two images differ");

    /* Cancel within one step; the session stays usable. */
    progress_ctx pc = {0, 2};
    p.progress = on_progress;
    p.progress_user_data = &pc;
    CHECK_STATUS(hdb_generate(s, &p, two, 2), HDB_STATUS_CANCELLED, "cancel at the second step");
    CHECK(pc.calls == 2, "no step ran after the cancelling callback (%d calls)", pc.calls);
    pc = (progress_ctx){0, 0};
    CHECK_STATUS(hdb_generate(s, &p, two, 2), HDB_STATUS_OK, "generate after a cancel");
    CHECK(pc.calls == 3, "progress called once a step (%d)", pc.calls);
    p.progress = NULL;

    /* progress_stages: every phase, each when it starts and after each unit. */
    stages_ctx sc = {{0}, NULL};
    hdb_generate_params st = p;
    st.progress = on_stage;
    st.progress_user_data = &sc;
    st.progress_stages = 1;
    CHECK_STATUS(hdb_generate(s, &st, two, 2), HDB_STATUS_OK, "generate with every stage");
    const char *want = "build 0/3,build 1/3,build 2/3,build 3/3,text 0/1,text 1/1,denoise 0/3,"
                       "denoise 1/3,denoise 2/3,denoise 3/3,decode 0/1,decode 1/1,";
    CHECK(strcmp(sc.log, want) == 0, "stages in order: got \"%s\"", sc.log);
    /* Cancelling as the decode starts: no image is decoded, the session stays usable. */
    sc = (stages_ctx){{0}, "decode"};
    CHECK_STATUS(hdb_generate(s, &st, two, 2), HDB_STATUS_CANCELLED, "cancel at the decode");
    CHECK(strstr(sc.log, "decode 0/1,") && !strstr(sc.log, "decode 1/1"), "stopped at the decode: %s",
          sc.log);
    sc = (stages_ctx){{0}, "build"};
    CHECK_STATUS(hdb_generate(s, &st, two, 2), HDB_STATUS_CANCELLED, "cancel at the build");
    CHECK(strcmp(sc.log, "build 0/3,") == 0, "nothing ran after the build's first report: %s", sc.log);
    /* A struct from a header without progress_stages ends before it: the field reads as 0. */
    sc = (stages_ctx){{0}, NULL};
    st.struct_size = (uint32_t)offsetof(hdb_generate_params, progress_stages);
    CHECK_STATUS(hdb_generate(s, &st, two, 2), HDB_STATUS_OK, "the older struct size");
    CHECK(strcmp(sc.log, "denoise 1/3,denoise 2/3,denoise 3/3,") == 0, "steps only: %s", sc.log);

    /* Bad arguments. */
    CHECK_STATUS(hdb_generate(NULL, &p, two, 2), HDB_STATUS_NULL_ARGUMENT, "NULL session");
    CHECK_STATUS(hdb_generate(s, NULL, two, 2), HDB_STATUS_NULL_ARGUMENT, "NULL params");
    CHECK_STATUS(hdb_generate(s, &p, NULL, 2), HDB_STATUS_NULL_ARGUMENT, "NULL out");
    CHECK_STATUS(hdb_generate(s, &p, two, 1), HDB_STATUS_INVALID_ARGUMENT, "n_out < batch");
    CHECK_MSG("n_out", "names n_out");
    hdb_generate_params q = p;
    q.width = 60;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "width 60");
    CHECK_MSG("multiples of 8", "says why");
    q = p;
    q.steps = 0;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "zero steps");
    q = p;
    q.guidance = NAN;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "NaN guidance");
    q = p;
    q.sampler = 99;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "unknown sampler");
    CHECK_MSG("sampler", "names the sampler");
    q = p;
    q.prompt = "\xff\xfe not utf-8";
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "prompt not UTF-8");
    CHECK_MSG("params.prompt", "names the prompt");
    /* Sizes far outside the documented limits are refused before any buffer arithmetic. */
    q = p;
    q.width = 1u << 31;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "width 2^31");
    CHECK_MSG("params.width", "names the width");
    q = p;
    q.batch = UINT32_MAX;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "batch 2^32-1");
    CHECK_MSG("params.batch", "names the batch");
    q = p;
    q.height = 4096 * 2 + 8;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "height above 4096");
    CHECK_MSG("4096", "states the limit");
    /* A latents length that does not match is refused before the buffer is read (ASan would
     * see a read past these 4 floats). */
    static float few[4];
    q = p;
    q.latents = few;
    q.latents_len = (size_t)1 << 62;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "latents_len 2^62");
    CHECK_MSG("params.latents_len", "names latents_len");
    /* NaN starting latents would decode to a black image with OK. */
    static float nan_latents[2 * 4 * (H / 8) * (W / 8)];
    nan_latents[5] = NAN;
    q = p;
    q.latents = nan_latents;
    q.latents_len = sizeof nan_latents / sizeof nan_latents[0];
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "NaN latents");
    CHECK_MSG("latents", "names the latents");
    hdb_image nulldata[2] = {{.data = c0, .data_len = sizeof c0}, {.data = NULL, .data_len = sizeof c1}};
    CHECK_STATUS(hdb_generate(s, &p, nulldata, 2), HDB_STATUS_NULL_ARGUMENT, "out[1].data NULL");
    CHECK_MSG("out[1].data", "names out[1].data");
    q = p;
    q.reserved = 1;
    CHECK_STATUS(hdb_generate(s, &q, two, 2), HDB_STATUS_INVALID_ARGUMENT, "reserved 1");
    CHECK_MSG("params.reserved", "names params.reserved");
    hdb_image small[2] = {{.data = c0, .data_len = 100}, {.data = c1, .data_len = sizeof c1}};
    CHECK_STATUS(hdb_generate(s, &p, small, 2), HDB_STATUS_INVALID_ARGUMENT, "image buffer too small");
    CHECK_MSG("out[0]", "names out[0]");

    hdb_adapter_free(ad);
    hdb_session_free(s);
    hdb_model_free(model);
    hdb_runtime_free(rt);
    return test_done("generate");
}
