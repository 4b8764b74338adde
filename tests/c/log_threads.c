/*
 * hdb_set_log_callback is synchronous: once it returns, no other thread is still inside the
 * callback it replaced, so the host may free that callback's user data at once. Eight threads
 * log without pause (failing loads log at DEBUG) while the main thread swaps the callback to a
 * freshly malloc'd user data and frees the old one, 40 times (8 under valgrind); a call that
 * was still running would touch freed memory, which AddressSanitizer reports (and valgrind, in
 * its run).
 */
#include "common.h"

#include <stdatomic.h>
#include <time.h>

/* SWAPS, or QUICK_SWAPS with HDB_TEST_QUICK set (under valgrind, which runs one thread at a
 * time: 40 swaps took three minutes there). */
enum { THREADS = 8, SWAPS = 40, QUICK_SWAPS = 8 };

typedef struct {
    atomic_int calls;
    atomic_int inside;
    int canary; /* read by every call: a call after free() is a heap-use-after-free */
} slow_ud;

static void on_slow(void *ud, hdb_log_level level, const char *target, const char *message) {
    (void)level, (void)target, (void)message;
    slow_ud *u = ud;
    atomic_fetch_add(&u->inside, 1);
    struct timespec ts = {0, 300 * 1000}; /* 0.3 ms: calls overlap the swaps */
    nanosleep(&ts, NULL);
    if (u->canary != 0x5EED) abort();
    atomic_fetch_add(&u->calls, 1);
    atomic_fetch_sub(&u->inside, 1);
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

static slow_ud *new_ud(void) {
    slow_ud *u = calloc(1, sizeof *u);
    if (u == NULL) abort();
    u->canary = 0x5EED;
    return u;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    path_join(g_missing, sizeof g_missing, work, "missing");
    hdb_runtime_params p = hdb_runtime_params_default();
    p.device = "cpu";
    p.num_threads = 1;
    CHECK_STATUS(hdb_runtime_new(&p, &g_rt), HDB_STATUS_OK, "runtime");

    slow_ud *cur = new_ud();
    CHECK_STATUS(hdb_set_log_callback(on_slow, cur, HDB_LOG_LEVEL_DEBUG), HDB_STATUS_OK, "install");
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) CHECK(pthread_create(&t[i], NULL, logger, NULL) == 0, "start logger %d", i);
    const int swaps = getenv("HDB_TEST_QUICK") != NULL ? QUICK_SWAPS : SWAPS;
    long total = 0;
    int busy_swaps = 0;
    for (int s = 0; s < swaps; s++) {
        /* Let the threads get into the current callback. */
        while (atomic_load(&cur->calls) < 4) {
            struct timespec ts = {0, 100 * 1000};
            nanosleep(&ts, NULL);
        }
        if (atomic_load(&cur->inside) > 0) busy_swaps++;
        slow_ud *next = s + 1 < swaps ? new_ud() : NULL;
        hdb_status st = hdb_set_log_callback(next ? on_slow : NULL, next, next ? HDB_LOG_LEVEL_DEBUG : HDB_LOG_LEVEL_OFF);
        if (st != HDB_STATUS_OK) CHECK(st == HDB_STATUS_OK, "swap %d", s);
        /* Returned: nobody is inside the old callback any more. */
        if (atomic_load(&cur->inside) != 0) CHECK(atomic_load(&cur->inside) == 0, "swap %d: a call still in flight", s);
        total += atomic_load(&cur->calls);
        cur->canary = 0;
        free(cur);
        cur = next;
        if (cur == NULL) break;
    }
    CHECK(busy_swaps > 0, "%d of %d swaps found calls in flight (the case being tested)", busy_swaps, swaps);
    CHECK(total >= 4 * swaps, "%ld callback calls in all", total);
    atomic_store(&g_stop, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    hdb_runtime_free(g_rt);
    return test_done("log_threads");
}
