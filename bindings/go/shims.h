/* C shims of the Go binding: each calls one hdb function and, when it fails, copies the
 * calling thread's message into `e` inside the same C call (hdb.h's rule: a goroutine may
 * run on another OS thread by its next cgo call, so the message cannot be read in a second
 * call). Callbacks are Go functions exported from callbacks.go, reached through cgo.Handle
 * values passed as the C user data. */
#ifndef HDB_GO_SHIMS_H
#define HDB_GO_SHIMS_H

#include <stdint.h>
#include <stdlib.h>

#include "hdb.h"

typedef struct {
    char msg[2048];
    size_t len; /* the message's full length (may exceed sizeof msg - 1: truncated) */
} hdbgo_err;

hdb_status hdbgo_runtime_new(const hdb_runtime_params *p, hdb_runtime **out, hdbgo_err *e);
hdb_status hdbgo_runtime_get_info(const hdb_runtime *rt, hdb_runtime_info *out, hdbgo_err *e);
hdb_status hdbgo_model_load(hdb_runtime *rt, const char *path, hdb_model_params *p, uintptr_t progress,
                            hdb_model **out, hdbgo_err *e);
hdb_status hdbgo_model_load_from_memory(hdb_runtime *rt, const uint8_t *bytes, size_t len, const char *name,
                                       hdb_model_params *p, uintptr_t progress, hdb_model **out, hdbgo_err *e);
hdb_status hdbgo_model_get_info(const hdb_model *m, hdb_model_info *out, hdbgo_err *e);
hdb_status hdbgo_model_describe(const hdb_model *m, char *buf, size_t len, size_t *needed, hdbgo_err *e);
hdb_status hdbgo_adapter_load(const hdb_model *m, const char *path, hdb_adapter **out, hdbgo_err *e);
hdb_status hdbgo_adapter_load_ex(const hdb_model *m, const char *path, const hdb_adapter_load_params *p,
                                 hdb_adapter **out, hdbgo_err *e);
hdb_status hdbgo_adapter_load_from_memory(const hdb_model *m, const uint8_t *bytes, size_t len, hdb_adapter **out,
                                          hdbgo_err *e);
hdb_status hdbgo_adapter_save(const hdb_adapter *a, const char *path, hdbgo_err *e);
hdb_status hdbgo_hypernet_load(hdb_runtime *rt, const char *path, hdb_hypernet **out, hdbgo_err *e);
hdb_status hdbgo_hypernet_predict(const hdb_hypernet *h, const hdb_model *m, const hdb_image *face,
                                  hdb_predict_params *p, uintptr_t progress, hdb_adapter **out, hdbgo_err *e);
hdb_status hdbgo_finetune(const hdb_model *m, const hdb_image *face, const hdb_adapter *start,
                          hdb_finetune_params *p, uintptr_t progress, hdb_adapter **out, hdbgo_err *e);
hdb_status hdbgo_personalize(const hdb_hypernet *h, const hdb_model *m, const hdb_image *face,
                             hdb_predict_params *pp, uintptr_t predict_progress, hdb_finetune_params *fp,
                             uintptr_t train_progress, hdb_adapter **out, hdbgo_err *e);
hdb_status hdbgo_session_new(const hdb_model *m, const hdb_session_params *p, hdb_session **out, hdbgo_err *e);
hdb_status hdbgo_session_set_adapters(hdb_session *s, const hdb_adapter *const *a, const float *scales, size_t n,
                                      hdb_apply_mode mode, hdbgo_err *e);
hdb_status hdbgo_session_set_sample_adapters(hdb_session *s, const int32_t *idx, size_t n, hdbgo_err *e);
hdb_status hdbgo_generate(hdb_session *s, hdb_generate_params *p, uintptr_t progress, hdb_image *out, size_t n,
                          hdbgo_err *e);
hdb_status hdbgo_session_unet(hdb_session *s, const float *sample, size_t sample_len, const float *t, size_t t_len,
                              const float *ctx, size_t ctx_len, uint32_t batch, uint32_t h, uint32_t w,
                              uint32_t tokens, float *out, size_t out_len, hdbgo_err *e);
/* handle 0 (with level OFF) removes the callback; hdb frees the handle through Go. */
hdb_status hdbgo_set_log_callback(uintptr_t handle, hdb_log_level max_level, hdbgo_err *e);

#endif
