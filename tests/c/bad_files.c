/*
 * hdb_model_load on broken inputs: each gives the documented status, a message naming the
 * file (and the key at fault, where there is one), leaves *out alone, and does not crash.
 * Safetensors files are written by hand: 8-byte little-endian header length, JSON, data.
 */
#include "common.h"

static char sentinel_storage;
#define SENTINEL ((hdb_model *)(void *)&sentinel_storage)

static hdb_runtime *g_rt;

/* Loads `path`, expecting `want`; checks *out untouched and the message names `path`. */
static void expect_load(const char *path, hdb_status want, const char *what) {
    hdb_model *m = SENTINEL;
    CHECK_STATUS(hdb_model_load(g_rt, path, NULL, &m), want, "%s: hdb_model_load -> %s", what,
                 hdb_status_name(want));
    CHECK(m == SENTINEL, "%s: *out untouched", what);
    CHECK(utf8_valid(hdb_last_error_message()), "%s: message is UTF-8", what);
    CHECK_MSG(path, "%s: message names the path: '%s'", what, hdb_last_error_message());
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char p[4096], q[4096], r[4096];

    hdb_runtime_params rp = hdb_runtime_params_default();
    rp.device = "cpu";
    rp.num_threads = 1;
    CHECK_STATUS(hdb_runtime_new(&rp, &g_rt), HDB_STATUS_OK, "runtime");

    /* A path that does not exist. */
    path_join(p, sizeof p, work, "does-not-exist");
    expect_load(p, HDB_STATUS_FILE_NOT_FOUND, "missing path");
    path_join(p, sizeof p, work, "no-such-dir/model.safetensors");
    expect_load(p, HDB_STATUS_FILE_NOT_FOUND, "missing parent directory");

    /* The same, as bytes that are not UTF-8 (any bytes are a path on Unix). */
    path_join(p, sizeof p, work, "\xff\xfe-missing");
    hdb_model *m = SENTINEL;
    CHECK_STATUS(hdb_model_load(g_rt, p, NULL, &m), HDB_STATUS_FILE_NOT_FOUND,
                 "non-UTF-8 missing path -> FILE_NOT_FOUND");
    CHECK(m == SENTINEL, "non-UTF-8 path: *out untouched");
    CHECK(utf8_valid(hdb_last_error_message()), "non-UTF-8 path: the message is still valid UTF-8");
    CHECK_MSG(work, "non-UTF-8 path: message names the path (its UTF-8 part)");

    /* An empty path. */
    m = SENTINEL;
    CHECK_STATUS(hdb_model_load(g_rt, "", NULL, &m), HDB_STATUS_INVALID_ARGUMENT, "empty path -> INVALID_ARGUMENT");
    CHECK(m == SENTINEL, "empty path: *out untouched");
    CHECK_MSG("'path'", "empty path: message names 'path'");

    /* An empty directory. */
    path_join(p, sizeof p, work, "empty-dir");
    make_dir(p);
    expect_load(p, HDB_STATUS_NOT_A_MODEL, "empty directory");

    /* model_index.json but no weights. */
    path_join(p, sizeof p, work, "index-only");
    make_dir(p);
    path_join(q, sizeof q, p, "model_index.json");
    write_text(q, "{\"_class_name\": \"StableDiffusionPipeline\"}");
    path_join(q, sizeof q, p, "unet");
    make_dir(q);
    expect_load(p, HDB_STATUS_NOT_A_MODEL, "model_index.json without weights");
    CHECK_MSG("model_index.json", "model_index.json without weights: message mentions model_index.json");

    /* A file that is 3 bytes long. */
    path_join(p, sizeof p, work, "three-bytes.safetensors");
    write_file(p, "abc", 3);
    expect_load(p, HDB_STATUS_INVALID_FILE, "3-byte file");

    /* An empty file. */
    path_join(p, sizeof p, work, "empty.safetensors");
    write_file(p, "", 0);
    expect_load(p, HDB_STATUS_INVALID_FILE, "0-byte file");

    /* Valid header, data cut short (16 bytes promised, 8 present). */
    path_join(p, sizeof p, work, "truncated.safetensors");
    write_safetensors(p,
                      "{\"model.diffusion_model.input_blocks.0.0.weight\":"
                      "{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                      8);
    expect_load(p, HDB_STATUS_INVALID_FILE, "truncated data");

    /* The length field claims more bytes than the file has. */
    path_join(p, sizeof p, work, "long-header.safetensors");
    write_safetensors_ex(p, "{}", 0, 1000);
    expect_load(p, HDB_STATUS_INVALID_FILE, "header length beyond the file");
    CHECK_MSG("1000", "header length beyond the file: message gives the claimed length");

    /* An absurd length field (would overflow if added to anything). */
    path_join(p, sizeof p, work, "huge-header.safetensors");
    write_safetensors_ex(p, "{}", 0, UINT64_MAX);
    expect_load(p, HDB_STATUS_INVALID_FILE, "header length UINT64_MAX");

    /* A header that is not JSON. */
    path_join(p, sizeof p, work, "not-json.safetensors");
    write_safetensors(p, "{this is not json at all}", 0);
    expect_load(p, HDB_STATUS_INVALID_FILE, "header not JSON");
    path_join(p, sizeof p, work, "not-json2.safetensors");
    write_safetensors(p, "hello world", 0);
    expect_load(p, HDB_STATUS_INVALID_FILE, "header not JSON (no brace)");

    /* A valid safetensors file that is not an LDM checkpoint. */
    path_join(p, sizeof p, work, "not-ldm.safetensors");
    write_safetensors(p, "{\"foo.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    expect_load(p, HDB_STATUS_NOT_A_MODEL, "safetensors without model.diffusion_model.* keys");

    /* An LDM file with an I64 tensor under a weight key (input_blocks.0.0 is conv_in; the
     * downsampler key lets hdb infer layers_per_block). */
    path_join(p, sizeof p, work, "ldm-i64.safetensors");
    write_safetensors(p,
                      "{\"model.diffusion_model.input_blocks.0.0.weight\":"
                      "{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]},"
                      "\"model.diffusion_model.input_blocks.3.0.op.weight\":"
                      "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}",
                      24);
    expect_load(p, HDB_STATUS_UNSUPPORTED_DTYPE, "LDM file with an I64 weight");
    CHECK_MSG("model.diffusion_model.input_blocks.0.0.weight", "LDM I64: message names the key");
    CHECK_MSG("I64", "LDM I64: message names the dtype");

    /* `model.diffusion_model.conv_in.weight` is diffusers naming under the LDM prefix: not an
     * SD 1.x LDM key, so the model is invalid whatever its dtype; the message names the key. */
    path_join(p, sizeof p, work, "ldm-bad-key.safetensors");
    write_safetensors(p,
                      "{\"model.diffusion_model.conv_in.weight\":"
                      "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"model.diffusion_model.input_blocks.3.0.op.weight\":"
                      "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                      16);
    expect_load(p, HDB_STATUS_INVALID_MODEL, "LDM file with a non-LDM key");
    CHECK_MSG("model.diffusion_model.conv_in.weight", "non-LDM key: message names the key");

    /* A diffusers component folder with an F64 weight: loaded as the folder itself (config.json
     * names the class) and as a pipeline folder holding unet/. */
    path_join(p, sizeof p, work, "f64-pipeline");
    make_dir(p);
    path_join(q, sizeof q, p, "unet");
    make_dir(q);
    path_join(r, sizeof r, q, "config.json");
    write_text(r, "{\"_class_name\":\"UNet2DConditionModel\"}");
    path_join(r, sizeof r, q, "diffusion_pytorch_model.safetensors");
    write_safetensors(r, "{\"conv_in.weight\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16);
    expect_load(q, HDB_STATUS_UNSUPPORTED_DTYPE, "component folder unet/ with an F64 weight");
    CHECK_MSG("'conv_in.weight'", "component F64: message names the key");
    CHECK_MSG(r, "component F64: message names the weight file");
    CHECK_MSG("F64", "component F64: message names the dtype");
    expect_load(p, HDB_STATUS_UNSUPPORTED_DTYPE, "pipeline folder whose unet/ has an F64 weight");
    CHECK_MSG("'conv_in.weight'", "pipeline F64: message names the key");
    CHECK_MSG(r, "pipeline F64: message names the weight file");

    /* A component folder whose weights file is truncated: the message names that file. */
    path_join(p, sizeof p, work, "truncated-vae");
    make_dir(p);
    path_join(q, sizeof q, p, "config.json");
    write_text(q, "{\"_class_name\":\"AutoencoderKL\"}");
    path_join(q, sizeof q, p, "diffusion_pytorch_model.safetensors");
    write_safetensors(q, "{\"decoder.conv_in.weight\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 4);
    expect_load(p, HDB_STATUS_INVALID_FILE, "component folder with truncated weights");
    CHECK_MSG(q, "truncated component weights: message names the weights file");

    /* A component folder whose config.json is not JSON while the weights are fine. */
    path_join(p, sizeof p, work, "bad-config");
    make_dir(p);
    path_join(q, sizeof q, p, "unet");
    make_dir(q);
    path_join(r, sizeof r, q, "diffusion_pytorch_model.safetensors");
    write_safetensors(r, "{\"conv_in.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    path_join(r, sizeof r, q, "config.json");
    write_text(r, "{not json");
    expect_load(p, HDB_STATUS_INVALID_FILE, "pipeline whose unet/config.json is not JSON");
    CHECK_MSG(r, "bad config.json: message names config.json");

    /* Pickle checkpoints are refused. */
    path_join(p, sizeof p, work, "model.ckpt");
    write_text(p, "PK\x03\x04 not really a zip");
    expect_load(p, HDB_STATUS_UNSUPPORTED, ".ckpt file");
    path_join(p, sizeof p, work, "bin-unet");
    make_dir(p);
    path_join(q, sizeof q, p, "unet");
    make_dir(q);
    path_join(r, sizeof r, q, "diffusion_pytorch_model.bin");
    write_file(r, "PK\x03\x04", 4); /* a zip archive, as torch.save writes */
    m = SENTINEL;
    CHECK_STATUS(hdb_model_load(g_rt, p, NULL, &m), HDB_STATUS_UNSUPPORTED,
                 "pipeline with only unet/diffusion_pytorch_model.bin -> UNSUPPORTED");
    CHECK(m == SENTINEL, "pickle .bin: *out untouched");
    CHECK_MSG(r, "pickle .bin: message names the .bin file");

    /* A directory where a weights file is expected (open succeeds on dirs on Linux). */
    path_join(p, sizeof p, work, "dir.safetensors");
    make_dir(p);
    m = SENTINEL;
    hdb_status s = hdb_model_load(g_rt, p, NULL, &m);
    CHECK(s != HDB_STATUS_OK && s != HDB_STATUS_PANIC && m == SENTINEL,
          "a directory named *.safetensors fails cleanly (%s)", hdb_status_name(s));

    /* A symlink loop: an I/O error that is not "not found". */
    path_join(p, sizeof p, work, "loop-a");
    path_join(q, sizeof q, work, "loop-b");
    CHECK(symlink(q, p) == 0 && symlink(p, q) == 0, "made the symlink loop %s <-> %s", p, q);
    expect_load(p, HDB_STATUS_IO_ERROR, "symlink loop");

    /* Permission denied; root can read anything, so there the loop above is the IO_ERROR case. */
    path_join(p, sizeof p, work, "unreadable.safetensors");
    write_safetensors(p, "{}", 0);
    CHECK(chmod(p, 0) == 0, "chmod 0 %s", p);
    if (geteuid() != 0) {
        expect_load(p, HDB_STATUS_IO_ERROR, "unreadable file");
    } else {
        printf("note: running as root, so an unreadable file cannot be made; not checked\n");
    }

    hdb_runtime_free(g_rt);
    return test_done("bad_files");
}
