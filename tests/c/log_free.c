/*
 * hdb_set_log_callback_ex: hdb owns the user data and calls its destructor exactly once, when
 * no call into the callback can happen any more: during the call that replaces or removes the
 * callback (after every call in flight on other threads has returned), or, when replaced from
 * inside the callback itself, once that call returns. A failing call (bad level) stores
 * nothing and frees nothing. The old hdb_set_log_callback stays, with no destructor.
 */
#include "common.h"

#include <stdatomic.h>
#include <time.h>

enum { THREADS = 4, SWAPS = 20 };

typedef struct {
    atomic_int calls;
    atomic_int inside;
    atomic_int freed;
    int canary;
    int stop_inside; /* the callback removes itself */
} ud_t;

static atomic_int g_total_frees;

static void on_log(void *ud, hdb_log_level level, const char *target, const char *message) {
    (void)level, (void)target, (void)message;
    ud_t *u = ud;
    atomic_fetch_add(&u->inside, 1);
    if (u->canary != 0x5EED || atomic_load(&u->freed) != 0) abort();
    struct timespec ts = {0, 200 * 1000};
    nanosleep(&ts, NULL);
    if (u->stop_inside) {
        if (hdb_set_log_callback_ex(NULL, NULL, NULL, HDB_LOG_LEVEL_OFF) != HDB_STATUS_OK) abort();
        /* Still inside: the destructor must not have run yet. */
        if (atomic_load(&u->freed) != 0) abort();
    }
    atomic_fetch_add(&u->calls, 1);
    atomic_fetch_sub(&u->inside, 1);
}

/* Marks instead of freeing, so the test can look at the counters afterwards. */
static void free_ud(void *ud) {
    ud_t *u = ud;
    if (atomic_load(&u->inside) != 0) abort(); /* a call is still inside */
    atomic_fetch_add(&u->freed, 1);
    atomic_fetch_add(&g_total_frees, 1);
}

static atomic_int g_stop;
static hdb_runtime *g_rt;
static char g_missing[4096];

static void *logger(void *arg) {
    (void)arg;
    while (!atomic_load(&g_stop)) {
        hdb_model *m = NULL;
        if (hdb_model_load(g_rt, g_missing, NULL, &m) != HDB_STATUS_FILE_NOT_FOUND) abort();
    }
    return NULL;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    path_join(g_missing, sizeof g_missing, work, "missing");
    hdb_runtime_params p = hdb_runtime_params_default();
    p.device = "cpu";
    p.num_threads = 1;
    CHECK_STATUS(hdb_runtime_new(&p, &g_rt), HDB_STATUS_OK, "runtime");

    static ud_t uds[SWAPS];
    for (int i = 0; i < SWAPS; i++) uds[i].canary = 0x5EED;

    ud_t bad = {.canary = 0x5EED};
    CHECK_STATUS(hdb_set_log_callback_ex(on_log, &bad, free_ud, 99), HDB_STATUS_INVALID_ARGUMENT,
                 "level 99 is refused");
    CHECK(atomic_load(&bad.freed) == 0, "and the caller keeps its user data (not freed)");

    /* Swaps while four threads log: each old user data is freed before the swap returns. */
    CHECK_STATUS(hdb_set_log_callback_ex(on_log, &uds[0], free_ud, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK,
                 "install");
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) CHECK(pthread_create(&t[i], NULL, logger, NULL) == 0, "start logger %d", i);
    for (int s = 0; s < SWAPS; s++) {
        while (atomic_load(&uds[s].calls) < 2) {
            struct timespec ts = {0, 100 * 1000};
            nanosleep(&ts, NULL);
        }
        hdb_status st = s + 1 < SWAPS
                            ? hdb_set_log_callback_ex(on_log, &uds[s + 1], free_ud, HDB_LOG_LEVEL_DEBUG)
                            : hdb_set_log_callback_ex(NULL, NULL, NULL, HDB_LOG_LEVEL_OFF);
        if (st != HDB_STATUS_OK) CHECK(st == HDB_STATUS_OK, "swap %d", s);
        if (atomic_load(&uds[s].freed) != 1)
            CHECK(atomic_load(&uds[s].freed) == 1, "swap %d: the old user data was freed once, before return", s);
    }
    atomic_store(&g_stop, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    CHECK(atomic_load(&g_total_frees) == SWAPS, "%d swaps, %d frees", SWAPS, atomic_load(&g_total_frees));
    for (int i = 0; i < SWAPS; i++)
        if (atomic_load(&uds[i].freed) != 1) CHECK(atomic_load(&uds[i].freed) == 1, "user data %d freed once", i);

    /* A NULL callback with user data and a destructor: nothing can use it, freed at once. */
    ud_t lone = {.canary = 0x5EED};
    CHECK_STATUS(hdb_set_log_callback_ex(NULL, &lone, free_ud, HDB_LOG_LEVEL_INFO), HDB_STATUS_OK, "NULL callback");
    CHECK(atomic_load(&lone.freed) == 1, "its user data is freed during the call");

    /* Removed from inside the callback: freed when that call returns, on its thread. */
    ud_t self = {.canary = 0x5EED, .stop_inside = 1};
    CHECK_STATUS(hdb_set_log_callback_ex(on_log, &self, free_ud, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK,
                 "a callback that removes itself");
    hdb_model *m = NULL;
    CHECK_STATUS(hdb_model_load(g_rt, g_missing, NULL, &m), HDB_STATUS_FILE_NOT_FOUND, "log one record");
    CHECK(atomic_load(&self.calls) == 1 && atomic_load(&self.freed) == 1,
          "it ran once and its user data was freed after it returned (calls %d, freed %d)",
          atomic_load(&self.calls), atomic_load(&self.freed));

    /* The old function: no destructor, so nothing is freed. */
    ud_t old = {.canary = 0x5EED};
    CHECK_STATUS(hdb_set_log_callback(on_log, &old, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK, "old API");
    CHECK_STATUS(hdb_set_log_callback(NULL, NULL, HDB_LOG_LEVEL_OFF), HDB_STATUS_OK, "old API off");
    CHECK(atomic_load(&old.freed) == 0, "no destructor, nothing freed");

    hdb_runtime_free(g_rt);
    return test_done("log_free");
}
