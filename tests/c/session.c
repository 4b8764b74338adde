/*
 * hdb_session: creation, one UNet evaluation on caller buffers (tiny SD fixture), argument
 * checks naming the argument, and a session that outlives its model handle.
 * Numerical parity with diffusers is tested in tests/unet_parity.rs on the same code path.
 */
#include "common.h"

#include <math.h>

enum { B = 1, C = 4, H = 16, W = 16, L = 77, CTX = 16 };

static float g_sample[B * C * H * W], g_ctx[B * L * CTX], g_t[B] = {500.0f};
static float g_out[B * C * H * W], g_out2[B * C * H * W];

static hdb_status unet(hdb_session *s, float *out, size_t out_len) {
    return hdb_session_unet(s, g_sample, B * C * H * W, g_t, B, g_ctx, B * L * CTX, B, H, W, L, out, out_len);
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char dir[4096];
    path_join(dir, sizeof dir, fixtures, "tiny-sd");
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof g_sample / sizeof g_sample[0]; i++) {
        x = x * 1664525u + 1013904223u;
        g_sample[i] = (float)(x >> 8) / (float)(1u << 24) - 0.5f;
    }
    for (size_t i = 0; i < sizeof g_ctx / sizeof g_ctx[0]; i++) {
        x = x * 1664525u + 1013904223u;
        g_ctx[i] = (float)(x >> 8) / (float)(1u << 24) - 0.5f;
    }

    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    rp.num_threads = 2;
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "runtime");
    hdb_model *model = NULL;
    CHECK_STATUS(hdb_model_load(rt, dir, NULL, &model), HDB_STATUS_OK, "load tiny-sd");

    hdb_session_params sp = hdb_session_params_default();
    CHECK(sp.struct_size == sizeof sp, "session params default struct_size");
    hdb_session *s = NULL;
    CHECK_STATUS(hdb_session_new(NULL, &sp, &s), HDB_STATUS_NULL_ARGUMENT, "session_new(NULL model)");
    CHECK_MSG("'model'", "session_new names 'model'");
    CHECK_STATUS(hdb_session_new(model, &sp, NULL), HDB_STATUS_NULL_ARGUMENT, "session_new(NULL out)");
    CHECK_MSG("'out'", "session_new names 'out'");
    sp.struct_size = 2;
    CHECK_STATUS(hdb_session_new(model, &sp, &s), HDB_STATUS_INVALID_ARGUMENT, "session_new(struct_size 2)");
    CHECK(s == NULL, "session_new failure leaves *out untouched");
    CHECK_STATUS(hdb_session_new(model, NULL, &s), HDB_STATUS_OK, "session_new(NULL params)");

    const size_t n = B * C * H * W;
    CHECK_STATUS(unet(s, g_out, n), HDB_STATUS_OK, "unet on tiny-sd");
    int finite = 1;
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        finite &= isfinite(g_out[i]);
        sum += fabs(g_out[i]);
    }
    CHECK(finite && sum > 0, "unet output finite and non-zero (mean |out| %g)", sum / n);
    CHECK_STATUS(unet(s, g_out2, n), HDB_STATUS_OK, "unet again");
    CHECK(memcmp(g_out, g_out2, sizeof g_out) == 0, "two evaluations are bit-identical");

    /* NULL buffers and wrong lengths name the argument. */
    CHECK_STATUS(hdb_session_unet(NULL, g_sample, n, g_t, B, g_ctx, B * L * CTX, B, H, W, L, g_out, n),
                 HDB_STATUS_NULL_ARGUMENT, "unet(NULL session)");
    CHECK_MSG("'session'", "names 'session'");
    CHECK_STATUS(hdb_session_unet(s, NULL, n, g_t, B, g_ctx, B * L * CTX, B, H, W, L, g_out, n),
                 HDB_STATUS_NULL_ARGUMENT, "unet(NULL sample)");
    CHECK_MSG("'sample'", "names 'sample'");
    CHECK_STATUS(hdb_session_unet(s, g_sample, n, NULL, B, g_ctx, B * L * CTX, B, H, W, L, g_out, n),
                 HDB_STATUS_NULL_ARGUMENT, "unet(NULL timesteps)");
    CHECK_MSG("'timesteps'", "names 'timesteps'");
    CHECK_STATUS(hdb_session_unet(s, g_sample, n, g_t, B, NULL, B * L * CTX, B, H, W, L, g_out, n),
                 HDB_STATUS_NULL_ARGUMENT, "unet(NULL context)");
    CHECK_MSG("'context'", "names 'context'");
    CHECK_STATUS(hdb_session_unet(s, g_sample, n, g_t, B, g_ctx, B * L * CTX, B, H, W, L, NULL, n),
                 HDB_STATUS_NULL_ARGUMENT, "unet(NULL out)");
    CHECK_MSG("'out'", "names 'out'");
    CHECK_STATUS(hdb_session_unet(s, g_sample, n - 1, g_t, B, g_ctx, B * L * CTX, B, H, W, L, g_out, n),
                 HDB_STATUS_INVALID_ARGUMENT, "unet(sample_len short)");
    CHECK_MSG("'sample'", "names 'sample'");
    CHECK_MSG("[1, 4, 16, 16]", "gives the expected shape");
    CHECK_STATUS(hdb_session_unet(s, g_sample, n, g_t, B, g_ctx, B * L * CTX - 1, B, H, W, L, g_out, n),
                 HDB_STATUS_INVALID_ARGUMENT, "unet(context_len short)");
    CHECK_MSG("'encoder_hidden_states'", "names the context");
    CHECK_STATUS(hdb_session_unet(s, g_sample, n, g_t, B, g_ctx, B * L * CTX, B, H, W, L, g_out, n - 1),
                 HDB_STATUS_INVALID_ARGUMENT, "unet(out_len short)");
    CHECK_MSG("'out_len'", "names 'out_len'");
    CHECK_STATUS(hdb_session_unet(s, g_sample, n, g_t, B, g_ctx, B * L * CTX, B, 15, 17, L, g_out, 15 * 17 * C),
                 HDB_STATUS_INVALID_ARGUMENT, "unet(15x17 with a 16x16 sample_len)");
    /* Any latent size works, as in diffusers (upsamplers take their skips' sizes). */
    CHECK_STATUS(hdb_session_unet(s, g_sample, B * C * 15 * 17, g_t, B, g_ctx, B * L * CTX, B, 15, 17, L, g_out2,
                                  B * C * 15 * 17),
                 HDB_STATUS_OK, "unet(15x17): sizes that are not multiples of the downsampling");
    CHECK_STATUS(hdb_session_unet(s, g_sample, 0, g_t, 0, g_ctx, 0, 0, H, W, L, g_out, 0),
                 HDB_STATUS_INVALID_ARGUMENT, "unet(batch 0)");

    /* The session keeps the model alive after the model handle is freed. */
    hdb_model_free(model);
    hdb_runtime_free(rt);
    memset(g_out2, 0, sizeof g_out2);
    CHECK_STATUS(unet(s, g_out2, n), HDB_STATUS_OK, "unet after the model and runtime handles were freed");
    CHECK(memcmp(g_out, g_out2, sizeof g_out) == 0, "same result after freeing the handles");
    hdb_session_free(s);
    hdb_session_free(NULL);
    return test_done("session");
}
