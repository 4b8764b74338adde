#include "shims.h"

#include "_cgo_export.h"

#define HDBGO_CALL(call)                                                   \
    do {                                                                   \
        hdb_status hdbgo_s_ = (call);                                      \
        if (hdbgo_s_ != HDB_STATUS_OK) e->len = hdb_last_error_copy(e->msg, sizeof e->msg); \
        return hdbgo_s_;                                                   \
    } while (0)

/* Trampolines: the Go side recovers panics, so nothing unwinds into hdb. */
static bool progress_tramp(void *ud, uint64_t done, uint64_t total, const char *stage) {
    return hdbgoProgress((uintptr_t)ud, done, total, (char *)stage) != 0;
}
static bool train_tramp(void *ud, uint64_t step, uint64_t steps, float loss) {
    return hdbgoTrainProgress((uintptr_t)ud, step, steps, loss) != 0;
}
static void log_tramp(void *ud, hdb_log_level level, const char *target, const char *msg) {
    hdbgoLog((uintptr_t)ud, level, (char *)target, (char *)msg);
}
static void log_free(void *ud) { hdbgoDeleteHandle((uintptr_t)ud); }

hdb_status hdbgo_runtime_new(const hdb_runtime_params *p, hdb_runtime **out, hdbgo_err *e) {
    HDBGO_CALL(hdb_runtime_new(p, out));
}
hdb_status hdbgo_runtime_get_info(const hdb_runtime *rt, hdb_runtime_info *out, hdbgo_err *e) {
    HDBGO_CALL(hdb_runtime_get_info(rt, out));
}
hdb_status hdbgo_model_load(hdb_runtime *rt, const char *path, hdb_model_params *p, uintptr_t progress,
                            hdb_model **out, hdbgo_err *e) {
    if (progress) {
        p->progress = progress_tramp;
        p->progress_user_data = (void *)progress;
    }
    HDBGO_CALL(hdb_model_load(rt, path, p, out));
}
hdb_status hdbgo_model_load_from_memory(hdb_runtime *rt, const uint8_t *bytes, size_t len, const char *name,
                                       hdb_model_params *p, uintptr_t progress, hdb_model **out, hdbgo_err *e) {
    if (progress) {
        p->progress = progress_tramp;
        p->progress_user_data = (void *)progress;
    }
    HDBGO_CALL(hdb_model_load_from_memory(rt, bytes, len, name, p, out));
}
hdb_status hdbgo_model_get_info(const hdb_model *m, hdb_model_info *out, hdbgo_err *e) {
    HDBGO_CALL(hdb_model_get_info(m, out));
}
hdb_status hdbgo_model_describe(const hdb_model *m, char *buf, size_t len, size_t *needed, hdbgo_err *e) {
    HDBGO_CALL(hdb_model_describe(m, buf, len, needed));
}
hdb_status hdbgo_adapter_load(const hdb_model *m, const char *path, hdb_adapter **out, hdbgo_err *e) {
    HDBGO_CALL(hdb_adapter_load(m, path, out));
}
hdb_status hdbgo_adapter_load_ex(const hdb_model *m, const char *path, const hdb_adapter_load_params *p,
                                 hdb_adapter **out, hdbgo_err *e) {
    HDBGO_CALL(hdb_adapter_load_ex(m, path, p, out));
}
hdb_status hdbgo_adapter_load_from_memory(const hdb_model *m, const uint8_t *bytes, size_t len, hdb_adapter **out,
                                          hdbgo_err *e) {
    HDBGO_CALL(hdb_adapter_load_from_memory(m, bytes, len, out));
}
hdb_status hdbgo_adapter_save(const hdb_adapter *a, const char *path, hdbgo_err *e) {
    HDBGO_CALL(hdb_adapter_save(a, path));
}
hdb_status hdbgo_hypernet_load(hdb_runtime *rt, const char *path, hdb_hypernet **out, hdbgo_err *e) {
    HDBGO_CALL(hdb_hypernet_load(rt, path, out));
}
hdb_status hdbgo_hypernet_predict(const hdb_hypernet *h, const hdb_model *m, const hdb_image *face,
                                  hdb_predict_params *p, uintptr_t progress, hdb_adapter **out, hdbgo_err *e) {
    if (progress) {
        p->progress = progress_tramp;
        p->progress_user_data = (void *)progress;
    }
    HDBGO_CALL(hdb_hypernet_predict(h, m, face, p, out));
}
hdb_status hdbgo_finetune(const hdb_model *m, const hdb_image *face, const hdb_adapter *start,
                          hdb_finetune_params *p, uintptr_t progress, hdb_adapter **out, hdbgo_err *e) {
    if (progress) {
        p->progress = train_tramp;
        p->progress_user_data = (void *)progress;
    }
    HDBGO_CALL(hdb_finetune(m, face, start, p, out));
}
hdb_status hdbgo_personalize(const hdb_hypernet *h, const hdb_model *m, const hdb_image *face,
                             hdb_predict_params *pp, uintptr_t predict_progress, hdb_finetune_params *fp,
                             uintptr_t train_progress, hdb_adapter **out, hdbgo_err *e) {
    if (predict_progress) {
        pp->progress = progress_tramp;
        pp->progress_user_data = (void *)predict_progress;
    }
    if (train_progress) {
        fp->progress = train_tramp;
        fp->progress_user_data = (void *)train_progress;
    }
    HDBGO_CALL(hdb_personalize(h, m, face, pp, fp, out));
}
hdb_status hdbgo_session_new(const hdb_model *m, const hdb_session_params *p, hdb_session **out, hdbgo_err *e) {
    HDBGO_CALL(hdb_session_new(m, p, out));
}
hdb_status hdbgo_session_set_adapters(hdb_session *s, const hdb_adapter *const *a, const float *scales, size_t n,
                                      hdb_apply_mode mode, hdbgo_err *e) {
    HDBGO_CALL(hdb_session_set_adapters(s, a, scales, n, mode));
}
hdb_status hdbgo_session_set_sample_adapters(hdb_session *s, const int32_t *idx, size_t n, hdbgo_err *e) {
    HDBGO_CALL(hdb_session_set_sample_adapters(s, idx, n));
}
hdb_status hdbgo_generate(hdb_session *s, hdb_generate_params *p, uintptr_t progress, hdb_image *out, size_t n,
                          hdbgo_err *e) {
    if (progress) {
        p->progress = progress_tramp;
        p->progress_user_data = (void *)progress;
    }
    HDBGO_CALL(hdb_generate(s, p, out, n));
}
hdb_status hdbgo_session_unet(hdb_session *s, const float *sample, size_t sample_len, const float *t, size_t t_len,
                              const float *ctx, size_t ctx_len, uint32_t batch, uint32_t h, uint32_t w,
                              uint32_t tokens, float *out, size_t out_len, hdbgo_err *e) {
    HDBGO_CALL(hdb_session_unet(s, sample, sample_len, t, t_len, ctx, ctx_len, batch, h, w, tokens, out, out_len));
}
hdb_status hdbgo_set_log_callback(uintptr_t handle, hdb_log_level max_level, hdbgo_err *e) {
    if (handle == 0) HDBGO_CALL(hdb_set_log_callback_ex(NULL, NULL, NULL, HDB_LOG_LEVEL_OFF));
    HDBGO_CALL(hdb_set_log_callback_ex(log_tramp, (void *)handle, log_free, max_level));
}
