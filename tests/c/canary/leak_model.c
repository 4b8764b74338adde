/*
 * Not a test of hdb: a canary for the test set-up. It loads a model and deliberately never
 * frees it; tests/c_api.rs expects LeakSanitizer to report the leak (and
 * scripts/valgrind-c-tests.sh expects valgrind to), proving that a missing or broken
 * hdb_model_free would be caught by the real programs.
 */
#include "../common.h"

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);
    char ldm[4096];
    path_join(ldm, sizeof ldm, fixtures, "tiny-sd-ldm.safetensors");
    hdb_runtime *rt = NULL;
    CHECK_STATUS(hdb_runtime_new(NULL, &rt), HDB_STATUS_OK, "runtime");
    hdb_model *m = NULL;
    CHECK_STATUS(hdb_model_load(rt, ldm, NULL, &m), HDB_STATUS_OK, "load %s", ldm);
    hdb_runtime_free(rt);
    /* hdb_model_free(m) deliberately missing. */
    return test_done("leak_model");
}
