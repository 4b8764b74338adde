// scripts/test-bindings.sh compiles this with `clang -fmodules -fsyntax-only` to check that
// CHdb's module map builds a module over hdb.h and exposes what Sources/Hdb uses (no Swift
// toolchain on CI machines: this is the part of the Swift package checked here).
@import CHdb;

static int uses_the_module(void) {
    hdb_runtime_params rp;
    hdb_runtime_params_init(&rp, sizeof rp);
    hdb_runtime *rt = 0;
    hdb_status s = hdb_runtime_new(&rp, &rt);
    char msg[64];
    (void)hdb_last_error_copy(msg, sizeof msg);
    hdb_generate_params gp;
    hdb_generate_params_init(&gp, sizeof gp);
    hdb_progress_fn progress = 0;
    hdb_log_fn log = 0;
    hdb_free_fn free_fn = 0;
    (void)progress, (void)log, (void)free_fn;
    hdb_runtime_free(rt);
    return (int)s + HDB_STATUS_BUSY + HDB_SAMPLER_DDIM + HDB_ABI_VERSION;
}

int main(void) { return uses_the_module(); }
