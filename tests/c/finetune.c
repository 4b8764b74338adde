/*
 * hdb_finetune and hdb_personalize: an identity trained from an RGB8 face (with a stride) on
 * the tiny model, LiDB from zero and rank-relaxed, its use in a session, progress with the
 * loss, cancel, divergence, and bad arguments. Gradient parity with torch is tested in
 * tests/grad_model.rs, the optimizer's in tests/train.rs.
 */
#include "common.h"

#include <math.h>

enum { W = 45, H = 37, STRIDE = W * 3 + 3 };

struct steps {
    int calls;
    bool finite;
    uint64_t last;
};

static bool count_steps(void *ud, uint64_t step, uint64_t steps, float loss) {
    struct steps *s = ud;
    s->calls++;
    s->finite = s->finite && isfinite(loss);
    s->last = step;
    return step <= steps;
}

static bool stop_at_2(void *ud, uint64_t step, uint64_t steps, float loss) {
    (void)ud, (void)steps, (void)loss;
    return step < 2;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char dir[4096], net_path[4096], saved[4096];
    path_join(dir, sizeof dir, fixtures, "tiny-sd");
    path_join(net_path, sizeof net_path, fixtures, "hypernet/tiny.hypernet.safetensors");
    path_join(saved, sizeof saved, work, "finetuned.safetensors");

    static uint8_t pixels[H * STRIDE];
    for (size_t i = 0; i < sizeof pixels; i++) pixels[i] = (uint8_t)((i * 29) % 251);
    hdb_image face = {.data = pixels, .data_len = sizeof pixels, .width = W, .height = H, .stride = STRIDE,
                      .format = HDB_PIXEL_RGB8};

    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    rp.num_threads = 2;
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "cpu runtime");
    hdb_model *model = NULL;
    CHECK_STATUS(hdb_model_load(rt, dir, NULL, &model), HDB_STATUS_OK, "model");

    hdb_finetune_params p = hdb_finetune_params_default();
    CHECK(p.struct_size == sizeof p && p.mode == HDB_FINETUNE_AUTO && p.steps == 0 && p.checkpointing == 1 &&
              p.max_grad_norm == 1.0f && p.prompt == NULL,
          "finetune defaults");
    p.steps = 3;
    p.resolution = 64;
    p.seed = 3;
    struct steps st = {0, true, 0};
    p.progress = count_steps;
    p.progress_user_data = &st;

    /* LiDB from zero (no start adapter). */
    hdb_adapter *zero = NULL;
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &p, &zero), HDB_STATUS_OK, "LiDB from zero, 3 steps");
    CHECK(zero != NULL && st.calls == 3 && st.last == 3 && st.finite, "an adapter; one finite loss per step (%d)",
          st.calls);
    CHECK_STATUS(hdb_adapter_save(zero, saved), HDB_STATUS_OK, "save it");
    hdb_adapter *reloaded = NULL;
    CHECK_STATUS(hdb_adapter_load(model, saved, &reloaded), HDB_STATUS_OK, "it loads back");

    /* Rank-relaxed from it, then used by a session. */
    hdb_adapter *relaxed = NULL;
    p.rank = 2;
    st = (struct steps){0, true, 0};
    CHECK_STATUS(hdb_finetune(model, &face, reloaded, &p, &relaxed), HDB_STATUS_OK, "rank-relaxed from it");
    CHECK(relaxed != NULL && st.calls == 3, "3 more steps (%d)", st.calls);
    hdb_session *s = NULL;
    CHECK_STATUS(hdb_session_new(model, NULL, &s), HDB_STATUS_OK, "session");
    const hdb_adapter *set[1] = {relaxed};
    CHECK_STATUS(hdb_session_set_adapters(s, set, NULL, 1, HDB_APPLY_RUNTIME), HDB_STATUS_OK,
                 "the trained adapter applies");

    /* Personalization: the hypernetwork's prediction, then 2 relaxed steps. */
    hdb_hypernet *net = NULL;
    CHECK_STATUS(hdb_hypernet_load(rt, net_path, &net), HDB_STATUS_OK, "hypernetwork");
    hdb_adapter *personal = NULL;
    p.steps = 2;
    st = (struct steps){0, true, 0};
    CHECK_STATUS(hdb_personalize(net, model, &face, NULL, &p, &personal), HDB_STATUS_OK, "personalize");
    CHECK(personal != NULL && st.calls == 2, "2 steps after the prediction (%d)", st.calls);

    /* Cancel, divergence: nothing written. */
    hdb_adapter *none = NULL;
    hdb_finetune_params c = p;
    c.steps = 5;
    c.progress = stop_at_2;
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &c, &none), HDB_STATUS_CANCELLED, "cancelled at step 2");
    CHECK(none == NULL, "a cancelled run writes nothing");
    hdb_finetune_params d = p;
    d.lr = 1e30f;
    d.max_grad_norm = INFINITY;
    d.steps = 4;
    d.progress = NULL;
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &d, &none), HDB_STATUS_DIVERGED, "lr 1e30 diverges");
    CHECK_MSG("step", "the message names the step");
    CHECK(none == NULL, "a diverged run writes nothing");

    /* Bad arguments. */
    CHECK_STATUS(hdb_finetune(NULL, &face, NULL, &p, &none), HDB_STATUS_NULL_ARGUMENT, "NULL model");
    CHECK_STATUS(hdb_finetune(model, NULL, NULL, &p, &none), HDB_STATUS_NULL_ARGUMENT, "NULL face");
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &p, NULL), HDB_STATUS_NULL_ARGUMENT, "NULL out");
    hdb_finetune_params b = p;
    b.mode = HDB_FINETUNE_RELAXED;
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &b, &none), HDB_STATUS_NULL_ARGUMENT, "relaxed without start");
    CHECK_MSG("start", "names start");
    b.mode = 7;
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &b, &none), HDB_STATUS_INVALID_ARGUMENT, "mode 7");
    CHECK_MSG("params.mode", "names params.mode");
    b = p;
    b.lr = NAN;
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &b, &none), HDB_STATUS_INVALID_ARGUMENT, "lr NaN");
    CHECK_MSG("lr", "names lr");
    b = p;
    b.resolution = 60;
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &b, &none), HDB_STATUS_INVALID_ARGUMENT, "resolution 60");
    CHECK_MSG("resolution", "names resolution");
    b = p;
    b.lr_schedule = 9;
    CHECK_STATUS(hdb_finetune(model, &face, NULL, &b, &none), HDB_STATUS_INVALID_ARGUMENT, "schedule 9");
    hdb_image small = face;
    small.width = 8, small.height = 8;
    CHECK_STATUS(hdb_finetune(model, &small, NULL, &p, &none), HDB_STATUS_INVALID_ARGUMENT, "an 8x8 face");
    hdb_image nodata = face;
    nodata.data = NULL;
    CHECK_STATUS(hdb_finetune(model, &nodata, NULL, &p, &none), HDB_STATUS_NULL_ARGUMENT, "face without data");
    CHECK_MSG("face.data", "names face.data");
    CHECK(none == NULL, "no failed call wrote *out");

    hdb_session_free(s);
    hdb_adapter_free(personal);
    hdb_adapter_free(relaxed);
    hdb_adapter_free(reloaded);
    hdb_adapter_free(zero);
    hdb_hypernet_free(net);
    hdb_model_free(model);
    hdb_runtime_free(rt);
    return test_done("finetune");
}
