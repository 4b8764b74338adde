/*
 * hdb_model_load_from_memory: the tiny LDM single-file fixture loaded from a caller buffer
 * (overwritten right after the call) is the same model as loaded from its path (every
 * component's tensor and parameter counts and dtype), reports its name and its load progress,
 * and refuses NULL, truncated, empty and non-model buffers by name. (The fixture's UNet cannot
 * be built from a single file: its config, inferred from the weights, has too few channels
 * for 32 norm groups; tests/model_load.rs covers what loading one reads.)
 */
#include "common.h"

static int g_loads;
static bool count_loads(void *ud, uint64_t done, uint64_t total, const char *stage) {
    (void)ud;
    g_loads++;
    return done <= total && strcmp(stage, "load") == 0;
}

/* Reads a whole file into a malloc'd buffer. */
static uint8_t *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)n);
    *len = buf != NULL ? fread(buf, 1, (size_t)n, f) : 0;
    fclose(f);
    return buf;
}

static bool same_component(const hdb_component_info *x, const hdb_component_info *y) {
    return x->present == 1 && y->present == 1 && x->dtype == y->dtype && x->tensor_count == y->tensor_count &&
           x->parameter_count == y->parameter_count;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char ldm[4096], ops[4096];
    path_join(ldm, sizeof ldm, fixtures, "tiny-sd-ldm.safetensors");
    path_join(ops, sizeof ops, fixtures, "ops.safetensors");

    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(&rp, &rt), HDB_STATUS_OK, "runtime");
    hdb_model *from_path = NULL, *from_memory = NULL;
    CHECK_STATUS(hdb_model_load(rt, ldm, NULL, &from_path), HDB_STATUS_OK, "load from the path");

    size_t len = 0;
    uint8_t *bytes = slurp(ldm, &len);
    CHECK(bytes != NULL && len > 1000, "read the file (%zu bytes)", len);
    hdb_model_params mp;
    CHECK_STATUS(hdb_model_params_init(&mp, sizeof mp), HDB_STATUS_OK, "params");
    mp.progress = count_loads;
    CHECK_STATUS(hdb_model_load_from_memory(rt, bytes, len, "tiny-ldm.safetensors", &mp, &from_memory), HDB_STATUS_OK,
                 "load from memory");
    CHECK(g_loads >= 1, "load progress reported (%d)", g_loads);
    /* The model holds its own copy: the caller's buffer may go at once. */
    memset(bytes, 0, len);

    hdb_model_info a = {.struct_size = sizeof a}, b = {.struct_size = sizeof b};
    CHECK_STATUS(hdb_model_get_info(from_path, &a), HDB_STATUS_OK, "info from path");
    CHECK_STATUS(hdb_model_get_info(from_memory, &b), HDB_STATUS_OK, "info from memory");
    CHECK(b.source_format == HDB_FORMAT_LDM_SINGLE_FILE && b.architecture == a.architecture &&
              b.cross_attention_dim == a.cross_attention_dim && b.has_tokenizer == 0 &&
              same_component(&a.unet, &b.unet) && same_component(&a.text_encoder, &b.text_encoder) &&
              same_component(&a.vae, &b.vae),
          "the same model (UNet %llu parameters in %llu tensors)", (unsigned long long)b.unet.parameter_count,
          (unsigned long long)b.unet.tensor_count);
    char desc[8192];
    CHECK_STATUS(hdb_model_describe(from_memory, desc, sizeof desc, NULL), HDB_STATUS_OK, "describe");
    CHECK(strstr(desc, "tiny-ldm.safetensors") != NULL, "the description names it");

    /* Failures name what is wrong and write nothing. */
    hdb_model *m = NULL;
    free(bytes);
    bytes = slurp(ldm, &len);
    CHECK_STATUS(hdb_model_load_from_memory(rt, NULL, len, NULL, NULL, &m), HDB_STATUS_NULL_ARGUMENT, "NULL bytes");
    CHECK_MSG("'bytes'", "names 'bytes'");
    CHECK_STATUS(hdb_model_load_from_memory(rt, bytes, len, NULL, NULL, NULL), HDB_STATUS_NULL_ARGUMENT, "NULL out");
    CHECK_STATUS(hdb_model_load_from_memory(NULL, bytes, len, NULL, NULL, &m), HDB_STATUS_NULL_ARGUMENT, "NULL rt");
    CHECK_STATUS(hdb_model_load_from_memory(rt, bytes, len / 2, NULL, NULL, &m), HDB_STATUS_INVALID_FILE,
                 "a truncated buffer");
    CHECK_MSG("<memory>", "named <memory> when no name is given");
    CHECK_STATUS(hdb_model_load_from_memory(rt, bytes, 0, "empty", NULL, &m), HDB_STATUS_INVALID_FILE, "0 bytes");
    /* params.tokenizer applies to a model from memory as to one from a path. */
    char tiny[4096];
    path_join(tiny, sizeof tiny, fixtures, "tiny-sd");
    mp.progress = NULL;
    mp.tokenizer = tiny;
    CHECK_STATUS(hdb_model_load_from_memory(rt, bytes, len, NULL, &mp, &m), HDB_STATUS_OK, "with a tokenizer");
    hdb_model_info ti = {.struct_size = sizeof ti};
    CHECK_STATUS(hdb_model_get_info(m, &ti), HDB_STATUS_OK, "info");
    CHECK(ti.has_tokenizer == 1, "the given tokenizer is the model's");
    hdb_model_free(m);
    m = NULL;
    mp.tokenizer = work; /* an empty folder: no tokenizer there */
    CHECK_STATUS(hdb_model_load_from_memory(rt, bytes, len, NULL, &mp, &m), HDB_STATUS_NOT_A_MODEL,
                 "a tokenizer path that holds none");
    CHECK_MSG("tokenizer", "says the tokenizer is at fault");
    mp.tokenizer = NULL;
    mp.reserved = 1;
    CHECK_STATUS(hdb_model_load_from_memory(rt, bytes, len, NULL, &mp, &m), HDB_STATUS_INVALID_ARGUMENT,
                 "reserved != 0");
    CHECK_MSG("params.reserved", "names params.reserved");
    free(bytes);
    bytes = slurp(ops, &len);
    CHECK(bytes != NULL, "read a safetensors file that is no model");
    CHECK_STATUS(hdb_model_load_from_memory(rt, bytes, len, "ops.safetensors", NULL, &m), HDB_STATUS_NOT_A_MODEL,
                 "not a model");
    CHECK_MSG("ops.safetensors", "names it");
    CHECK(m == NULL, "nothing written on failure");
    free(bytes);

    hdb_model_free(from_memory);
    hdb_model_free(from_path);
    hdb_runtime_free(rt);
    return test_done("model_memory");
}
