/*
 * Loading the tiny SD 1.x fixtures (tests/fixtures/tiny-sd/ and tiny-sd-ldm.safetensors):
 * model info, describe, progress and cancellation, weight variants, lifetimes, threads.
 * The fixtures are required: a missing one is a failure, not a skip.
 */
#include "common.h"


static char sentinel_storage;
#define SENTINEL ((hdb_model *)(void *)&sentinel_storage)

typedef struct {
    int calls;
    int cancel_at; /* return false on this call (1-based); 0 = never */
    uint64_t last_done, last_total;
    bool monotonic, stage_ok, bounds_ok;
} progress_ctx;

static bool on_progress(void *ud, uint64_t done, uint64_t total, const char *stage) {
    progress_ctx *c = ud;
    c->calls++;
    if (done < c->last_done || (c->last_total != 0 && total != c->last_total)) c->monotonic = false;
    if (stage == NULL || strcmp(stage, "load") != 0) c->stage_ok = false;
    if (done == 0 || done > total) c->bounds_ok = false;
    c->last_done = done;
    c->last_total = total;
    return c->cancel_at == 0 || c->calls < c->cancel_at;
}

static progress_ctx new_ctx(int cancel_at) {
    progress_ctx c = {0, cancel_at, 0, 0, true, true, true};
    return c;
}

static void require_file(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr,
                "FAIL: fixture %s is missing (%s); generate it with tools/make_io_fixtures.py\n",
                path, strerror(errno));
        _Exit(1);
    }
}

static hdb_model *load(hdb_runtime *rt, const char *path, const hdb_model_params *p, const char *what) {
    hdb_model *m = NULL;
    CHECK_STATUS(hdb_model_load(rt, path, p, &m), HDB_STATUS_OK, "load %s (%s)", what, path);
    CHECK(m != NULL && m != SENTINEL, "load %s wrote a model", what);
    return m;
}

static hdb_model_info info_of(const hdb_model *m, const char *what) {
    hdb_model_info i;
    memset(&i, 0xCD, sizeof i);
    i.struct_size = sizeof i;
    CHECK_STATUS(hdb_model_get_info(m, &i), HDB_STATUS_OK, "hdb_model_get_info(%s)", what);
    CHECK(i.struct_size == sizeof i, "%s: struct_size kept", what);
    return i;
}

static void check_component(const hdb_component_info *c, const char *model, const char *name, hdb_dtype dtype) {
    CHECK(c->present == 1, "%s: %s present", model, name);
    CHECK(c->tensor_count > 0, "%s: %s has %llu tensors", model, name, (unsigned long long)c->tensor_count);
    CHECK(c->parameter_count >= c->tensor_count, "%s: %s has %llu parameters", model, name,
          (unsigned long long)c->parameter_count);
    CHECK(c->dtype == dtype, "%s: %s dtype %u == %u", model, name, c->dtype, dtype);
}

static void check_same_counts(const hdb_component_info *a, const hdb_component_info *b, const char *what) {
    CHECK(a->parameter_count == b->parameter_count, "%s: parameter counts equal (%llu == %llu)", what,
          (unsigned long long)a->parameter_count, (unsigned long long)b->parameter_count);
    CHECK(a->tensor_count == b->tensor_count, "%s: tensor counts equal (%llu == %llu)", what,
          (unsigned long long)a->tensor_count, (unsigned long long)b->tensor_count);
}

/* The JSON description: size query, too-small buffer, fill. */
static void check_describe(const hdb_model *m, const char *what, const char *expect_format, const char *path) {
    size_t needed = 0;
    CHECK_STATUS(hdb_model_describe(m, NULL, 0, &needed), HDB_STATUS_BUFFER_TOO_SMALL, "%s: describe size query", what);
    CHECK(needed > 2, "%s: describe needs %zu bytes", what, needed);
    char *buf = malloc(needed + 8);
    CHECK(buf != NULL, "malloc");
    memset(buf, '#', needed + 8);
    size_t needed2 = 0;
    CHECK_STATUS(hdb_model_describe(m, buf, needed - 1, &needed2), HDB_STATUS_BUFFER_TOO_SMALL,
                 "%s: describe into needed-1 bytes -> BUFFER_TOO_SMALL", what);
    CHECK(needed2 == needed, "%s: too-small call reports the same size", what);
    CHECK(buf[0] == '#' && buf[needed - 2] == '#', "%s: too-small buffer left untouched", what);
    CHECK_MSG("buffer", "%s: BUFFER_TOO_SMALL message says so", what);
    needed2 = 0;
    CHECK_STATUS(hdb_model_describe(m, buf, needed, &needed2), HDB_STATUS_OK, "%s: describe fills %zu bytes", what, needed);
    CHECK(needed2 == needed, "%s: *needed on success == size (%zu)", what, needed2);
    CHECK(buf[needed - 1] == '\0' && strlen(buf) == needed - 1, "%s: NUL at needed-1", what);
    CHECK(buf[needed] == '#', "%s: nothing written past needed", what);
    CHECK(utf8_valid(buf), "%s: description is UTF-8", what);
    CHECK(buf[0] == '{' && buf[needed - 2] == '}', "%s: description is a JSON object", what);
    CHECK(strstr(buf, expect_format) != NULL, "%s: description has format %s", what, expect_format);
    CHECK(strstr(buf, path) != NULL, "%s: description has the path", what);
    CHECK(strstr(buf, "\"unet\"") && strstr(buf, "\"text_encoder\"") && strstr(buf, "\"vae\""),
          "%s: description lists unet, text_encoder, vae", what);
    printf("  %s description: %s\n", what, buf);
    free(buf);
}

/* Field by field: the struct has padding (after has_tokenizer), whose bytes mean nothing. */
static bool component_equal(const hdb_component_info *a, const hdb_component_info *b) {
    return a->present == b->present && a->dtype == b->dtype && a->tensor_count == b->tensor_count &&
           a->parameter_count == b->parameter_count;
}

static bool info_equal(const hdb_model_info *a, const hdb_model_info *b) {
    return a->struct_size == b->struct_size && a->architecture == b->architecture &&
           a->source_format == b->source_format && a->cross_attention_dim == b->cross_attention_dim &&
           a->has_tokenizer == b->has_tokenizer && component_equal(&a->unet, &b->unet) &&
           component_equal(&a->text_encoder, &b->text_encoder) && component_equal(&a->vae, &b->vae);
}

typedef struct {
    const hdb_model *model;
    hdb_model_info expect;
    int failures;
} thread_arg;

static void *reader(void *p) {
    thread_arg *a = p;
    for (int i = 0; i < 50; i++) {
        hdb_model_info info;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        size_t needed = 0;
        if (hdb_model_get_info(a->model, &info) != HDB_STATUS_OK || !info_equal(&info, &a->expect) ||
            hdb_model_describe(a->model, NULL, 0, &needed) != HDB_STATUS_BUFFER_TOO_SMALL || needed == 0) {
            a->failures++;
        }
    }
    return NULL;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char dir[4096], ldm[4096], idx[4096];
    path_join(dir, sizeof dir, fixtures, "tiny-sd");
    path_join(ldm, sizeof ldm, fixtures, "tiny-sd-ldm.safetensors");
    path_join(idx, sizeof idx, dir, "model_index.json");
    require_file(idx);
    require_file(ldm);

    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    rp.num_threads = 2;
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "runtime cpu/2");

    /* Diffusers folder, default params plus a progress callback. */
    hdb_model_params mp = hdb_model_params_default();
    CHECK(mp.struct_size == sizeof mp && mp.weights_variant == HDB_WEIGHTS_AUTO && mp.progress == NULL &&
              mp.progress_user_data == NULL,
          "hdb_model_params_default(): size, AUTO, no callback");
    progress_ctx pc = new_ctx(0);
    mp.progress = on_progress;
    mp.progress_user_data = &pc;
    hdb_model *dm = load(rt, dir, &mp, "diffusers folder");
    CHECK(pc.calls >= 3, "progress called %d times (>= one per component file)", pc.calls);
    CHECK(pc.monotonic && pc.bounds_ok && pc.stage_ok, "progress: done rises to total, stage \"load\"");
    CHECK(pc.last_done == pc.last_total, "progress: last call has done == total (%llu)", (unsigned long long)pc.last_total);

    hdb_model_info di = info_of(dm, "diffusers");
    CHECK(di.architecture == HDB_ARCH_SD1, "diffusers: architecture SD1 (%u)", di.architecture);
    CHECK(di.source_format == HDB_FORMAT_DIFFUSERS, "diffusers: format DIFFUSERS (%u)", di.source_format);
    CHECK(di.has_tokenizer == 1, "diffusers: tokenizer found");
    CHECK(di.cross_attention_dim > 0, "diffusers: cross_attention_dim %u > 0", di.cross_attention_dim);
    check_component(&di.unet, "diffusers", "unet", HDB_DTYPE_F32);
    check_component(&di.text_encoder, "diffusers", "text_encoder", HDB_DTYPE_F32);
    check_component(&di.vae, "diffusers", "vae", HDB_DTYPE_F32);
    check_describe(dm, "diffusers", "\"diffusers\"", dir);

    /* LDM single file. */
    pc = new_ctx(0);
    hdb_model *lm = load(rt, ldm, &mp, "LDM single file");
    CHECK(pc.calls >= 1 && pc.last_done == pc.last_total && pc.stage_ok, "LDM: progress called %d times", pc.calls);
    hdb_model_info li = info_of(lm, "ldm");
    CHECK(li.architecture == HDB_ARCH_SD1, "ldm: architecture SD1 (%u)", li.architecture);
    CHECK(li.source_format == HDB_FORMAT_LDM_SINGLE_FILE, "ldm: format LDM_SINGLE_FILE (%u)", li.source_format);
    CHECK(li.has_tokenizer == 0, "ldm: no tokenizer");
    CHECK(li.cross_attention_dim == di.cross_attention_dim, "ldm: cross_attention_dim %u == diffusers'", li.cross_attention_dim);
    check_component(&li.unet, "ldm", "unet", HDB_DTYPE_F32);
    check_component(&li.text_encoder, "ldm", "text_encoder", HDB_DTYPE_F32);
    check_component(&li.vae, "ldm", "vae", HDB_DTYPE_F32);
    check_same_counts(&di.unet, &li.unet, "unet diffusers vs ldm");
    check_same_counts(&di.text_encoder, &li.text_encoder, "text_encoder diffusers vs ldm");
    check_same_counts(&di.vae, &li.vae, "vae diffusers vs ldm");
    check_describe(lm, "ldm", "\"ldm-single-file\"", ldm);

    /* A struct_size that is no released version's size is refused, the struct untouched. */
    hdb_model_info old;
    memset(&old, 0xEE, sizeof old);
    old.struct_size = (uint32_t)offsetof(hdb_model_info, unet) + 4;
    CHECK_STATUS(hdb_model_get_info(dm, &old), HDB_STATUS_INVALID_ARGUMENT,
                 "get_info with struct_size ending inside a field");
    CHECK(old.architecture == 0xEEEEEEEEu, "odd struct_size: untouched");
    /* No padding byte is left uninitialised: reserved0 is written as 0. */
    hdb_model_info full;
    memset(&full, 0xEE, sizeof full);
    full.struct_size = sizeof full;
    CHECK_STATUS(hdb_model_get_info(dm, &full), HDB_STATUS_OK, "get_info full size");
    CHECK(full.reserved0 == 0, "reserved0 is 0");
    hdb_model_info bad;
    memset(&bad, 0xEE, sizeof bad);
    bad.struct_size = 0;
    CHECK_STATUS(hdb_model_get_info(dm, &bad), HDB_STATUS_INVALID_ARGUMENT, "get_info with struct_size 0");
    CHECK(bad.architecture == 0xEEEEEEEEu, "get_info struct_size 0: untouched");

    /* Cancellation: on the first call, and part-way. */
    const char *cancel_paths[] = {dir, ldm};
    for (int k = 0; k < 2; k++) {
        for (int at = 1; at <= (k == 0 ? 2 : 1); at++) {
            pc = new_ctx(at);
            hdb_model *m = SENTINEL;
            CHECK_STATUS(hdb_model_load(rt, cancel_paths[k], &mp, &m), HDB_STATUS_CANCELLED,
                         "%s: progress returning false on call %d -> CANCELLED", cancel_paths[k], at);
            CHECK(m == SENTINEL, "cancelled load left *out untouched");
            CHECK(pc.calls == at, "no progress call after the cancelling one (%d calls)", pc.calls);
            CHECK(last_error_nonempty(), "cancelled load has a message");
        }
    }

    /* Weight variants. */
    hdb_model_params vp = hdb_model_params_default();
    vp.weights_variant = HDB_WEIGHTS_FP16;
    hdb_model *hm = load(rt, dir, &vp, "diffusers HDB_WEIGHTS_FP16");
    hdb_model_info hi = info_of(hm, "fp16");
    check_component(&hi.unet, "fp16", "unet", HDB_DTYPE_F16);
    check_component(&hi.text_encoder, "fp16", "text_encoder", HDB_DTYPE_F16);
    check_component(&hi.vae, "fp16", "vae", HDB_DTYPE_F16);
    check_same_counts(&di.unet, &hi.unet, "unet f32 vs fp16");
    CHECK(hi.architecture == HDB_ARCH_SD1 && hi.source_format == HDB_FORMAT_DIFFUSERS, "fp16: SD1, diffusers");
    hdb_model_free(hm);

    vp.weights_variant = HDB_WEIGHTS_FULL;
    hm = load(rt, dir, &vp, "diffusers HDB_WEIGHTS_FULL");
    hi = info_of(hm, "full");
    CHECK(hi.unet.dtype == HDB_DTYPE_F32 && hi.vae.dtype == HDB_DTYPE_F32, "full: F32 weights");
    hdb_model_free(hm);

    vp.weights_variant = 7;
    hdb_model *m = SENTINEL;
    CHECK_STATUS(hdb_model_load(rt, dir, &vp, &m), HDB_STATUS_INVALID_ARGUMENT, "weights_variant 7 -> INVALID_ARGUMENT");
    CHECK(m == SENTINEL, "weights_variant 7: *out untouched");
    CHECK_MSG("weights_variant", "weights_variant 7: message names weights_variant");

    /* Weight storage: copied into memory, or the default mapping; other values refused. */
    vp = hdb_model_params_default();
    CHECK(vp.storage == HDB_STORAGE_MMAP && vp.reserved == 0, "storage defaults to MMAP");
    vp.storage = HDB_STORAGE_COPY;
    hm = load(rt, dir, &vp, "diffusers HDB_STORAGE_COPY");
    hi = info_of(hm, "copied");
    check_same_counts(&di.unet, &hi.unet, "unet mapped vs copied");
    hdb_model_free(hm);
    vp.storage = 2;
    m = SENTINEL;
    CHECK_STATUS(hdb_model_load(rt, dir, &vp, &m), HDB_STATUS_INVALID_ARGUMENT, "storage 2 -> INVALID_ARGUMENT");
    CHECK(m == SENTINEL, "storage 2: *out untouched");
    CHECK_MSG("params.storage", "storage 2: message names params.storage");
    vp = hdb_model_params_default();
    vp.reserved = 1;
    CHECK_STATUS(hdb_model_load(rt, dir, &vp, &m), HDB_STATUS_INVALID_ARGUMENT, "reserved 1 -> INVALID_ARGUMENT");
    CHECK_MSG("params.reserved", "reserved 1: message names params.reserved");
    /* A caller built against the header before `storage` existed: its size is version 1's. */
    vp = hdb_model_params_default();
    vp.struct_size = (uint32_t)offsetof(hdb_model_params, storage);
    vp.storage = 99; /* beyond the old struct: never read */
    hm = load(rt, dir, &vp, "version 1 params (no storage field)");
    hdb_model_free(hm);

    /* A struct_size ending before `progress` is no released size: refused, callback not called. */
    vp = hdb_model_params_default();
    vp.struct_size = (uint32_t)offsetof(hdb_model_params, progress);
    pc = new_ctx(1);
    vp.progress = on_progress;
    vp.progress_user_data = &pc;
    m = SENTINEL;
    CHECK_STATUS(hdb_model_load(rt, dir, &vp, &m), HDB_STATUS_INVALID_ARGUMENT,
                 "params with struct_size = offsetof(progress)");
    CHECK(m == SENTINEL && pc.calls == 0, "short params: *out untouched, progress not called");

    vp.struct_size = 0;
    m = SENTINEL;
    CHECK_STATUS(hdb_model_load(rt, dir, &vp, &m), HDB_STATUS_INVALID_ARGUMENT, "model params struct_size 0");
    CHECK(m == SENTINEL, "model params struct_size 0: *out untouched");

    /* A single component folder. */
    char unet[4096];
    path_join(unet, sizeof unet, dir, "unet");
    hdb_model *um = load(rt, unet, NULL, "unet/ component folder");
    hdb_model_info ui = info_of(um, "unet only");
    CHECK(ui.unet.present && !ui.text_encoder.present && !ui.vae.present, "unet folder: only the unet present");
    CHECK(ui.architecture == HDB_ARCH_SD1, "unet folder: SD1");
    check_same_counts(&di.unet, &ui.unet, "unet pipeline vs component folder");
    CHECK(ui.text_encoder.parameter_count == 0 && ui.text_encoder.dtype == HDB_DTYPE_NONE,
          "absent component reports zeros and HDB_DTYPE_NONE");
    hdb_model_free(um);

    /* Concurrent readers of one model. */
    enum { NT = 4 };
    pthread_t th[NT];
    thread_arg ta[NT];
    for (int i = 0; i < NT; i++) {
        ta[i].model = dm;
        ta[i].expect = di;
        ta[i].failures = 0;
        CHECK(pthread_create(&th[i], NULL, reader, &ta[i]) == 0, "start reader thread %d", i);
    }
    int failures = 0;
    for (int i = 0; i < NT; i++) {
        pthread_join(th[i], NULL);
        failures += ta[i].failures;
    }
    CHECK(failures == 0, "%d threads x 50 get_info/describe on one model agree (%d failures)", NT, failures);

    /* Models outlive their runtime: free the runtime first, then use and free the models. */
    hdb_runtime_free(rt);
    hdb_model_info after = info_of(dm, "diffusers after runtime freed");
    CHECK(info_equal(&after, &di), "model info unchanged after its runtime was freed");
    check_describe(lm, "ldm after runtime freed", "\"ldm-single-file\"", ldm);
    hdb_model_free(dm);
    hdb_model_free(lm);

    return test_done("model_load");
}
