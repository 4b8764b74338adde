/*
 * hdb_adapter and the session's adapter set: loading from a file and from memory, saving,
 * merge and runtime modes, per-sample identities, and failures that leave the previous set
 * active. Numerical parity with diffusers + peft is tested in tests/adapter.rs.
 */
#include "common.h"

#include <math.h>

enum { B = 2, C = 4, H = 16, W = 16, L = 77, CTX = 16, N = B * C * H * W };

static float g_sample[N], g_ctx[B * L * CTX], g_t[B] = {981.0f, 1.0f};

static void unet(hdb_session *s, float *out, const char *what) {
    CHECK_STATUS(hdb_session_unet(s, g_sample, N, g_t, B, g_ctx, B * L * CTX, B, H, W, L, out, N),
                 HDB_STATUS_OK, "unet: %s", what);
}

static int same(const float *a, const float *b, size_t from, size_t to) {
    return memcmp(a + from, b + from, (to - from) * sizeof(float)) == 0;
}

/* max |a - b| over [from, to); infinite where either side is NaN or infinite (fmaxf would skip
 * a NaN, and an all-NaN output would pass). */
static float max_diff(const float *a, const float *b, size_t from, size_t to) {
    float worst = 0;
    for (size_t i = from; i < to; i++) {
        float d = isfinite(a[i]) && isfinite(b[i]) ? fabsf(a[i] - b[i]) : INFINITY;
        if (d > worst) worst = d;
    }
    return worst;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char dir[4096], id1p[4096], id2p[4096], kohya[4096], saved[4096], missing[4096];
    path_join(dir, sizeof dir, fixtures, "tiny-sd");
    path_join(id1p, sizeof id1p, fixtures, "adapter/id1.lidb.safetensors");
    path_join(id2p, sizeof id2p, fixtures, "adapter/id2.lidb.safetensors");
    path_join(kohya, sizeof kohya, fixtures, "adapter/id1.kohya.safetensors");
    path_join(saved, sizeof saved, work, "saved.safetensors");
    path_join(missing, sizeof missing, work, "missing.safetensors");
    uint32_t x = 7;
    for (size_t i = 0; i < N; i++) g_sample[i] = (float)((x = x * 1664525u + 1013904223u) >> 8) / (1u << 24) - 0.5f;
    for (size_t i = 0; i < B * L * CTX; i++) g_ctx[i] = (float)((x = x * 1664525u + 1013904223u) >> 8) / (1u << 24) - 0.5f;

    hdb_runtime *rt = NULL;
    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "runtime");
    hdb_model *model = NULL;
    CHECK_STATUS(hdb_model_load(rt, dir, NULL, &model), HDB_STATUS_OK, "model");

    /* Loading. */
    hdb_adapter *id1 = NULL, *id2 = NULL, *k1 = NULL, *mem = NULL, *back = NULL;
    CHECK_STATUS(hdb_adapter_load(model, id1p, &id1), HDB_STATUS_OK, "load id1 (LiDB)");
    CHECK_STATUS(hdb_adapter_load(model, id2p, &id2), HDB_STATUS_OK, "load id2 (LiDB rank 2)");
    CHECK_STATUS(hdb_adapter_load(model, kohya, &k1), HDB_STATUS_OK, "load id1 (kohya LoRA)");
    CHECK_STATUS(hdb_adapter_load(NULL, id1p, &mem), HDB_STATUS_NULL_ARGUMENT, "load(NULL model)");
    CHECK_MSG("'model'", "names 'model'");
    CHECK_STATUS(hdb_adapter_load(model, NULL, &mem), HDB_STATUS_NULL_ARGUMENT, "load(NULL path)");
    CHECK_STATUS(hdb_adapter_load(model, id1p, NULL), HDB_STATUS_NULL_ARGUMENT, "load(NULL out)");
    CHECK_STATUS(hdb_adapter_load(model, missing, &mem), HDB_STATUS_FILE_NOT_FOUND, "load(missing file)");
    CHECK_MSG("missing.safetensors", "names the file");
    CHECK(mem == NULL, "failed loads leave *out untouched");
    /* A LiDB file for another model: the tiny SD's own UNet weights are not an adapter. */
    char unet_weights[4096];
    path_join(unet_weights, sizeof unet_weights, fixtures, "tiny-sd/unet/diffusion_pytorch_model.safetensors");
    CHECK_STATUS(hdb_adapter_load(model, unet_weights, &mem), HDB_STATUS_INVALID_FILE, "load(a model file)");

    FILE *f = fopen(id1p, "rb");
    CHECK(f != NULL, "open id1 for reading");
    static uint8_t bytes[1 << 20];
    size_t len = fread(bytes, 1, sizeof bytes, f);
    fclose(f);
    CHECK(len > 0 && len < sizeof bytes, "read id1 (%zu bytes)", len);
    CHECK_STATUS(hdb_adapter_load_from_memory(model, NULL, len, &mem), HDB_STATUS_NULL_ARGUMENT, "from_memory(NULL)");
    CHECK_MSG("'bytes'", "names 'bytes'");
    CHECK_STATUS(hdb_adapter_load_from_memory(model, bytes, len / 2, &mem), HDB_STATUS_INVALID_FILE,
                 "from_memory(truncated)");
    CHECK_STATUS(hdb_adapter_load_from_memory(model, bytes, len, &mem), HDB_STATUS_OK, "from_memory(id1)");
    CHECK_STATUS(hdb_adapter_save(mem, saved), HDB_STATUS_OK, "save");
    CHECK_STATUS(hdb_adapter_save(NULL, saved), HDB_STATUS_NULL_ARGUMENT, "save(NULL adapter)");
    CHECK_STATUS(hdb_adapter_save(mem, NULL), HDB_STATUS_NULL_ARGUMENT, "save(NULL path)");
    CHECK_STATUS(hdb_adapter_load(model, saved, &back), HDB_STATUS_OK, "reload the saved adapter");

    /* Outputs. */
    static float base[N], a1[N], a1r[N], k1o[N], memo[N], backo[N], mix[N], tmp[N];
    hdb_session *s = NULL;
    CHECK_STATUS(hdb_session_new(model, NULL, &s), HDB_STATUS_OK, "session");
    unet(s, base, "no adapters");
    const hdb_adapter *one[1] = {id1};
    CHECK_STATUS(hdb_session_set_adapters(s, one, NULL, 1, HDB_APPLY_MERGE), HDB_STATUS_OK, "set id1 merge");
    unet(s, a1, "id1 merge");
    CHECK(!same(a1, base, 0, N), "the adapter changes the output");
    CHECK_STATUS(hdb_session_set_adapters(s, one, NULL, 1, HDB_APPLY_RUNTIME), HDB_STATUS_OK, "set id1 runtime");
    unet(s, a1r, "id1 runtime");
    float worst = max_diff(a1, a1r, 0, N);
    CHECK(worst < 1e-5f, "merge and runtime agree (max diff %g)", worst);
    const hdb_adapter *kk[1] = {k1};
    CHECK_STATUS(hdb_session_set_adapters(s, kk, NULL, 1, HDB_APPLY_MERGE), HDB_STATUS_OK, "set kohya id1");
    unet(s, k1o, "kohya id1");
    const hdb_adapter *mm[2] = {mem, back};
    float half[2] = {0.5f, 0.5f};
    CHECK_STATUS(hdb_session_set_adapters(s, mm, half, 2, HDB_APPLY_MERGE), HDB_STATUS_OK, "set 0.5 mem + 0.5 saved");
    unet(s, memo, "0.5 x id1 (memory) + 0.5 x id1 (saved)");
    worst = fmaxf(max_diff(k1o, a1, 0, N), max_diff(memo, a1, 0, N));
    CHECK(worst < 1e-5f, "kohya, memory and saved copies of id1 all give id1's output (max diff %g)", worst);
    (void)backo;

    /* Back to no adapter: the base, bit for bit. */
    CHECK_STATUS(hdb_session_set_adapters(s, NULL, NULL, 0, HDB_APPLY_MERGE), HDB_STATUS_OK, "clear");
    unet(s, tmp, "cleared");
    CHECK(same(tmp, base, 0, N), "clearing restores the base output bit for bit");

    /* Per-sample identities: sample 0 none, sample 1 id1. */
    CHECK_STATUS(hdb_session_set_adapters(s, one, NULL, 1, HDB_APPLY_RUNTIME), HDB_STATUS_OK, "set id1 runtime");
    int32_t idx[2] = {-1, 0};
    CHECK_STATUS(hdb_session_set_sample_adapters(s, idx, 2), HDB_STATUS_OK, "per-sample [-1, 0]");
    unet(s, mix, "per-sample");
    worst = fmaxf(max_diff(mix, base, 0, N / 2), max_diff(mix, a1r, N / 2, N));
    CHECK(worst < 1e-5f, "per-sample output equals the base for sample 0 and id1 for sample 1 (max diff %g)", worst);
    int32_t bad_idx[2] = {0, 3};
    CHECK_STATUS(hdb_session_set_sample_adapters(s, bad_idx, 2), HDB_STATUS_INVALID_ARGUMENT, "index out of range");
    CHECK_MSG("adapter_index", "names adapter_index");
    CHECK_STATUS(hdb_session_set_sample_adapters(NULL, idx, 2), HDB_STATUS_NULL_ARGUMENT, "NULL session");

    /* Failed changes keep the previous set (and its per-sample indices). */
    const hdb_adapter *with_null[2] = {id1, NULL};
    CHECK_STATUS(hdb_session_set_adapters(s, with_null, NULL, 2, HDB_APPLY_MERGE), HDB_STATUS_NULL_ARGUMENT,
                 "a NULL adapter in the list");
    CHECK_MSG("adapters[1]", "names adapters[1]");
    CHECK_STATUS(hdb_session_set_adapters(s, one, NULL, 1, 7), HDB_STATUS_INVALID_ARGUMENT, "mode 7");
    float nan_scale[1] = {NAN};
    CHECK_STATUS(hdb_session_set_adapters(s, one, nan_scale, 1, HDB_APPLY_MERGE), HDB_STATUS_INVALID_ARGUMENT,
                 "NaN scale");
    CHECK_STATUS(hdb_session_set_adapters(s, NULL, NULL, 1, HDB_APPLY_MERGE), HDB_STATUS_NULL_ARGUMENT,
                 "NULL list with n = 1");
    CHECK_STATUS(hdb_session_set_adapters(NULL, one, NULL, 1, HDB_APPLY_MERGE), HDB_STATUS_NULL_ARGUMENT,
                 "NULL session");
    CHECK_MSG("'session'", "names 'session'");
    unet(s, tmp, "after failed changes");
    CHECK(same(tmp, mix, 0, N), "failed changes left the previous set and indices active");

    /* The session keeps its adapters after the handles are freed. */
    hdb_adapter_free(id1);
    hdb_adapter_free(id2);
    hdb_adapter_free(k1);
    hdb_adapter_free(mem);
    hdb_adapter_free(back);
    hdb_adapter_free(NULL);
    unet(s, tmp, "after freeing the adapters");
    CHECK(same(tmp, mix, 0, N), "same output after freeing the adapter handles");
    hdb_session_free(s);
    hdb_model_free(model);
    hdb_runtime_free(rt);
    return test_done("adapter");
}
