// gpu.cpp: an emulated GPU. Built as a shared library and installed as both libcuda.so and
// libcublas.so (one file, two names) in a folder put first on LD_LIBRARY_PATH, it lets hdb's
// unmodified CUDA backend (cudarc's dynamic loading, NVRTC, the kernel cache, cuBLAS) run its
// GPU tests on a machine without a GPU: scripts/emulated-gpu.sh. Built with
//
//   c++ -O2 -std=c++20 -fno-extern-tls-init -DHDB_EMULATE -DHDB_EMU_SHARED_LIBRARY -fPIC -shared
//       -Wl,-soname,libcuda.so -I kernels -I tests/emu -I <dir of hdb_emu_kernels.inc>
//       tests/emu/gpu.cpp -o libcuda.so
//
// (tests/emu/harness.rs does it; hdb_emu_kernels.inc is the kernel list driver.cpp uses too).
//
// The driver API part (cu*): one device, "hdb emulated GPU", compute capability 9.0. Device
// memory is host memory; every allocation lies between 256-byte guard zones and starts as
// 0xFF bytes (NaN in every float type, as uninitialised memory may be). A module is the PTX
// NVRTC produced: its `.entry` names are the kernels cuModuleGetFunction finds, and each runs
// as the host-compiled kernel of the same name under cuda_emu.h (blocks one after another,
// threads as fibers). Every call runs to completion before it returns (the stream is always
// idle), under one lock, so test threads may call it at once.
//
// What it checks, as a GPU would (with an error status) or more strictly (a message on stderr
// and the process exits with status 3, as cuda_emu.h does for a faulting kernel):
// - a kernel's pointer arguments are null or inside a live allocation; memcpy/memset ranges
//   and cuBLAS operands lie inside one allocation (CUDA_ERROR_INVALID_VALUE /
//   CUBLAS_STATUS_INVALID_VALUE otherwise, named on stderr);
// - after every launch and GEMM, no guard zone of any allocation was written (exit 3);
// - more than 48 KB of dynamic shared memory needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
//   first (CUDA_ERROR_INVALID_VALUE, as on a GPU);
// - a free of an address that is not an allocation (CUDA_ERROR_INVALID_VALUE).
// Device memory is capped at HDB_EMU_GPU_MEMORY bytes (default 8 GiB): past it an allocation
// is CUDA_ERROR_OUT_OF_MEMORY, so out-of-memory paths can be tested.
//
// Faults on demand, for tests (found with dlopen("libcuda.so", RTLD_NOLOAD) + dlsym; absent
// from a real driver): hdb_emu_gpu_control("memory_headroom", n) lets allocations add at most
// n live bytes to what is allocated now (n < 0: no limit but the cap); ("fail_launch", n) makes the
// n-th kernel launch from now fail with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES (n <= 0: none).
// Both apply to every caller (hdb may run work on its own threads): a test that uses them must
// run alone (scripts/emulated-gpu.sh runs each test binary with --test-threads=1).
// hdb_emu_gpu_stat("launches") is the number of kernel launches so far, and ("peak_bytes") the
// most bytes live at once among allocations made under a memory headroom since the last
// control call: a test sizes its faults to the work it measures instead of to constants.
//
// The cuBLAS part (cublas*): handles, streams, Sgemm / GemmEx and their strided-batched
// forms, column-major as documented: C = alpha op(A) op(B) + beta C with f32 accumulation
// (products summed in double, rounded once), C not read when beta is 0, f32/f16/bf16 storage.
#include "cuda_emu.h"
#include "guard.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "hdb_emu_kernels.inc"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// CUresult values (cuda.h).
enum : int {
    kSuccess = 0,
    kInvalidValue = 1,
    kOutOfMemory = 2,
    kInvalidDevice = 101,
    kInvalidHandle = 400,
    kNotFound = 500,
    kLaunchOutOfResources = 701,
};

std::recursive_mutex g_lock;
using Guard = std::lock_guard<std::recursive_mutex>;

void note(const std::string& msg) {
    std::fprintf(stderr, "emulated-gpu: %s\n", msg.c_str());
    std::fflush(stderr);
}

[[noreturn]] void die(const std::string& msg) {
    note(msg);
    std::exit(3);
}

// ---------------------------------------------------------------------------------------------
// Device memory
// ---------------------------------------------------------------------------------------------

using hdb_emu_guard::kGuard;
using hdb_emu_guard::kGuardByte;

struct Alloc {
    unsigned char* base; // guard, data, guard
    size_t bytes;
    unsigned long long fault_gen = 0; // counted in g_fault_live under this control generation
    unsigned char* data() const { return base + kGuard; }
};

std::map<uintptr_t, Alloc> g_allocs; // by data address
size_t g_used = 0;
long long g_limit = -1;          // a test's memory headroom (hdb_emu_gpu_control), or -1
long long g_fail_launch_in = -1; // launches until one fails, or -1
unsigned long long g_fault_gen = 1; // one per hdb_emu_gpu_control call
size_t g_fault_live = 0;         // bytes allocated since then, still live
size_t g_fault_peak = 0;         // the most g_fault_live has been since then
unsigned long long g_launches = 0; // kernel launches so far (hdb_emu_gpu_stat)

size_t capacity() {
    static const size_t cap = [] {
        const char* v = std::getenv("HDB_EMU_GPU_MEMORY");
        return v ? (size_t)std::strtoull(v, nullptr, 10) : (size_t)8 << 30;
    }();
    return cap;
}

// The allocation holding [p, p + bytes), or nullptr.
const Alloc* find(uintptr_t p, size_t bytes) {
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    const uintptr_t lo = (uintptr_t)a.data();
    if (p < lo || p - lo > a.bytes || bytes > a.bytes - (p - lo)) return nullptr;
    return &a;
}

std::string hex(uintptr_t p) {
    char b[32];
    std::snprintf(b, sizeof b, "0x%llx", (unsigned long long)p);
    return b;
}

bool in_device(uintptr_t p, size_t bytes, const std::string& what) {
    if (find(p, bytes)) return true;
    note(what + ": [" + hex(p) + ", +" + std::to_string(bytes) +
         " bytes) is not inside one device allocation");
    return false;
}

void check_guards(const std::string& after) {
    for (auto& [addr, a] : g_allocs) {
        if (hdb_emu_guard::intact(a.base, a.bytes)) continue; // the usual case, fast
        for (size_t i = 0; i < kGuard; ++i)
            if (a.base[i] != kGuardByte || a.base[kGuard + a.bytes + i] != kGuardByte)
                die(after + " wrote outside the device allocation at " + hex(addr) + " (" +
                    std::to_string(a.bytes) + " bytes): guard byte " +
                    (a.base[i] != kGuardByte ? "-" + std::to_string(kGuard - i)
                                             : "+" + std::to_string(i)));
    }
}

int mem_alloc(unsigned long long* dptr, size_t bytes) {
    if (!dptr) return kInvalidValue;
    if (bytes == 0) return kInvalidValue;
    if (bytes > capacity() || g_used > capacity() - bytes) return kOutOfMemory;
    const bool counted = g_limit >= 0;
    if (counted && g_fault_live + bytes > (size_t)g_limit) return kOutOfMemory;
    auto* base = (unsigned char*)std::aligned_alloc(256, (bytes + 2 * kGuard + 255) / 256 * 256);
    if (!base) return kOutOfMemory;
    std::memset(base, kGuardByte, kGuard);
    std::memset(base + kGuard, 0xff, bytes);
    std::memset(base + kGuard + bytes, kGuardByte, kGuard);
    Alloc a{base, bytes, counted ? g_fault_gen : 0};
    if (counted) g_fault_live += bytes;
    if (g_fault_live > g_fault_peak) g_fault_peak = g_fault_live;
    g_allocs[(uintptr_t)a.data()] = a;
    g_used += bytes;
    *dptr = (unsigned long long)(uintptr_t)a.data();
    return kSuccess;
}

int mem_free(unsigned long long p) {
    if (p == 0) return kSuccess;
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end()) {
        note("cuMemFree of " + hex(p) + ", which is not a device allocation");
        return kInvalidValue;
    }
    g_used -= it->second.bytes;
    if (it->second.fault_gen == g_fault_gen) g_fault_live -= it->second.bytes;
    std::free(it->second.base);
    g_allocs.erase(it);
    return kSuccess;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

using Launcher = std::function<void(const std::string&, dim3, dim3, unsigned, void**)>;

template <typename T> T param(void** params, size_t i, const std::string& kernel) {
    if constexpr (std::is_pointer_v<T>) {
        void* p = *(void**)params[i];
        if (p && !find((uintptr_t)p, 0))
            die(kernel + ": argument " + std::to_string(i) + " (" + hex((uintptr_t)p) +
                ") is not null and not device memory");
        return (T)p;
    } else {
        static_assert(std::is_trivially_copyable_v<T>);
        T v;
        std::memcpy(&v, params[i], sizeof(T));
        return v;
    }
}

template <typename... P, size_t... I>
std::tuple<P...> params_all(void** params, const std::string& kernel, std::index_sequence<I...>) {
    return std::tuple<P...>{param<P>(params, I, kernel)...};
}

template <typename... P> Launcher make_launcher(void (*k)(P...)) {
    return [k](const std::string& name, dim3 grid, dim3 block, unsigned smem_bytes,
               void** params) {
        if (sizeof...(P) > 0 && !params) die(name + ": launched without kernelParams");
        auto tup = params_all<P...>(params, name, std::index_sequence_for<P...>{});
        std::function<void()> body = [&] { std::apply(k, tup); };
        hdb_emu::launch(name, grid, block, smem_bytes, body);
    };
}

const std::map<std::string, Launcher>& kernels() {
    static const std::map<std::string, Launcher> m = {
#define HDB_EMU_KERNEL(name) {#name, make_launcher(name)},
        HDB_EMU_KERNELS
#undef HDB_EMU_KERNEL
    };
    return m;
}

struct Module {
    std::set<std::string> entries; // the PTX's .entry names
};

struct Function {
    std::string name;
    const Launcher* launcher;
    int max_dyn_smem = 48 * 1024;
};

std::set<Module*> g_modules;
std::map<std::pair<Module*, std::string>, Function*> g_functions;

std::set<std::string> ptx_entries(const char* ptx) {
    std::set<std::string> out;
    std::string s(ptx);
    for (size_t at = s.find(".entry"); at != std::string::npos; at = s.find(".entry", at + 6)) {
        size_t b = at + 6;
        while (b < s.size() && (s[b] == ' ' || s[b] == '\t')) ++b;
        size_t e = b;
        while (e < s.size() && (std::isalnum((unsigned char)s[e]) || s[e] == '_' || s[e] == '$'))
            ++e;
        if (e > b) out.insert(s.substr(b, e - b));
    }
    return out;
}

struct Event {
    std::chrono::steady_clock::time_point at{};
    bool recorded = false;
};

int g_ctx_token; // the primary context's handle points here

// ---------------------------------------------------------------------------------------------
// cuBLAS arithmetic
// ---------------------------------------------------------------------------------------------

// cudaDataType_t
enum : int { kR32F = 0, kR16F = 2, kR16BF = 14 };

size_t type_bytes(int t) { return t == kR32F ? 4 : (t == kR16F || t == kR16BF) ? 2 : 0; }

float load(int t, const void* p, size_t i) {
    switch (t) {
    case kR32F: return ((const float*)p)[i];
    case kR16F: return hdb_emu::f16_to_f32(((const uint16_t*)p)[i]);
    default: return hdb_emu::bf16_to_f32(((const uint16_t*)p)[i]);
    }
}

void store(int t, void* p, size_t i, float v) {
    switch (t) {
    case kR32F: ((float*)p)[i] = v; break;
    case kR16F: ((uint16_t*)p)[i] = hdb_emu::f32_to_f16(v); break;
    default: ((uint16_t*)p)[i] = hdb_emu::f32_to_bf16(v); break;
    }
}

// cublasStatus_t
enum : int { kBlasOk = 0, kBlasNotInit = 1, kBlasInvalid = 7, kBlasNotSupported = 15 };

struct Blas {
    void* stream = nullptr;
};
std::set<Blas*> g_blas;

// Bytes spanned by a column-major matrix of `rows` x `cols` with leading dimension ld.
size_t span(long long rows, long long cols, long long ld, size_t elem) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * elem;
}

// One strided-batched GEMM, every argument as cuBLAS documents it.
int gemm(Blas* h, int transa, int transb, long long m, long long n, long long k,
         const void* alpha, const void* A, int atype, long long lda, long long stride_a,
         const void* B, int btype, long long ldb, long long stride_b, const void* beta, void* C,
         int ctype, long long ldc, long long stride_c, long long batch, int compute,
         const char* fn) {
    Guard g(g_lock);
    const std::string what = fn;
    if (!g_blas.count(h)) return kBlasNotInit;
    if (m < 0 || n < 0 || k < 0 || batch < 0 || (transa != 0 && transa != 1) ||
        (transb != 0 && transb != 1) || !alpha || !beta) {
        note(what + ": invalid m/n/k/batch/transpose/alpha/beta");
        return kBlasInvalid;
    }
    const size_t ea = type_bytes(atype), eb = type_bytes(btype), ec = type_bytes(ctype);
    if (!ea || !eb || !ec) {
        note(what + ": unsupported data type");
        return kBlasNotSupported;
    }
    // op(A) is m x k: A is m x k (N) or k x m (T) as stored.
    const long long ar = transa ? k : m, ac = transa ? m : k;
    const long long br = transb ? n : k, bc = transb ? k : n;
    if (lda < std::max(1LL, ar) || ldb < std::max(1LL, br) || ldc < std::max(1LL, m)) {
        note(what + ": a leading dimension is below the matrix's rows (lda " +
             std::to_string(lda) + ", ldb " + std::to_string(ldb) + ", ldc " +
             std::to_string(ldc) + ")");
        return kBlasInvalid;
    }
    if (m == 0 || n == 0 || batch == 0) return kBlasOk;
    float al, be;
    if (compute == 64) { // CUBLAS_COMPUTE_16F: alpha and beta are half
        al = hdb_emu::f16_to_f32(*(const uint16_t*)alpha);
        be = hdb_emu::f16_to_f32(*(const uint16_t*)beta);
    } else {
        al = *(const float*)alpha;
        be = *(const float*)beta;
    }
    for (long long b = 0; b < batch; ++b) {
        const auto* a = (const unsigned char*)A + (size_t)(b * stride_a) * ea;
        const auto* bb = (const unsigned char*)B + (size_t)(b * stride_b) * eb;
        auto* c = (unsigned char*)C + (size_t)(b * stride_c) * ec;
        const std::string at = what + " batch " + std::to_string(b);
        if ((k > 0 && !in_device((uintptr_t)a, span(ar, ac, lda, ea), at + ": A")) ||
            (k > 0 && !in_device((uintptr_t)bb, span(br, bc, ldb, eb), at + ": B")) ||
            !in_device((uintptr_t)c, span(m, n, ldc, ec), at + ": C"))
            return kBlasInvalid;
        // op(A) as row-major m x k and op(B) as column-major k x n, in f32.
        std::vector<float> opa((size_t)(m * k)), opb((size_t)(k * n));
        for (long long i = 0; i < m; ++i)
            for (long long l = 0; l < k; ++l)
                opa[(size_t)(i * k + l)] =
                    load(atype, a, transa ? (size_t)(l + i * lda) : (size_t)(i + l * lda));
        for (long long j = 0; j < n; ++j)
            for (long long l = 0; l < k; ++l)
                opb[(size_t)(j * k + l)] =
                    load(btype, bb, transb ? (size_t)(j + l * ldb) : (size_t)(l + j * ldb));
        for (long long j = 0; j < n; ++j)
            for (long long i = 0; i < m; ++i) {
                const float* pa = &opa[(size_t)(i * k)];
                const float* pb = &opb[(size_t)(j * k)];
                // Products are exact in double; eight independent sums keep the loop fast.
                double acc[8] = {};
                long long l = 0;
                for (; l + 8 <= k; l += 8)
                    for (int u = 0; u < 8; ++u) acc[u] += (double)pa[l + u] * (double)pb[l + u];
                for (; l < k; ++l) acc[0] += (double)pa[l] * (double)pb[l];
                double s = 0;
                for (double a : acc) s += a;
                const size_t ci = (size_t)(i + j * ldc);
                float v = al * (float)s;
                if (be != 0.0f) v += be * load(ctype, c, ci);
                store(ctype, c, ci, v);
            }
    }
    check_guards(what);
    return kBlasOk;
}

} // namespace

// Faults on demand (see the top). Returns 0, or -1 for an unknown `what`.
EXPORT int hdb_emu_gpu_control(const char* what, long long value) {
    Guard g(g_lock);
    const std::string w = what ? what : "";
    ++g_fault_gen;
    g_fault_live = 0;
    g_fault_peak = 0;
    if (w == "memory_headroom") {
        g_limit = value < 0 ? -1 : value;
    } else if (w == "fail_launch") {
        g_fail_launch_in = value > 0 ? value : -1;
    } else {
        return -1;
    }
    return 0;
}

// Counters for tests (see the top). -1 for an unknown `what`.
EXPORT long long hdb_emu_gpu_stat(const char* what) {
    Guard g(g_lock);
    const std::string w = what ? what : "";
    if (w == "launches") return (long long)g_launches;
    if (w == "peak_bytes") return (long long)g_fault_peak;
    return -1;
}

// ---------------------------------------------------------------------------------------------
// Driver API
// ---------------------------------------------------------------------------------------------

EXPORT int cuInit(unsigned) { return kSuccess; }
EXPORT int cuDriverGetVersion(int* v) {
    if (!v) return kInvalidValue;
    *v = 12080;
    return kSuccess;
}
EXPORT int cuDeviceGetCount(int* n) {
    if (!n) return kInvalidValue;
    *n = 1;
    return kSuccess;
}
EXPORT int cuDeviceGet(int* d, int ordinal) {
    if (!d) return kInvalidValue;
    if (ordinal != 0) return kInvalidDevice;
    *d = 0;
    return kSuccess;
}
EXPORT int cuDeviceGetName(char* name, int len, int dev) {
    if (dev != 0) return kInvalidDevice;
    if (!name || len <= 0) return kInvalidValue;
    std::snprintf(name, (size_t)len, "%s", "hdb emulated GPU (tests/emu/gpu.cpp)");
    return kSuccess;
}
EXPORT int cuDeviceGetAttribute(int* v, int attr, int dev) {
    if (dev != 0) return kInvalidDevice;
    if (!v) return kInvalidValue;
    switch (attr) {
    case 75: *v = 9; break;   // compute capability major
    case 76: *v = 0; break;   // minor
    case 16: *v = 132; break; // multiprocessors, an H100 SXM's: the split heuristics (group norm,
                              // the implicit GEMM's split-K) choose here what they choose there
    case 115: *v = 0; break;  // memory pools: no (cuMemAlloc, not cuMemAllocAsync)
    case 97: *v = (int)hdb_emu::kMaxDynSmem; break; // max shared memory per block (opt-in)
    case 8: *v = 48 * 1024; break;  // shared memory per block
    case 1: *v = 1024; break;        // max threads per block
    case 10: *v = 32; break;         // warp size
    default: *v = 0; break;
    }
    return kSuccess;
}
EXPORT int cuDeviceTotalMem_v2(size_t* bytes, int dev) {
    if (dev != 0) return kInvalidDevice;
    if (!bytes) return kInvalidValue;
    *bytes = capacity();
    return kSuccess;
}
EXPORT int cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    if (dev != 0) return kInvalidDevice;
    if (!ctx) return kInvalidValue;
    *ctx = &g_ctx_token;
    return kSuccess;
}
EXPORT int cuDevicePrimaryCtxRelease_v2(int dev) { return dev == 0 ? kSuccess : kInvalidDevice; }
EXPORT int cuCtxSetCurrent(void*) { return kSuccess; }
EXPORT int cuCtxGetCurrent(void** ctx) {
    if (!ctx) return kInvalidValue;
    *ctx = &g_ctx_token;
    return kSuccess;
}
EXPORT int cuCtxGetDevice(int* d) {
    if (!d) return kInvalidValue;
    *d = 0;
    return kSuccess;
}
EXPORT int cuCtxSynchronize() { return kSuccess; }
EXPORT int cuCtxPushCurrent_v2(void*) { return kSuccess; }
EXPORT int cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) *ctx = &g_ctx_token;
    return kSuccess;
}

EXPORT int cuStreamCreate(void** s, unsigned) {
    if (!s) return kInvalidValue;
    *s = new int(0);
    return kSuccess;
}
EXPORT int cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
EXPORT int cuStreamDestroy_v2(void* s) {
    delete (int*)s;
    return kSuccess;
}
EXPORT int cuStreamSynchronize(void*) { return kSuccess; }
EXPORT int cuStreamQuery(void*) { return kSuccess; }
EXPORT int cuStreamWaitEvent(void*, void*, unsigned) { return kSuccess; }
EXPORT int cuStreamIsCapturing(void*, int* status) {
    if (!status) return kInvalidValue;
    *status = 0;
    return kSuccess;
}

EXPORT int cuEventCreate(void** e, unsigned) {
    if (!e) return kInvalidValue;
    *e = new Event();
    return kSuccess;
}
EXPORT int cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return kSuccess;
}
EXPORT int cuEventRecord(void* e, void*) {
    if (!e) return kInvalidHandle;
    ((Event*)e)->at = std::chrono::steady_clock::now();
    ((Event*)e)->recorded = true;
    return kSuccess;
}
EXPORT int cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
EXPORT int cuEventSynchronize(void* e) { return e ? kSuccess : kInvalidHandle; }
EXPORT int cuEventQuery(void* e) { return e ? kSuccess : kInvalidHandle; }
EXPORT int cuEventElapsedTime(float* ms, void* a, void* b) {
    if (!ms || !a || !b) return kInvalidValue;
    auto *ea = (Event*)a, *eb = (Event*)b;
    if (!ea->recorded || !eb->recorded) return kInvalidHandle;
    *ms = std::chrono::duration<float, std::milli>(eb->at - ea->at).count();
    return kSuccess;
}

EXPORT int cuMemAlloc_v2(unsigned long long* p, size_t bytes) {
    Guard g(g_lock);
    return mem_alloc(p, bytes);
}
EXPORT int cuMemAllocAsync(unsigned long long* p, size_t bytes, void*) {
    Guard g(g_lock);
    return mem_alloc(p, bytes);
}
EXPORT int cuMemFree_v2(unsigned long long p) {
    Guard g(g_lock);
    return mem_free(p);
}
EXPORT int cuMemFreeAsync(unsigned long long p, void*) {
    Guard g(g_lock);
    return mem_free(p);
}
EXPORT int cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    Guard g(g_lock);
    if (!free_bytes || !total) return kInvalidValue;
    *total = capacity();
    *free_bytes = capacity() - g_used;
    return kSuccess;
}
EXPORT int cuMemcpyHtoD_v2(unsigned long long dst, const void* src, size_t bytes) {
    Guard g(g_lock);
    if (bytes == 0) return kSuccess;
    if (!src || !in_device((uintptr_t)dst, bytes, "cuMemcpyHtoD destination")) return kInvalidValue;
    std::memcpy((void*)(uintptr_t)dst, src, bytes);
    return kSuccess;
}
EXPORT int cuMemcpyHtoDAsync_v2(unsigned long long dst, const void* src, size_t bytes, void*) {
    return cuMemcpyHtoD_v2(dst, src, bytes);
}
EXPORT int cuMemcpyDtoH_v2(void* dst, unsigned long long src, size_t bytes) {
    Guard g(g_lock);
    if (bytes == 0) return kSuccess;
    if (!dst || !in_device((uintptr_t)src, bytes, "cuMemcpyDtoH source")) return kInvalidValue;
    std::memcpy(dst, (const void*)(uintptr_t)src, bytes);
    return kSuccess;
}
EXPORT int cuMemcpyDtoHAsync_v2(void* dst, unsigned long long src, size_t bytes, void*) {
    return cuMemcpyDtoH_v2(dst, src, bytes);
}
EXPORT int cuMemcpyDtoD_v2(unsigned long long dst, unsigned long long src, size_t bytes) {
    Guard g(g_lock);
    if (bytes == 0) return kSuccess;
    if (!in_device((uintptr_t)dst, bytes, "cuMemcpyDtoD destination") ||
        !in_device((uintptr_t)src, bytes, "cuMemcpyDtoD source"))
        return kInvalidValue;
    std::memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, bytes);
    return kSuccess;
}
EXPORT int cuMemcpyDtoDAsync_v2(unsigned long long dst, unsigned long long src, size_t bytes, void*) {
    return cuMemcpyDtoD_v2(dst, src, bytes);
}
EXPORT int cuMemsetD8_v2(unsigned long long dst, unsigned char v, size_t n) {
    Guard g(g_lock);
    if (n == 0) return kSuccess;
    if (!in_device((uintptr_t)dst, n, "cuMemsetD8")) return kInvalidValue;
    std::memset((void*)(uintptr_t)dst, v, n);
    return kSuccess;
}
EXPORT int cuMemsetD8Async(unsigned long long dst, unsigned char v, size_t n, void*) {
    return cuMemsetD8_v2(dst, v, n);
}
EXPORT int cuMemsetD32_v2(unsigned long long dst, unsigned v, size_t n) {
    Guard g(g_lock);
    if (n == 0) return kSuccess;
    if (!in_device((uintptr_t)dst, n * 4, "cuMemsetD32")) return kInvalidValue;
    for (size_t i = 0; i < n; ++i) std::memcpy((unsigned char*)(uintptr_t)dst + 4 * i, &v, 4);
    return kSuccess;
}
EXPORT int cuMemsetD32Async(unsigned long long dst, unsigned v, size_t n, void*) {
    return cuMemsetD32_v2(dst, v, n);
}

EXPORT int cuModuleLoadData(void** module, const void* image) {
    Guard g(g_lock);
    if (!module || !image) return kInvalidValue;
    auto* m = new Module{ptx_entries((const char*)image)};
    if (m->entries.empty()) {
        note("cuModuleLoadData: the image has no .entry (not PTX from NVRTC?)");
        delete m;
        return kInvalidValue;
    }
    g_modules.insert(m);
    *module = m;
    return kSuccess;
}
EXPORT int cuModuleUnload(void* module) {
    Guard g(g_lock);
    auto* m = (Module*)module;
    if (!g_modules.erase(m)) return kInvalidHandle;
    for (auto it = g_functions.begin(); it != g_functions.end();)
        if (it->first.first == m) {
            delete it->second;
            it = g_functions.erase(it);
        } else {
            ++it;
        }
    delete m;
    return kSuccess;
}
EXPORT int cuModuleGetFunction(void** f, void* module, const char* name) {
    Guard g(g_lock);
    auto* m = (Module*)module;
    if (!f || !name) return kInvalidValue;
    if (!g_modules.count(m)) return kInvalidHandle;
    if (!m->entries.count(name)) return kNotFound;
    auto key = std::make_pair(m, std::string(name));
    if (auto it = g_functions.find(key); it != g_functions.end()) {
        *f = it->second;
        return kSuccess;
    }
    auto k = kernels().find(name);
    if (k == kernels().end()) {
        note(std::string("the PTX has kernel ") + name +
             " but the emulation was built without it (rebuild the emulated GPU)");
        return kNotFound;
    }
    auto* fn = new Function{name, &k->second};
    g_functions[key] = fn;
    *f = fn;
    return kSuccess;
}
EXPORT int cuFuncSetAttribute(void* f, int attr, int value) {
    Guard g(g_lock);
    if (!f) return kInvalidHandle;
    if (attr == 8) { // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > (int)hdb_emu::kMaxDynSmem) return kInvalidValue;
        ((Function*)f)->max_dyn_smem = value;
    }
    return kSuccess;
}
EXPORT int cuFuncGetAttribute(int* v, int attr, void* f) {
    if (!v || !f) return kInvalidValue;
    *v = attr == 8 ? ((Function*)f)->max_dyn_smem : 0;
    return kSuccess;
}
EXPORT int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned by, unsigned bz, unsigned smem, void*, void** params,
                          void** extra) {
    Guard g(g_lock);
    auto* fn = (Function*)f;
    if (!fn) return kInvalidHandle;
    if (extra) {
        note(fn->name + ": launched with `extra` (not emulated)");
        return kInvalidValue;
    }
    if ((int)smem > fn->max_dyn_smem) {
        note(fn->name + ": " + std::to_string(smem) +
             " bytes of dynamic shared memory without raising "
             "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (limit " +
             std::to_string(fn->max_dyn_smem) + ")");
        return kInvalidValue;
    }
    ++g_launches;
    if (g_fail_launch_in > 0 && --g_fail_launch_in == 0) {
        g_fail_launch_in = -1;
        note(fn->name + ": failing this launch as asked (hdb_emu_gpu_control fail_launch)");
        return kLaunchOutOfResources;
    }
    (*fn->launcher)(fn->name, dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, params);
    check_guards(fn->name);
    return kSuccess;
}

EXPORT int cuGetErrorName(int e, const char** s) {
    if (!s) return kInvalidValue;
    switch (e) {
    case kSuccess: *s = "CUDA_SUCCESS"; break;
    case kInvalidValue: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case kOutOfMemory: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case kInvalidDevice: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    case kInvalidHandle: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
    case kNotFound: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case kLaunchOutOfResources: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return kSuccess;
}
EXPORT int cuGetErrorString(int e, const char** s) { return cuGetErrorName(e, s); }

// ---------------------------------------------------------------------------------------------
// cuBLAS
// ---------------------------------------------------------------------------------------------

EXPORT int cublasCreate_v2(void** h) {
    Guard g(g_lock);
    if (!h) return kBlasInvalid;
    auto* b = new Blas();
    g_blas.insert(b);
    *h = b;
    return kBlasOk;
}
EXPORT int cublasDestroy_v2(void* h) {
    Guard g(g_lock);
    if (!g_blas.erase((Blas*)h)) return kBlasNotInit;
    delete (Blas*)h;
    return kBlasOk;
}
EXPORT int cublasSetStream_v2(void* h, void* s) {
    Guard g(g_lock);
    if (!g_blas.count((Blas*)h)) return kBlasNotInit;
    ((Blas*)h)->stream = s;
    return kBlasOk;
}
EXPORT int cublasGetStream_v2(void* h, void** s) {
    Guard g(g_lock);
    if (!g_blas.count((Blas*)h) || !s) return kBlasNotInit;
    *s = ((Blas*)h)->stream;
    return kBlasOk;
}
EXPORT int cublasSetMathMode(void* h, int) { return g_blas.count((Blas*)h) ? kBlasOk : kBlasNotInit; }
EXPORT int cublasSetWorkspace_v2(void* h, void*, size_t) {
    return g_blas.count((Blas*)h) ? kBlasOk : kBlasNotInit;
}
EXPORT int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha,
                          const float* A, int lda, const float* B, int ldb, const float* beta,
                          float* C, int ldc) {
    return gemm((Blas*)h, ta, tb, m, n, k, alpha, A, kR32F, lda, 0, B, kR32F, ldb, 0, beta, C,
                kR32F, ldc, 0, 1, 68, "cublasSgemm");
}
EXPORT int cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k,
                                     const float* alpha, const float* A, int lda, long long sa,
                                     const float* B, int ldb, long long sb, const float* beta,
                                     float* C, int ldc, long long sc, int batch) {
    return gemm((Blas*)h, ta, tb, m, n, k, alpha, A, kR32F, lda, sa, B, kR32F, ldb, sb, beta, C,
                kR32F, ldc, sc, batch, 68, "cublasSgemmStridedBatched");
}
EXPORT int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha,
                        const void* A, int atype, int lda, const void* B, int btype, int ldb,
                        const void* beta, void* C, int ctype, int ldc, int compute, int) {
    return gemm((Blas*)h, ta, tb, m, n, k, alpha, A, atype, lda, 0, B, btype, ldb, 0, beta, C,
                ctype, ldc, 0, 1, compute, "cublasGemmEx");
}
EXPORT int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k,
                                      const void* alpha, const void* A, int atype, int lda,
                                      long long sa, const void* B, int btype, int ldb,
                                      long long sb, const void* beta, void* C, int ctype,
                                      int ldc, long long sc, int batch, int compute, int) {
    return gemm((Blas*)h, ta, tb, m, n, k, alpha, A, atype, lda, sa, B, btype, ldb, sb, beta, C,
                ctype, ldc, sc, batch, compute, "cublasGemmStridedBatchedEx");
}
