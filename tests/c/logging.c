/*
 * hdb_set_log_callback: records reach the callback with its user_data, filtered by level;
 * replacing, disabling (NULL callback or HDB_LOG_LEVEL_OFF) and bad levels.
 * The callback may run on hdb's worker threads, so everything it touches is atomic.
 */
#include "common.h"

#include <stdatomic.h>

typedef struct {
    atomic_int calls;
    atomic_int by_level[6];
    atomic_int bad_strings;    /* NULL, empty or non-UTF-8 target/message */
    atomic_int non_hdb_target; /* target not starting with "hdb" */
    atomic_int over_level;     /* level above the installed max_level, or not 1..5 */
    atomic_int saw_marker1;    /* a DEBUG record mentioning g_missing1 */
    atomic_int saw_marker2;    /* a DEBUG record mentioning g_missing2 */
} counters;

static counters g_a, g_b;
static atomic_int g_stray_user_data; /* calls whose user_data is neither &g_a nor &g_b */
static atomic_uint g_max_level;
static char g_missing1[4096], g_missing2[4096];

static void on_log(void *ud, hdb_log_level level, const char *target, const char *message) {
    if (ud != &g_a && ud != &g_b) {
        atomic_fetch_add(&g_stray_user_data, 1);
        return;
    }
    counters *c = ud;
    atomic_fetch_add(&c->calls, 1);
    if (level >= 1 && level <= 5) atomic_fetch_add(&c->by_level[level], 1);
    if (level < 1 || level > 5 || level > atomic_load(&g_max_level)) atomic_fetch_add(&c->over_level, 1);
    if (target == NULL || message == NULL || !target[0] || !message[0] || !utf8_valid(target) ||
        !utf8_valid(message)) {
        atomic_fetch_add(&c->bad_strings, 1);
        return;
    }
    if (strncmp(target, "hdb", 3) != 0) atomic_fetch_add(&c->non_hdb_target, 1);
    if (level == HDB_LOG_LEVEL_DEBUG && strstr(message, g_missing1)) atomic_fetch_add(&c->saw_marker1, 1);
    if (level == HDB_LOG_LEVEL_DEBUG && strstr(message, g_missing2)) atomic_fetch_add(&c->saw_marker2, 1);
}

/* A callback that turns logging off from inside itself (re-entrancy must not deadlock). */
static atomic_int g_reentrant_calls;
static void on_log_then_stop(void *ud, hdb_log_level level, const char *target, const char *message) {
    (void)ud, (void)level, (void)target, (void)message;
    atomic_fetch_add(&g_reentrant_calls, 1);
    hdb_set_log_callback(NULL, NULL, HDB_LOG_LEVEL_OFF);
}

static hdb_status set_log(hdb_log_fn cb, void *ud, hdb_log_level level) {
    hdb_status s = hdb_set_log_callback(cb, ud, level);
    if (s == HDB_STATUS_OK) atomic_store(&g_max_level, cb ? level : 0);
    return s;
}

static int total_calls(void) {
    return atomic_load(&g_a.calls) + atomic_load(&g_b.calls) + atomic_load(&g_stray_user_data);
}

/* Work that logs: a runtime (INFO records) and a failing load of `missing` (a DEBUG record). */
static void do_work(const char *missing) {
    hdb_runtime_params p = hdb_runtime_params_default();
    p.device = "cpu";
    p.num_threads = 2;
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&p, &rt), HDB_STATUS_OK, "  (work) hdb_runtime_new");
    hdb_model *m = NULL;
    CHECK_STATUS(hdb_model_load(rt, missing, NULL, &m), HDB_STATUS_FILE_NOT_FOUND, "  (work) load %s fails", missing);
    hdb_runtime_free(rt);
}

static void check_clean(counters *c, const char *name) {
    CHECK(atomic_load(&c->bad_strings) == 0, "%s: every target/message non-empty UTF-8", name);
    CHECK(atomic_load(&c->non_hdb_target) == 0, "%s: every target starts with \"hdb\"", name);
    CHECK(atomic_load(&c->over_level) == 0, "%s: no record above the installed max_level", name);
    CHECK(atomic_load(&g_stray_user_data) == 0, "no call with a user_data that was never installed");
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    path_join(g_missing1, sizeof g_missing1, work, "missing-one");
    path_join(g_missing2, sizeof g_missing2, work, "missing-two");
    char ldm[4096];
    path_join(ldm, sizeof ldm, fixtures, "tiny-sd-ldm.safetensors");

    /* DEBUG, user_data &g_a. */
    CHECK_STATUS(set_log(on_log, &g_a, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK, "install callback at DEBUG with &g_a");
    do_work(g_missing1);
    CHECK(atomic_load(&g_a.calls) > 0, "callback ran (%d calls) with user_data &g_a", atomic_load(&g_a.calls));
    CHECK(atomic_load(&g_a.by_level[HDB_LOG_LEVEL_INFO]) > 0, "runtime creation logged at INFO (%d)",
          atomic_load(&g_a.by_level[HDB_LOG_LEVEL_INFO]));
    CHECK(atomic_load(&g_a.saw_marker1) > 0, "the failing load logged its error (naming the path) at DEBUG");
    check_clean(&g_a, "g_a at DEBUG");

    /* A successful load logs too. */
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(NULL, &rt), HDB_STATUS_OK, "runtime for a successful load");
    int before = atomic_load(&g_a.by_level[HDB_LOG_LEVEL_INFO]);
    hdb_model *m = NULL;
    CHECK_STATUS(hdb_model_load(rt, ldm, NULL, &m), HDB_STATUS_OK, "load %s", ldm);
    CHECK(atomic_load(&g_a.by_level[HDB_LOG_LEVEL_INFO]) > before, "a successful load logs at INFO");
    hdb_model_free(m);
    hdb_runtime_free(rt);

    /* Replace with &g_b at INFO: g_a gets nothing more, g_b no DEBUG records. */
    CHECK_STATUS(set_log(on_log, &g_b, HDB_LOG_LEVEL_INFO), HDB_STATUS_OK, "replace with &g_b at INFO");
    int a_calls = atomic_load(&g_a.calls);
    do_work(g_missing2);
    CHECK(atomic_load(&g_a.calls) == a_calls, "the replaced callback/user_data gets no more calls");
    CHECK(atomic_load(&g_b.calls) > 0 && atomic_load(&g_b.by_level[HDB_LOG_LEVEL_INFO]) > 0,
          "the new user_data &g_b gets the INFO records (%d calls)", atomic_load(&g_b.calls));
    CHECK(atomic_load(&g_b.by_level[HDB_LOG_LEVEL_DEBUG]) == 0 && atomic_load(&g_b.saw_marker2) == 0,
          "at INFO, DEBUG records are filtered out");
    check_clean(&g_b, "g_b at INFO");

    /* ERROR: nothing in this work is an error. */
    CHECK_STATUS(set_log(on_log, &g_b, HDB_LOG_LEVEL_ERROR), HDB_STATUS_OK, "max_level ERROR");
    int b_calls = atomic_load(&g_b.calls);
    do_work(g_missing2);
    CHECK(atomic_load(&g_b.calls) == b_calls, "at ERROR, INFO and DEBUG records are filtered out");

    /* Disable with (NULL, NULL, OFF). */
    CHECK_STATUS(set_log(NULL, NULL, HDB_LOG_LEVEL_OFF), HDB_STATUS_OK, "hdb_set_log_callback(NULL, NULL, OFF)");
    int total = total_calls();
    do_work(g_missing1);
    CHECK(total_calls() == total, "after (NULL, NULL, OFF) the callback is not called");

    /* A callback with level OFF is not called either. */
    CHECK_STATUS(set_log(on_log, &g_a, HDB_LOG_LEVEL_OFF), HDB_STATUS_OK, "callback with HDB_LOG_LEVEL_OFF");
    do_work(g_missing1);
    CHECK(total_calls() == total, "a callback installed at OFF is not called");

    /* A NULL callback with a real level disables too. */
    CHECK_STATUS(set_log(on_log, &g_a, HDB_LOG_LEVEL_TRACE), HDB_STATUS_OK, "callback at TRACE");
    CHECK_STATUS(set_log(NULL, &g_a, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK, "NULL callback at DEBUG");
    total = total_calls();
    do_work(g_missing1);
    CHECK(total_calls() == total, "a NULL callback stops logging whatever the level");

    /* Invalid levels are refused and change nothing. */
    CHECK_STATUS(set_log(on_log, &g_a, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK, "callback at DEBUG again");
    CHECK_STATUS(hdb_set_log_callback(on_log, &g_b, 42), HDB_STATUS_INVALID_ARGUMENT, "max_level 42 -> INVALID_ARGUMENT");
    CHECK_MSG("max_level", "max_level 42: message names max_level");
    CHECK_STATUS(hdb_set_log_callback(NULL, NULL, HDB_LOG_LEVEL_TRACE + 1), HDB_STATUS_INVALID_ARGUMENT,
                 "max_level TRACE+1 -> INVALID_ARGUMENT");
    CHECK_STATUS(hdb_set_log_callback(on_log, &g_b, UINT32_MAX), HDB_STATUS_INVALID_ARGUMENT,
                 "max_level UINT32_MAX -> INVALID_ARGUMENT");
    a_calls = atomic_load(&g_a.calls);
    b_calls = atomic_load(&g_b.calls);
    do_work(g_missing1);
    CHECK(atomic_load(&g_a.calls) > a_calls && atomic_load(&g_b.calls) == b_calls,
          "a refused call leaves the previous callback and user_data installed");
    check_clean(&g_a, "g_a at the end");

    /* The callback may call hdb, even hdb_set_log_callback itself. */
    CHECK_STATUS(hdb_set_log_callback(on_log_then_stop, NULL, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK,
                 "a callback that switches logging off from inside");
    do_work(g_missing1);
    CHECK(atomic_load(&g_reentrant_calls) == 1, "re-entrant callback ran once, then logging was off (%d calls)",
          atomic_load(&g_reentrant_calls));

    CHECK_STATUS(set_log(NULL, NULL, HDB_LOG_LEVEL_OFF), HDB_STATUS_OK, "logging off at exit");
    return test_done("logging");
}
