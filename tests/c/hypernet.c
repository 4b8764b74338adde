/*
 * hdb_hypernet: load, predict an identity from an RGB8 face (with a stride), use it in a
 * session, progress and cancel, a model it does not fit, and bad images and arguments.
 * Parity with PyTorch is tested in tests/hypernet.rs.
 */
#include "common.h"

enum { W = 45, H = 37, STRIDE = W * 3 + 3 };

static bool count_progress(void *ud, uint64_t done, uint64_t total, const char *stage) {
    int *calls = ud;
    (*calls)++;
    return done <= total && strcmp(stage, "predict") == 0;
}

static bool stop(void *ud, uint64_t done, uint64_t total, const char *stage) {
    (void)ud, (void)done, (void)total, (void)stage;
    return false;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char net_path[4096], dir[4096], other[4096], saved[4096];
    path_join(net_path, sizeof net_path, fixtures, "hypernet/tiny.hypernet.safetensors");
    path_join(dir, sizeof dir, fixtures, "tiny-sd");
    path_join(other, sizeof other, fixtures, "unet/lpb1");
    path_join(saved, sizeof saved, work, "predicted.lidb.safetensors");

    static uint8_t pixels[H * STRIDE];
    for (size_t i = 0; i < sizeof pixels; i++) pixels[i] = (uint8_t)((i * 37) % 253);
    hdb_image face = {.data = pixels, .data_len = sizeof pixels, .width = W, .height = H, .stride = STRIDE,
                      .format = HDB_PIXEL_RGB8};

    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(NULL, &rt), HDB_STATUS_OK, "runtime");
    hdb_hypernet *net = NULL;
    CHECK_STATUS(hdb_hypernet_load(NULL, net_path, &net), HDB_STATUS_NULL_ARGUMENT, "load(NULL rt)");
    CHECK_STATUS(hdb_hypernet_load(rt, NULL, &net), HDB_STATUS_NULL_ARGUMENT, "load(NULL path)");
    CHECK_STATUS(hdb_hypernet_load(rt, net_path, NULL), HDB_STATUS_NULL_ARGUMENT, "load(NULL out)");
    CHECK_STATUS(hdb_hypernet_load(rt, dir, &net), HDB_STATUS_IO_ERROR, "load(a directory)");
    CHECK(net == NULL, "failed load leaves *out untouched");
    CHECK_STATUS(hdb_hypernet_load(rt, net_path, &net), HDB_STATUS_OK, "load the tiny hypernetwork");
    hdb_model *model = NULL, *wrong = NULL;
    CHECK_STATUS(hdb_model_load(rt, dir, NULL, &model), HDB_STATUS_OK, "model");
    CHECK_STATUS(hdb_model_load(rt, other, NULL, &wrong), HDB_STATUS_OK, "another model");

    hdb_predict_params p = hdb_predict_params_default();
    CHECK(p.struct_size == sizeof p && p.iterations == 0, "predict defaults");
    int calls = 0;
    p.progress = count_progress;
    p.progress_user_data = &calls;
    hdb_adapter *a = NULL;
    CHECK_STATUS(hdb_hypernet_predict(net, model, &face, &p, &a), HDB_STATUS_OK, "predict");
    CHECK(a != NULL && calls == 4, "an adapter, progress once per iteration (%d)", calls);
    CHECK_STATUS(hdb_adapter_save(a, saved), HDB_STATUS_OK, "save the predicted adapter");

    hdb_session *s = NULL;
    CHECK_STATUS(hdb_session_new(model, NULL, &s), HDB_STATUS_OK, "session");
    const hdb_adapter *set[1] = {a};
    CHECK_STATUS(hdb_session_set_adapters(s, set, NULL, 1, HDB_APPLY_MERGE), HDB_STATUS_OK,
                 "the predicted adapter loads straight into a session");

    hdb_adapter *b = NULL;
    p.progress = stop;
    CHECK_STATUS(hdb_hypernet_predict(net, model, &face, &p, &b), HDB_STATUS_CANCELLED, "cancel");
    CHECK(b == NULL, "cancelled: no adapter");
    p.progress = NULL;
    CHECK_STATUS(hdb_hypernet_predict(net, wrong, &face, &p, &b), HDB_STATUS_ADAPTER_MISMATCH,
                 "a model without the hypernetwork's layers");
    CHECK_MSG("unet.", "names a layer");

    hdb_image bad = face;
    bad.width = 8;
    bad.height = 8;
    CHECK_STATUS(hdb_hypernet_predict(net, model, &bad, &p, &b), HDB_STATUS_INVALID_ARGUMENT, "8x8 face");
    bad = face;
    bad.stride = W * 3 - 1;
    CHECK_STATUS(hdb_hypernet_predict(net, model, &bad, &p, &b), HDB_STATUS_INVALID_ARGUMENT, "short stride");
    CHECK_MSG("stride", "names stride");
    bad = face;
    bad.data_len = 100;
    CHECK_STATUS(hdb_hypernet_predict(net, model, &bad, &p, &b), HDB_STATUS_INVALID_ARGUMENT, "short buffer");
    bad = face;
    bad.data = NULL;
    CHECK_STATUS(hdb_hypernet_predict(net, model, &bad, &p, &b), HDB_STATUS_NULL_ARGUMENT, "NULL data");
    bad = face;
    bad.width = 0;
    CHECK_STATUS(hdb_hypernet_predict(net, model, &bad, &p, &b), HDB_STATUS_INVALID_ARGUMENT, "zero width");
    bad = face;
    bad.format = 9;
    CHECK_STATUS(hdb_hypernet_predict(net, model, &bad, &p, &b), HDB_STATUS_INVALID_ARGUMENT, "unknown format");
    CHECK_STATUS(hdb_hypernet_predict(NULL, model, &face, &p, &b), HDB_STATUS_NULL_ARGUMENT, "NULL hypernet");
    CHECK_STATUS(hdb_hypernet_predict(net, NULL, &face, &p, &b), HDB_STATUS_NULL_ARGUMENT, "NULL model");
    CHECK_STATUS(hdb_hypernet_predict(net, model, NULL, &p, &b), HDB_STATUS_NULL_ARGUMENT, "NULL face");
    CHECK_STATUS(hdb_hypernet_predict(net, model, &face, &p, NULL), HDB_STATUS_NULL_ARGUMENT, "NULL out");
    CHECK(b == NULL, "no adapter from any failure");

    hdb_session_free(s);
    hdb_adapter_free(a);
    hdb_hypernet_free(net);
    hdb_hypernet_free(NULL);
    hdb_model_free(model);
    hdb_model_free(wrong);
    hdb_runtime_free(rt);
    return test_done("hypernet");
}
