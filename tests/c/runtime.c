/* hdb_runtime_new / _get_info / _free: params, device strings, versioned structs. */
#include "common.h"

static char sentinel_storage;
#define RT_SENTINEL ((hdb_runtime *)(void *)&sentinel_storage)

/* Creates a runtime from `p` expecting `want`; on failure checks *out was left alone. */
static hdb_runtime *try_new(const hdb_runtime_params *p, hdb_status want, const char *what) {
    hdb_runtime *rt = RT_SENTINEL;
    CHECK_STATUS(hdb_runtime_new(p, &rt), want, "hdb_runtime_new(%s) -> %s", what, hdb_status_name(want));
    if (want == HDB_STATUS_OK) {
        CHECK(rt != NULL && rt != RT_SENTINEL, "hdb_runtime_new(%s) wrote a runtime", what);
        return rt;
    }
    CHECK(rt == RT_SENTINEL, "hdb_runtime_new(%s) left *out untouched on failure", what);
    CHECK(last_error_nonempty() && utf8_valid(hdb_last_error_message()),
          "hdb_runtime_new(%s) failure has a non-empty UTF-8 message: '%s'", what, hdb_last_error_message());
    return NULL;
}

static hdb_runtime_info get_info(const hdb_runtime *rt, const char *what) {
    hdb_runtime_info info;
    memset(&info, 0xAB, sizeof info);
    info.struct_size = sizeof info;
    CHECK_STATUS(hdb_runtime_get_info(rt, &info), HDB_STATUS_OK, "hdb_runtime_get_info(%s)", what);
    CHECK(info.struct_size == sizeof info, "get_info(%s) kept struct_size", what);
    return info;
}

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);

    /* Defaults. */
    hdb_runtime_params d = hdb_runtime_params_default();
    CHECK(d.struct_size == sizeof(hdb_runtime_params), "params_default().struct_size == sizeof (%u)", d.struct_size);
    CHECK(d.num_threads == 0, "params_default().num_threads == 0 (all cores)");
    CHECK(d.device == NULL, "params_default().device == NULL (auto)");

    /* Whether this machine has a usable CUDA device (the default build loads CUDA at run time):
     * auto takes it when it does, and runs on the CPU when it does not. */
    hdb_runtime_params probe = hdb_runtime_params_default();
    probe.device = "cuda:0";
    hdb_runtime *probed = NULL;
    hdb_status probe_status = hdb_runtime_new(&probe, &probed);
    CHECK(probe_status == HDB_STATUS_OK || probe_status == HDB_STATUS_NO_DEVICE,
          "cuda:0 opens or is HDB_STATUS_NO_DEVICE (%s)", hdb_status_name(probe_status));
    const int have_cuda = probe_status == HDB_STATUS_OK;
    const uint32_t auto_kind = have_cuda ? HDB_DEVICE_CUDA : HDB_DEVICE_CPU;
    hdb_runtime_free(probed);

    hdb_runtime *rt = try_new(NULL, HDB_STATUS_OK, "NULL params");
    hdb_runtime_info info = get_info(rt, "NULL params");
    CHECK(info.device_kind == auto_kind, "NULL params (auto) runs on %s here", have_cuda ? "cuda:0" : "the CPU");
    CHECK(info.num_threads >= 1, "NULL params: num_threads %u >= 1", info.num_threads);
    hdb_runtime_free(rt);

    rt = try_new(&d, HDB_STATUS_OK, "params_default()");
    hdb_runtime_free(rt);

    /* cpu, 2 threads. */
    hdb_runtime_params p = hdb_runtime_params_default();
    p.device = "cpu";
    p.num_threads = 2;
    rt = try_new(&p, HDB_STATUS_OK, "device cpu, 2 threads");
    info = get_info(rt, "cpu/2");
    CHECK(info.device_kind == HDB_DEVICE_CPU, "cpu/2: device_kind == HDB_DEVICE_CPU (%u)", info.device_kind);
    CHECK(info.device_index == 0, "cpu/2: device_index == 0 (%u)", info.device_index);
    CHECK(info.num_threads == 2, "cpu/2: num_threads == 2 (%u)", info.num_threads);

    /* A struct_size that is no released version's size (it would end inside a field): refused. */
    hdb_runtime_info shortinfo;
    memset(&shortinfo, 0xAB, sizeof shortinfo);
    shortinfo.struct_size = (uint32_t)offsetof(hdb_runtime_info, num_threads);
    CHECK_STATUS(hdb_runtime_get_info(rt, &shortinfo), HDB_STATUS_INVALID_ARGUMENT,
                 "get_info with struct_size = offsetof(num_threads), not a released size");
    CHECK_MSG("struct_size", "short info struct: message mentions struct_size");
    CHECK(shortinfo.device_kind == 0xABABABABu, "short info struct: untouched");

    /* A newer caller's larger struct: our fields are written, the rest is left alone. */
    struct {
        hdb_runtime_info info;
        uint32_t newer_fields[4];
    } newer_info;
    memset(&newer_info, 0xAB, sizeof newer_info);
    newer_info.info.struct_size = (uint32_t)sizeof newer_info;
    CHECK_STATUS(hdb_runtime_get_info(rt, &newer_info.info), HDB_STATUS_OK, "get_info with a larger (newer) struct_size");
    CHECK(newer_info.info.struct_size == sizeof newer_info, "larger info struct: struct_size kept");
    CHECK(newer_info.info.device_kind == HDB_DEVICE_CPU && newer_info.info.num_threads == 2, "larger info struct: fields written");
    CHECK(newer_info.newer_fields[0] == 0xABABABABu && newer_info.newer_fields[3] == 0xABABABABu,
          "larger info struct: bytes beyond this version untouched");

    hdb_runtime_info badinfo;
    memset(&badinfo, 0xAB, sizeof badinfo);
    badinfo.struct_size = 0;
    CHECK_STATUS(hdb_runtime_get_info(rt, &badinfo), HDB_STATUS_INVALID_ARGUMENT, "get_info with struct_size 0");
    CHECK_MSG("struct_size", "get_info struct_size 0: message mentions struct_size");
    CHECK(badinfo.device_kind == 0xABABABABu, "get_info struct_size 0: struct untouched");
    hdb_runtime_free(rt);

    /* auto */
    p = hdb_runtime_params_default();
    p.device = "auto";
    rt = try_new(&p, HDB_STATUS_OK, "device auto");
    info = get_info(rt, "auto");
    CHECK(info.device_kind == auto_kind, "auto takes cuda:0 when it opens, else the CPU");
    hdb_runtime_free(rt);

    /* A device that does not exist: no GPU or CUDA driver here, a CPU-only build, or no
     * machine with 4097 GPUs. */
    const char *cuda_devs[] = {"cuda:0", "cuda", "cuda:4096"};
    for (size_t i = have_cuda ? 2 : 0; i < sizeof cuda_devs / sizeof cuda_devs[0]; i++) {
        p = hdb_runtime_params_default();
        p.device = cuda_devs[i];
        char what[64];
        snprintf(what, sizeof what, "device %s", cuda_devs[i]);
        try_new(&p, HDB_STATUS_NO_DEVICE, what);
    }

    /* Invalid device strings. */
    const char *bad_devs[] = {"tpu", "cuda:", "cuda:-1", "cuda:x", "CPU0", "cpu:0", "", "cpu ", " cpu", "cuda:+1"};
    for (size_t i = 0; i < sizeof bad_devs / sizeof bad_devs[0]; i++) {
        p = hdb_runtime_params_default();
        p.device = bad_devs[i];
        char what[64];
        snprintf(what, sizeof what, "device '%s'", bad_devs[i]);
        try_new(&p, HDB_STATUS_INVALID_ARGUMENT, what);
        CHECK_MSG("device", "%s: message names 'device'", what);
        CHECK_MSG(bad_devs[i], "%s: message quotes the value", what);
    }

    p = hdb_runtime_params_default();
    p.device = "\xff\xfe";
    try_new(&p, HDB_STATUS_INVALID_ARGUMENT, "device not UTF-8");
    CHECK_MSG("device", "non-UTF-8 device: message names the device field");
    CHECK_MSG("UTF-8", "non-UTF-8 device: message says UTF-8");

    /* struct_size checks. */
    p = hdb_runtime_params_default();
    p.struct_size = 0;
    try_new(&p, HDB_STATUS_INVALID_ARGUMENT, "struct_size 0");
    CHECK_MSG("struct_size", "struct_size 0: message mentions struct_size");
    CHECK_MSG("params", "struct_size 0: message names 'params'");

    p.struct_size = 3;
    try_new(&p, HDB_STATUS_INVALID_ARGUMENT, "struct_size 3 (smaller than the size field)");

    p.struct_size = 0x7fffffff;
    try_new(&p, HDB_STATUS_INVALID_ARGUMENT, "struct_size 0x7fffffff (garbage)");

    /* Sizes of no released version (they would end inside or between fields) are refused:
     * the only released size is sizeof(hdb_runtime_params). */
    const uint32_t odd_sizes[] = {4, 8, (uint32_t)offsetof(hdb_runtime_params, device) + 4,
                                  (uint32_t)sizeof(hdb_runtime_params) - 1};
    for (size_t i = 0; i < sizeof odd_sizes / sizeof odd_sizes[0]; i++) {
        p = hdb_runtime_params_default();
        p.struct_size = odd_sizes[i];
        char what[64];
        snprintf(what, sizeof what, "struct_size %u (no released version's size)", odd_sizes[i]);
        try_new(&p, HDB_STATUS_INVALID_ARGUMENT, what);
        CHECK_MSG("struct_size", "struct_size %u: message mentions struct_size", odd_sizes[i]);
    }

    /* A newer caller with a bigger struct: the known prefix is read, the tail ignored. */
    struct {
        hdb_runtime_params p;
        uint64_t future_field;
    } big;
    memset(&big, 0, sizeof big);
    big.p = hdb_runtime_params_default();
    big.p.struct_size = sizeof big;
    big.p.device = "cpu";
    big.p.num_threads = 1;
    big.future_field = 0xdeadbeef;
    rt = try_new(&big.p, HDB_STATUS_OK, "struct_size bigger than the library's struct");
    info = get_info(rt, "bigger params struct");
    CHECK(info.num_threads == 1, "bigger params struct: num_threads read (%u)", info.num_threads);
    hdb_runtime_free(rt);

    /* Several runtimes at once are independent. */
    hdb_runtime_params p1 = hdb_runtime_params_default(), p2 = hdb_runtime_params_default();
    p1.device = "cpu";
    p1.num_threads = 1;
    p2.device = "cpu";
    p2.num_threads = 2;
    hdb_runtime *a = try_new(&p1, HDB_STATUS_OK, "first of two runtimes");
    hdb_runtime *b = try_new(&p2, HDB_STATUS_OK, "second of two runtimes");
    CHECK(get_info(a, "a").num_threads == 1 && get_info(b, "b").num_threads == 2,
          "two live runtimes keep their own thread counts");
    hdb_runtime_free(a);
    CHECK(get_info(b, "b after freeing a").num_threads == 2, "freeing one runtime leaves the other intact");
    hdb_runtime_free(b);

    /* Free NULL is a no-op for every _free. */
    hdb_runtime_free(NULL);
    hdb_model_free(NULL);
    CHECK(true, "hdb_runtime_free(NULL) and hdb_model_free(NULL) are no-ops");

    return test_done("runtime");
}
