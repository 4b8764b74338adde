/* A program found hdb through pkg-config or CMake: it loads the model given and prints what
 * it is (scripts/test-bindings.sh builds it against an installed prefix and runs it). */
#include <stdio.h>

#include <hdb.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_PATH\n", argv[0]);
        return 2;
    }
    if (hdb_abi_version() != HDB_ABI_VERSION) {
        fprintf(stderr, "library ABI %u, header %u\n", hdb_abi_version(), HDB_ABI_VERSION);
        return 1;
    }
    hdb_runtime_params rp;
    hdb_runtime_params_init(&rp, sizeof rp);
    rp.device = "cpu";
    hdb_runtime *rt = NULL;
    hdb_model *model = NULL;
    hdb_status s = hdb_runtime_new(&rp, &rt);
    if (s == HDB_STATUS_OK) s = hdb_model_load(rt, argv[1], NULL, &model);
    if (s != HDB_STATUS_OK) {
        char msg[512];
        hdb_last_error_copy(msg, sizeof msg);
        fprintf(stderr, "%s: %s\n", hdb_status_name(s), msg);
        hdb_runtime_free(rt);
        return 1;
    }
    hdb_model_info info = {.struct_size = sizeof info};
    hdb_model_get_info(model, &info);
    printf("hdb %s: architecture %u, UNet %llu parameters\n", hdb_version_string(), info.architecture,
           (unsigned long long)info.unet.parameter_count);
    hdb_model_free(model);
    hdb_runtime_free(rt);
    return 0;
}
