/*
 * hdb_session_cancel: another thread stops the generation running on a session (it returns
 * HDB_STATUS_CANCELLED after the step in progress), a progress callback may cancel through it
 * too, a request with no call running does nothing (the next call runs to the end), and the
 * session stays usable after a cancel.
 */
#include "common.h"

#include <stdatomic.h>
#include <time.h>

/* The cancelled runs ask for STEPS and must stop well before; the runs that must finish use
 * SHORT steps (valgrind runs these programs too: every step there costs seconds). */
enum { W = 64, H = 64, STEPS = 12, SHORT = 4 };

typedef struct {
    atomic_int steps;     /* steps reported so far */
    int total;            /* the steps the running call was asked for */
    hdb_session *session; /* cancelled from the callback at cancel_at (0: never) */
    int cancel_at;
    /* The first step's callback waits (up to a minute) until the cancelling thread has
     * sent its request, so the request lands while the call runs however the threads are
     * scheduled (valgrind runs one thread at a time and can starve the canceller). */
    bool hold_first_step;
    atomic_bool cancel_sent;
} watch;

static bool on_step(void *ud, uint64_t done, uint64_t total, const char *stage) {
    watch *w = ud;
    if (total != (uint64_t)w->total || done > total || strcmp(stage, "denoise") != 0) return false;
    int n = atomic_fetch_add(&w->steps, 1) + 1;
    if (w->hold_first_step && n == 1) {
        for (int i = 0; i < 600000 && !atomic_load(&w->cancel_sent); i++) {
            struct timespec ts = {0, 100 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    if (w->cancel_at != 0 && n == w->cancel_at &&
        hdb_session_cancel(w->session) != HDB_STATUS_OK) return false;
    return true;
}

static watch g_watch;

/* Waits for the first step, then cancels from this thread. */
static void *canceller(void *arg) {
    hdb_session *s = arg;
    while (atomic_load(&g_watch.steps) < 1) {
        struct timespec ts = {0, 200 * 1000};
        nanosleep(&ts, NULL);
    }
    if (hdb_session_cancel(s) != HDB_STATUS_OK) abort();
    atomic_store(&g_watch.cancel_sent, true);
    return NULL;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char dir[4096];
    path_join(dir, sizeof dir, fixtures, "tiny-sd");
    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "runtime");
    hdb_model *model = NULL;
    CHECK_STATUS(hdb_model_load(rt, dir, NULL, &model), HDB_STATUS_OK, "model");
    hdb_session *s = NULL;
    CHECK_STATUS(hdb_session_new(model, NULL, &s), HDB_STATUS_OK, "session");

    CHECK_STATUS(hdb_session_cancel(NULL), HDB_STATUS_NULL_ARGUMENT, "cancel(NULL)");
    CHECK_STATUS(hdb_session_cancel(s), HDB_STATUS_OK, "cancel with no call running");

    hdb_generate_params p;
    CHECK_STATUS(hdb_generate_params_init(&p, sizeof p), HDB_STATUS_OK, "params");
    p.steps = SHORT;
    g_watch.total = SHORT;
    p.width = W;
    p.height = H;
    p.sampler = HDB_SAMPLER_DDIM;
    p.progress = on_step;
    p.progress_user_data = &g_watch;
    static uint8_t rgb[W * H * 3];
    hdb_image img = {.data = rgb, .data_len = sizeof rgb};

    CHECK_STATUS(hdb_generate(s, &p, &img, 1), HDB_STATUS_OK,
                 "an earlier request does not carry over: the next call runs");
    CHECK(atomic_load(&g_watch.steps) == SHORT, "all %d steps ran (%d)", SHORT, atomic_load(&g_watch.steps));

    atomic_store(&g_watch.steps, 0);
    p.steps = STEPS;
    g_watch.total = STEPS;
    g_watch.hold_first_step = true;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, canceller, s) == 0, "start the cancelling thread");
    CHECK_STATUS(hdb_generate(s, &p, &img, 1), HDB_STATUS_CANCELLED, "cancelled from another thread");
    pthread_join(t, NULL);
    g_watch.hold_first_step = false;
    CHECK(atomic_load(&g_watch.cancel_sent), "the cancelling thread sent its request");
    int ran = atomic_load(&g_watch.steps);
    CHECK(ran >= 1 && ran < STEPS, "it stopped early (%d of %d steps)", ran, STEPS);
    CHECK(last_error_nonempty(), "with a message");

    atomic_store(&g_watch.steps, 0);
    g_watch.session = s;
    g_watch.cancel_at = 3;
    CHECK_STATUS(hdb_generate(s, &p, &img, 1), HDB_STATUS_CANCELLED, "cancelled from the progress callback");
    CHECK(atomic_load(&g_watch.steps) == 3, "right after that step (%d steps)", atomic_load(&g_watch.steps));

    atomic_store(&g_watch.steps, 0);
    g_watch.cancel_at = 0;
    p.steps = SHORT;
    g_watch.total = SHORT;
    CHECK_STATUS(hdb_generate(s, &p, &img, 1), HDB_STATUS_OK, "the session is usable after a cancel");
    CHECK(atomic_load(&g_watch.steps) == SHORT, "all steps ran");

    hdb_session_free(s);
    hdb_model_free(model);
    hdb_runtime_free(rt);
    return test_done("cancel");
}
