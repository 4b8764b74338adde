/*
 * hdb_last_error_copy: the calling thread's message copied into a caller buffer (full length
 * returned, truncated and NUL-terminated), and the hdb_<name>_params_init functions, which
 * write the same defaults as hdb_<name>_params_default() for hosts that cannot take structs by
 * value. Eight threads fail at once with different errors, 200 times each, and every copy
 * holds the thread's own message: the per-thread rule the bindings rely on.
 */
#include "common.h"

#include <stdatomic.h>

enum { THREADS = 8, ROUNDS = 200 };

static hdb_runtime *g_rt;
static const char *g_work;
static atomic_int g_wrong;

static void *fail_many(void *arg) {
    int id = (int)(intptr_t)arg;
    char missing[4096], want[64], buf[4096];
    snprintf(want, sizeof want, "missing-%d", id);
    path_join(missing, sizeof missing, g_work, want);
    for (int r = 0; r < ROUNDS; r++) {
        hdb_model *m = NULL;
        if (hdb_model_load(g_rt, missing, NULL, &m) != HDB_STATUS_FILE_NOT_FOUND) abort();
        size_t n = hdb_last_error_copy(buf, sizeof buf);
        if (n != strlen(buf) || strstr(buf, want) == NULL) atomic_fetch_add(&g_wrong, 1);
    }
    return NULL;
}

static int test_main(int argc, char **argv) {
    const char *fixtures;
    parse_args(argc, argv, &fixtures, &g_work);

    char buf[256];
    memset(buf, 'x', sizeof buf);
    /* A fresh thread has no message. */
    CHECK(hdb_last_error_copy(buf, sizeof buf) == 0 && buf[0] == '\0', "no error yet: \"\" (0)");

    hdb_runtime_params rp;
    CHECK_STATUS(hdb_runtime_params_init(&rp, sizeof rp), HDB_STATUS_OK, "hdb_runtime_params_init");
    hdb_runtime_params rd = hdb_runtime_params_default();
    CHECK(rp.struct_size == sizeof rp && rp.num_threads == rd.num_threads && rp.device == rd.device,
          "runtime params: init == default");
    rp.device = "cpu";
    CHECK_STATUS(hdb_runtime_new(&rp, &g_rt), HDB_STATUS_OK, "runtime from init'd params");

    CHECK_STATUS(hdb_model_load(g_rt, "/nonexistent/hdb-model", NULL, NULL), HDB_STATUS_NULL_ARGUMENT,
                 "a failing call");
    const char *msg = hdb_last_error_message();
    size_t full = strlen(msg);
    CHECK(full > 10, "it left a message: '%s'", msg);
    CHECK(hdb_last_error_copy(buf, sizeof buf) == full && strcmp(buf, msg) == 0,
          "copy returns the full length (%zu) and the same text", full);
    memset(buf, 'x', sizeof buf);
    CHECK(hdb_last_error_copy(buf, 6) == full && strlen(buf) == 5 && strncmp(buf, msg, 5) == 0 &&
              buf[6] == 'x',
          "a 6-byte buffer gets 5 bytes and the NUL, nothing beyond");
    CHECK(hdb_last_error_copy(buf, 1) == full && buf[0] == '\0', "a 1-byte buffer gets the NUL");
    CHECK(hdb_last_error_copy(NULL, 0) == full, "NULL, 0 asks for the length only");
    CHECK(hdb_last_error_copy(buf, sizeof buf) == full, "copying does not consume the message");
    hdb_runtime_info info = {.struct_size = sizeof info};
    CHECK_STATUS(hdb_runtime_get_info(g_rt, &info), HDB_STATUS_OK, "a successful call");
    CHECK(hdb_last_error_copy(buf, sizeof buf) == full, "keeps the message (until the next failure)");

    /* Every params struct has an init writing its defaults. */
    CHECK_STATUS(hdb_runtime_params_init(NULL, sizeof(hdb_runtime_params)), HDB_STATUS_NULL_ARGUMENT, "init(NULL)");
    CHECK_MSG("params", "names the argument");
    char mine[256];
    size_t mine_len = hdb_last_error_copy(mine, sizeof mine);
    hdb_model_params mp, md = hdb_model_params_default();
    memset(&mp, 0xFF, sizeof mp);
    CHECK_STATUS(hdb_model_params_init(&mp, sizeof mp), HDB_STATUS_OK, "hdb_model_params_init");
    CHECK(mp.struct_size == sizeof mp && mp.weights_variant == md.weights_variant &&
              mp.storage == md.storage && mp.progress == NULL && mp.progress_user_data == NULL &&
              mp.reserved == 0,
          "model params: init == default");
    hdb_session_params sp, sd = hdb_session_params_default();
    memset(&sp, 0xFF, sizeof sp);
    CHECK_STATUS(hdb_session_params_init(&sp, sizeof sp), HDB_STATUS_OK, "hdb_session_params_init");
    CHECK(sp.struct_size == sizeof sp && sp.reserved == sd.reserved, "session params: init == default");
    hdb_generate_params gp, gd = hdb_generate_params_default();
    memset(&gp, 0xFF, sizeof gp);
    CHECK_STATUS(hdb_generate_params_init(&gp, sizeof gp), HDB_STATUS_OK, "hdb_generate_params_init");
    CHECK(gp.struct_size == sizeof gp && gp.steps == gd.steps && gp.guidance == gd.guidance &&
              gp.sampler == gd.sampler && gp.seed == gd.seed && gp.width == gd.width &&
              gp.height == gd.height && gp.batch == gd.batch && gp.reserved == 0 &&
              gp.prompt == NULL && gp.negative_prompt == NULL && gp.latents == NULL &&
              gp.latents_len == 0 && gp.progress == NULL && gp.progress_user_data == NULL &&
              gp.progress_stages == 0,
          "generate params: init == default");
    /* A struct from an older header (without progress_stages) is written only as far as it
     * goes (a size no version has is refused, naming the argument: below). */
    size_t older = offsetof(hdb_generate_params, progress_stages);
    memset(&gp, 0xFF, sizeof gp);
    CHECK_STATUS(hdb_generate_params_init(&gp, older), HDB_STATUS_OK, "init of the older size");
    CHECK(gp.struct_size == older && gp.steps == gd.steps && gp.progress_user_data == NULL &&
              gp.progress_stages == 0xFFFFFFFFu,
          "older size: struct_size %u, nothing written past it", gp.struct_size);
    hdb_predict_params pp, pd = hdb_predict_params_default();
    memset(&pp, 0xFF, sizeof pp);
    CHECK_STATUS(hdb_predict_params_init(&pp, sizeof pp), HDB_STATUS_OK, "hdb_predict_params_init");
    CHECK(pp.struct_size == sizeof pp && pp.iterations == pd.iterations && pp.progress == NULL &&
              pp.progress_user_data == NULL,
          "predict params: init == default");
    hdb_finetune_params fp, fd = hdb_finetune_params_default();
    memset(&fp, 0xFF, sizeof fp);
    CHECK_STATUS(hdb_finetune_params_init(&fp, sizeof fp), HDB_STATUS_OK, "hdb_finetune_params_init");
    CHECK(fp.struct_size == sizeof fp && fp.mode == fd.mode && fp.steps == fd.steps &&
              fp.rank == fd.rank && fp.lr == fd.lr && fp.weight_decay == fd.weight_decay &&
              fp.max_grad_norm == fd.max_grad_norm && fp.lr_schedule == fd.lr_schedule &&
              fp.warmup_steps == fd.warmup_steps && fp.resolution == fd.resolution &&
              fp.checkpointing == fd.checkpointing && fp.seed == fd.seed && fp.prompt == NULL &&
              fp.token == NULL && fp.progress == NULL && fp.progress_user_data == NULL,
          "finetune params: init == default");

    /* Threads failing at the same time each read their own message. */
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        CHECK(pthread_create(&t[i], NULL, fail_many, (void *)(intptr_t)i) == 0, "start thread %d", i);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    CHECK(atomic_load(&g_wrong) == 0, "%d threads x %d failures: %d copies held another thread's message",
          THREADS, ROUNDS, atomic_load(&g_wrong));
    CHECK(hdb_last_error_copy(buf, sizeof buf) == mine_len && strcmp(buf, mine) == 0,
          "this thread's message is still its own");
    CHECK_STATUS(hdb_generate_params_init(&gp, 12), HDB_STATUS_INVALID_ARGUMENT, "init of 12 bytes");
    CHECK_MSG("size", "names the size");

    hdb_runtime_free(g_rt);
    return test_done("error_copy");
}
