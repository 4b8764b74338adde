/*
 * NULL for each pointer argument of every exported function, the others valid.
 *
 * The functions of include/hdb.h and their pointer arguments:
 *   hdb_last_error_message(void)                       - none
 *   hdb_set_log_callback(callback, user_data, level)   - callback optional (NULL = stop logging),
 *                                                         user_data opaque (passed through)
 *   hdb_model_params_default(void)                     - none
 *   hdb_model_load(rt, path, params, out)              - rt, path, out required; params optional
 *   hdb_model_get_info(model, out)                     - both required
 *   hdb_model_describe(model, buf, buf_len, needed)    - model required; buf optional (NULL =
 *                                                         size query, BUFFER_TOO_SMALL); needed
 *                                                         optional
 *   hdb_model_free(model)                              - NULL is a no-op
 *   hdb_runtime_params_default(void)                   - none
 *   hdb_runtime_new(params, out)                       - out required; params optional;
 *                                                         params->device optional (NULL = auto)
 *   hdb_runtime_get_info(rt, out)                      - both required
 *   hdb_runtime_free(rt)                               - NULL is a no-op
 *   hdb_status_name(status), hdb_version_string(void), hdb_abi_version(void) - none
 * The session, adapter and generate functions get the same checks in session.c, adapter.c and
 * generate.c, beside the objects they need.
 */
#include "common.h"

static char sentinel_storage;
#define SENTINEL ((void *)&sentinel_storage)

/* Checks a NULL-argument failure: the status, and a message naming 'arg'. */
#define CHECK_NULL_ARG(call, arg)                                                              \
    do {                                                                                       \
        CHECK_STATUS(call, HDB_STATUS_NULL_ARGUMENT, "%s -> HDB_STATUS_NULL_ARGUMENT", #call); \
        CHECK(last_error_nonempty(), "%s: non-empty message", #call);                          \
        CHECK_MSG("'" arg "'", "%s: message names '%s': '%s'", #call, arg,                    \
                  hdb_last_error_message());                                                   \
    } while (0)

static void log_cb(void *ud, hdb_log_level level, const char *target, const char *msg) {
    (void)ud, (void)level, (void)target, (void)msg;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char ldm[4096];
    path_join(ldm, sizeof ldm, fixtures, "tiny-sd-ldm.safetensors");

    /* --- hdb_runtime_new(params, out) --- */
    CHECK_NULL_ARG(hdb_runtime_new(NULL, NULL), "out");
    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    rp.num_threads = 2;
    CHECK_NULL_ARG(hdb_runtime_new(&rp, NULL), "out");
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(NULL, &rt), HDB_STATUS_OK, "hdb_runtime_new(NULL params) means defaults");
    CHECK(rt != NULL, "runtime created with NULL params");
    hdb_runtime_free(rt);
    rp.device = NULL;
    rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "hdb_runtime_new with params.device NULL means auto");
    hdb_runtime_free(rt);
    rp.device = "cpu";
    rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "hdb_runtime_new(cpu, 2 threads)");

    /* --- hdb_runtime_get_info(rt, out) --- */
    hdb_runtime_info ri;
    memset(&ri, 0x5A, sizeof ri);
    ri.struct_size = sizeof ri;
    hdb_runtime_info ri_before;
    memcpy(&ri_before, &ri, sizeof ri);
    CHECK_NULL_ARG(hdb_runtime_get_info(NULL, &ri), "rt");
    CHECK(memcmp(&ri, &ri_before, sizeof ri) == 0, "hdb_runtime_get_info(NULL rt) left *out untouched");
    CHECK_NULL_ARG(hdb_runtime_get_info(rt, NULL), "out");
    CHECK_NULL_ARG(hdb_runtime_get_info(NULL, NULL), "rt");

    /* --- hdb_model_load(rt, path, params, out) --- */
    hdb_model_params mp = hdb_model_params_default();
    hdb_model *model = SENTINEL;
    CHECK_NULL_ARG(hdb_model_load(NULL, ldm, &mp, &model), "rt");
    CHECK(model == SENTINEL, "hdb_model_load(NULL rt) left *out untouched");
    CHECK_NULL_ARG(hdb_model_load(rt, NULL, &mp, &model), "path");
    CHECK(model == SENTINEL, "hdb_model_load(NULL path) left *out untouched");
    CHECK_NULL_ARG(hdb_model_load(rt, ldm, &mp, NULL), "out");
    CHECK_NULL_ARG(hdb_model_load(NULL, NULL, NULL, NULL), "rt");
    model = NULL;
    CHECK_STATUS(hdb_model_load(rt, ldm, NULL, &model), HDB_STATUS_OK,
                 "hdb_model_load(NULL params) means defaults (%s)", ldm);
    CHECK(model != NULL, "model loaded with NULL params");
    mp.progress = NULL; /* a NULL progress callback is allowed */
    hdb_model *model2 = NULL;
    CHECK_STATUS(hdb_model_load(rt, ldm, &mp, &model2), HDB_STATUS_OK, "hdb_model_load with params.progress NULL");
    hdb_model_free(model2);

    /* --- hdb_model_get_info(model, out) --- */
    hdb_model_info mi;
    memset(&mi, 0x5A, sizeof mi);
    mi.struct_size = sizeof mi;
    hdb_model_info mi_before;
    memcpy(&mi_before, &mi, sizeof mi);
    CHECK_NULL_ARG(hdb_model_get_info(NULL, &mi), "model");
    CHECK(memcmp(&mi, &mi_before, sizeof mi) == 0, "hdb_model_get_info(NULL model) left *out untouched");
    CHECK_NULL_ARG(hdb_model_get_info(model, NULL), "out");
    CHECK_NULL_ARG(hdb_model_get_info(NULL, NULL), "model");

    /* --- hdb_model_describe(model, buf, buf_len, needed) --- */
    char buf[16];
    size_t needed = 12345;
    memset(buf, 'x', sizeof buf);
    CHECK_NULL_ARG(hdb_model_describe(NULL, buf, sizeof buf, &needed), "model");
    CHECK(needed == 12345, "hdb_model_describe(NULL model) left *needed untouched");
    CHECK(buf[0] == 'x', "hdb_model_describe(NULL model) left buf untouched");
    CHECK_NULL_ARG(hdb_model_describe(NULL, NULL, 0, NULL), "model");
    /* buf NULL: a size query. */
    CHECK_STATUS(hdb_model_describe(model, NULL, 0, &needed), HDB_STATUS_BUFFER_TOO_SMALL,
                 "hdb_model_describe(buf NULL, len 0) is a size query -> BUFFER_TOO_SMALL");
    CHECK(needed > 1 && needed != 12345, "size query set *needed (%zu)", needed);
    size_t needed2 = 0;
    CHECK_STATUS(hdb_model_describe(model, NULL, 1u << 20, &needed2), HDB_STATUS_BUFFER_TOO_SMALL,
                 "hdb_model_describe(buf NULL, len 1 MiB) is still a size query");
    CHECK(needed2 == needed, "the size query does not depend on buf_len (%zu == %zu)", needed2, needed);
    CHECK_STATUS(hdb_model_describe(model, NULL, 0, NULL), HDB_STATUS_BUFFER_TOO_SMALL,
                 "hdb_model_describe(buf NULL, needed NULL) -> BUFFER_TOO_SMALL, no crash");
    CHECK(last_error_nonempty(), "BUFFER_TOO_SMALL has a message");
    /* needed NULL with a big enough buffer: fine. */
    char *full = malloc(needed);
    CHECK(full != NULL, "malloc(%zu)", needed);
    CHECK_STATUS(hdb_model_describe(model, full, needed, NULL), HDB_STATUS_OK,
                 "hdb_model_describe(needed NULL) with a big enough buffer -> OK");
    CHECK(strlen(full) == needed - 1, "description is NUL-terminated at needed-1 (%zu)", strlen(full));
    free(full);

    /* --- hdb_set_log_callback(callback, user_data, level) --- */
    CHECK_STATUS(hdb_set_log_callback(NULL, NULL, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK,
                 "hdb_set_log_callback(NULL callback) is allowed (stops logging)");
    CHECK_STATUS(hdb_set_log_callback(log_cb, NULL, HDB_LOG_LEVEL_ERROR), HDB_STATUS_OK,
                 "hdb_set_log_callback(cb, NULL user_data) is allowed (user_data is opaque)");
    CHECK_STATUS(hdb_set_log_callback(NULL, NULL, HDB_LOG_LEVEL_OFF), HDB_STATUS_OK,
                 "hdb_set_log_callback(NULL, NULL, OFF)");

    /* --- the _free functions: NULL is a no-op --- */
    hdb_model_free(NULL);
    hdb_runtime_free(NULL);
    CHECK(true, "hdb_model_free(NULL), hdb_runtime_free(NULL) are no-ops");

    /* --- functions without pointer arguments never return NULL --- */
    CHECK(hdb_last_error_message() != NULL, "hdb_last_error_message() is never NULL");
    CHECK(hdb_status_name(12345) != NULL, "hdb_status_name(any) is never NULL");
    CHECK(hdb_version_string() != NULL, "hdb_version_string() is never NULL");

    hdb_model_free(model);
    hdb_runtime_free(rt);
    return test_done("null_args");
}
