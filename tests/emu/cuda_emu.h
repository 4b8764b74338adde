// cuda_emu.h: just enough of CUDA's execution model, in host C++20, to compile and run hdb's
// kernels (kernels/*.cu) on a machine without a GPU. tests/backend_ops/ (its emu:: tests) builds
// tests/emu/driver.cpp (which includes this header, then the kernel files) and compares each
// kernel's output with the CPU backend.
//
// What it models:
// - Blocks run one after another; the threads of a block run as cooperative fibers on one OS
//   thread, in thread order, each until it reaches a barrier (__syncthreads, a warp collective)
//   or exits. Deterministic: the same launch always interleaves the same way.
// - __shared__ variables are `thread_local` (function-local ones are therefore static): every
//   fiber of the block sees the same storage, as on a GPU. `extern __shared__` (dynamic shared
//   memory) is the global `smem` array below; the kernels name it `smem`.
// - Warp collectives (__shfl*_sync, __syncwarp, mma.sync, ldmatrix) wait for every live lane of
//   the warp. A full-mask collective in a warp with an exited lane, a thread exiting while its
//   warp waits in a collective, and a barrier nobody can pass (divergent __syncthreads) are
//   reported as errors: undefined behaviour on a GPU.
// - The inline-PTX helpers of kernels/common.cuh (its `#ifdef HDB_EMULATE` branches call the
//   functions of namespace hdb_emu): cvt.rn to f16/bf16 (round to nearest even), ex2.approx.ftz
//   (exp2f with subnormals flushed), mma.sync m16n8k16 / m16n8k8 with the PTX ISA's fragment
//   layouts (products exact, the sum in double, rounded once to f32), ldmatrix x1/x2/x4 (+trans),
//   cp.async (copies deferred until the cp.async.wait_group that covers them, so a kernel that
//   reads a stage before waiting sees stale data), cvta.to.shared (32-bit offsets from a
//   thread-local anchor).
// - Launch limits (block <= 1024 threads, grid y and z <= 65535, dynamic shared memory <= 227 KB)
//   are errors; all shared memory (static and dynamic) starts every block as 0xFF bytes (NaN in
//   every float type), and a write past the launch's dynamic size is an error.
// - The schedule can run each pass's fibers in reverse thread order (Runtime::reverse): a kernel
//   whose result differs between the two orders has a race (a missing barrier).
// What it does not model: timing, occupancy, registers, memory-model races between warps that
// the sequential schedule hides, bank conflicts, the real rounding of tensor-core accumulation
// or of ex2.approx / __expf, and memory fences. It is no substitute for scripts/gpu-check.sh.
#pragma once

#ifndef HDB_EMULATE
#define HDB_EMULATE 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

// Switching fibers: on x86-64 a few instructions (callee-saved registers, the stack pointer,
// MXCSR and the x87 control word), as the ABI needs; elsewhere ucontext, whose swapcontext
// makes two system calls a switch (the signal mask) and was 80% of the emulation's time.
#if defined(__x86_64__) && !defined(HDB_EMU_UCONTEXT)
#define HDB_EMU_FAST_SWITCH 1
extern "C" void hdb_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl hdb_emu_switch
    .hidden hdb_emu_switch
    .type hdb_emu_switch, @function
hdb_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size hdb_emu_switch, .-hdb_emu_switch
)");
#endif
#include <unistd.h>

// ---------------------------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local

// ---------------------------------------------------------------------------------------------
// Vector types and bit casts
// ---------------------------------------------------------------------------------------------

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// Fast-math intrinsics: the accurate functions (the GPU's are approximations; see the top).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

namespace hdb_emu {

[[noreturn]] inline void fail(const std::string& msg) {
    std::fprintf(stderr, "cuda_emu: %s\n", msg.c_str());
    std::fflush(stderr);
    std::exit(3);
}

// ---------------------------------------------------------------------------------------------
// f16 / bf16 conversions (cvt.rn semantics: round to nearest even; NaN -> canonical 0x7fff)
// ---------------------------------------------------------------------------------------------

inline float f16_to_f32(uint16_t h) {
    const uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float v = (float)m * 0x1p-24f; // subnormal (or zero): exact
        return __uint_as_float(__float_as_uint(v) | s);
    }
    if (e == 31) return __uint_as_float(s | 0x7f800000u | (m << 13));
    return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t f32_to_f16(float f) {
    const uint32_t x = __float_as_uint(f);
    const uint32_t s = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;                   // NaN
    if (ax >= 0x477ff000u) return (uint16_t)(s | 0x7c00u); // >= 65520 rounds to inf
    if (ax < 0x38800000u) {
        // Below 2^-14: a multiple of 2^-24 (the subnormal step), nearest even; 1024 of them is
        // the smallest normal, which the same encoding expresses.
        const float units = __uint_as_float(ax) * 0x1p24f; // exact (power-of-two scale)
        return (uint16_t)(s | (uint32_t)std::nearbyint(units));
    }
    const uint32_t e = (ax >> 23) - 112u, m = ax & 0x7fffffu;
    uint32_t h = (e << 10) | (m >> 13);
    const uint32_t rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h; // a carry into the exponent is right
    return (uint16_t)(s | h);
}

inline float bf16_to_f32(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }

inline uint16_t f32_to_bf16(float f) {
    const uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff; // NaN
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

enum class Half { F16, BF16 };

inline float half_to_f32(Half k, uint32_t bits) {
    return k == Half::F16 ? f16_to_f32((uint16_t)bits) : bf16_to_f32((uint16_t)bits);
}

// ex2.approx.ftz.f32: subnormal inputs and results are flushed to (signed) zero.
inline float ex2_approx_ftz(float x) {
    if (std::fpclassify(x) == FP_SUBNORMAL) x = std::copysign(0.0f, x);
    float y = exp2f(x);
    if (std::fpclassify(y) == FP_SUBNORMAL) y = std::copysign(0.0f, y);
    return y;
}

// ---------------------------------------------------------------------------------------------
// Fibers
// ---------------------------------------------------------------------------------------------

enum class State { Runnable, WaitBlock, WaitWarp, Done };

struct CpAsync {
    void* dst;
    const void* src;
    int src_bytes;
    long long group; // -1 until committed
};

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
#ifdef HDB_EMU_FAST_SWITCH
    void* sp = nullptr; // saved stack pointer while switched out
#else
    ucontext_t ctx;
#endif
    void* stack = nullptr; // kStackBytes plus a guard page below
    State state = State::Runnable;
    uint3 tid{0, 0, 0};
    int linear = 0, lane = 0, warp = 0;
    unsigned long long coll_seq = 0; // warp collectives this thread has executed
    std::vector<CpAsync> pending;
    long long groups = 0; // cp.async groups committed
};

constexpr int kSlotBytes = 64;

struct Warp {
    int lanes = 0;   // threads of the block in this warp
    int exited = 0;  // of which have returned
    int arrived = 0; // waiting in the current collective
    alignas(16) unsigned char in[2][32][kSlotBytes];
    alignas(16) unsigned char out[2][32][kSlotBytes];
};

struct Runtime {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
#ifdef HDB_EMU_FAST_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    Fiber* cur = nullptr;
    int live = 0;
    int block_arrived = 0;
    const std::function<void()>* body = nullptr;
    uint3 block_idx{0, 0, 0};
    dim3 block_dim, grid_dim;
    std::string kernel;
    bool reverse = false; // run the fibers of a pass in reverse thread order
};

inline Runtime& rt() {
    static Runtime r;
    return r;
}
inline Fiber& cur() { return *rt().cur; }

inline void yield_to_scheduler() {
    Fiber& f = cur();
#ifdef HDB_EMU_FAST_SWITCH
    hdb_emu_switch(&f.sp, rt().sched_sp);
#else
    if (swapcontext(&f.ctx, &rt().sched) != 0) fail("swapcontext failed");
#endif
}

inline void fiber_entry() {
    (*rt().body)();
    Fiber& f = cur();
    f.state = State::Done;
#ifdef HDB_EMU_FAST_SWITCH
    void* dead;
    hdb_emu_switch(&dead, rt().sched_sp); // never resumed
    std::abort();
#else
    // uc_link returns to the scheduler.
#endif
}

inline void* alloc_stack() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    if (mprotect(p, page, PROT_NONE) != 0) fail("cannot protect a fiber stack's guard page");
    return (char*)p + page;
}

// ---------------------------------------------------------------------------------------------
// Barriers
// ---------------------------------------------------------------------------------------------

inline void __syncthreads_impl() {
    Runtime& r = rt();
    Fiber& f = cur();
    if (++r.block_arrived == r.live) {
        r.block_arrived = 0;
        for (Fiber& o : r.fibers)
            if (o.state == State::WaitBlock) o.state = State::Runnable;
        return; // the last to arrive passes at once
    }
    f.state = State::WaitBlock;
    yield_to_scheduler();
}

// One warp-wide rendezvous. `publish` writes this lane's input slot; the last lane to arrive
// runs `all` (which may read every lane's input and write every lane's output) before anyone
// leaves. Returns the slot parity the caller reads its result from.
inline int warp_rendezvous(const std::function<void(unsigned char*)>& publish,
                           const std::function<void(Warp&, int parity)>& all, unsigned mask,
                           const char* what) {
    Runtime& r = rt();
    Fiber& f = cur();
    Warp& w = r.warps[f.warp];
    if (mask != 0xffffffffu)
        fail(std::string(what) + ": only full-mask warp collectives are emulated (kernel " +
             r.kernel + ")");
    if (w.lanes != 32)
        fail(std::string(what) + " in a partial warp (blockDim not a multiple of 32) in " +
             r.kernel);
    if (w.exited > 0)
        fail(std::string(what) + " with mask 0xffffffff after a lane of warp " +
             std::to_string(f.warp) + " exited (undefined on a GPU) in " + r.kernel);
    const int parity = (int)(f.coll_seq++ & 1);
    if (publish) publish(w.in[parity][f.lane]);
    if (++w.arrived == w.lanes) {
        w.arrived = 0;
        if (all) all(w, parity);
        // The warp's threads are fibers 32 * warp ... + lanes - 1.
        for (int i = f.warp * 32; i < f.warp * 32 + w.lanes; ++i)
            if (r.fibers[i].state == State::WaitWarp) r.fibers[i].state = State::Runnable;
        return parity;
    }
    f.state = State::WaitWarp;
    yield_to_scheduler();
    return parity;
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

constexpr unsigned kMaxDynSmem = 227 * 1024;

} // namespace hdb_emu

// Dynamic shared memory: `extern __shared__ ... unsigned short smem[]` in a kernel names this.
// Build with -fno-extern-tls-init: g++ otherwise calls a (null) TLS init function for the
// block-scope `extern thread_local` declaration of an array of unknown bound in a template.
alignas(16) inline thread_local unsigned short smem[hdb_emu::kMaxDynSmem / 2 + 64];

namespace hdb_emu {

// The thread-local block holding the kernels' __shared__ variables (`smem` included) on the
// calling thread, or {nullptr, 0} when the loader does not say: the executable's, or, built
// with HDB_EMU_SHARED_LIBRARY (tests/emu/gpu.cpp), the block of the library this code is in.
struct TlsBlock {
    unsigned char* data = nullptr;
    size_t bytes = 0;
};
inline thread_local unsigned char tls_probe;
inline TlsBlock main_tls_block() {
    struct Search {
        TlsBlock found;
        ElfW(Addr) base = 0;
        bool library = false;
    } s;
#ifdef HDB_EMU_SHARED_LIBRARY
    // A library's block is allocated on a thread's first access: touch it, then find the
    // library by its load address.
    tls_probe = 0;
    Dl_info info;
    if (dladdr((void*)&main_tls_block, &info) == 0) return {};
    s.base = (ElfW(Addr))info.dli_fbase;
    s.library = true;
#endif
    dl_iterate_phdr(
        [](struct dl_phdr_info* info, size_t, void* out) -> int {
            auto* s = static_cast<Search*>(out);
            if (s->library ? info->dlpi_addr != s->base
                           : (info->dlpi_name && info->dlpi_name[0] != '\0'))
                return 0; // not the module that holds the kernels
            for (int i = 0; i < info->dlpi_phnum; ++i)
                if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_tls_data) {
                    s->found.data = static_cast<unsigned char*>(info->dlpi_tls_data);
                    s->found.bytes = info->dlpi_phdr[i].p_memsz;
                }
            return 1;
        },
        &s);
    return s.found;
}

inline void run_block() {
    Runtime& r = rt();
    const int n = (int)(r.block_dim.x * r.block_dim.y * r.block_dim.z);
    if ((int)r.fibers.size() < n) r.fibers.resize(n);
    const int nwarps = (n + 31) / 32;
    r.warps.assign(nwarps, Warp{});
    for (int i = 0; i < n; ++i) {
        Fiber& f = r.fibers[i];
        if (!f.stack) f.stack = alloc_stack();
        f.state = State::Runnable;
        f.linear = i;
        f.lane = i & 31;
        f.warp = i >> 5;
        f.tid = uint3{i % r.block_dim.x, (i / r.block_dim.x) % r.block_dim.y,
                      i / (r.block_dim.x * r.block_dim.y)};
        f.coll_seq = 0;
        f.pending.clear();
        f.groups = 0;
        r.warps[f.warp].lanes++;
#ifdef HDB_EMU_FAST_SWITCH
        // A stack hdb_emu_switch can load: the control word slot, six callee-saved registers,
        // then fiber_entry as the return address, 16-byte aligned as after a call.
        auto* top = (unsigned char*)f.stack + kStackBytes;
        auto* frame = (uint64_t*)(top - 72);
        std::memset(frame, 0, 72);
        uint32_t csr[2];
        asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
        std::memcpy(frame, csr, 8);
        frame[7] = (uint64_t)(uintptr_t)&fiber_entry; // at top - 16
        f.sp = frame;
#else
        if (getcontext(&f.ctx) != 0) fail("getcontext failed");
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = &r.sched;
        makecontext(&f.ctx, (void (*)())fiber_entry, 0);
#endif
    }
    r.live = n;
    r.block_arrived = 0;
    while (r.live > 0) {
        bool ran = false;
        for (int ii = 0; ii < n; ++ii) {
            const int i = r.reverse ? n - 1 - ii : ii;
            Fiber& f = r.fibers[i];
            if (f.state != State::Runnable) continue;
            ran = true;
            r.cur = &f;
#ifdef HDB_EMU_FAST_SWITCH
            hdb_emu_switch(&r.sched_sp, f.sp);
#else
            if (swapcontext(&r.sched, &f.ctx) != 0) fail("swapcontext failed");
#endif
            r.cur = nullptr;
            if (f.state == State::Done) {
                --r.live;
                Warp& w = r.warps[f.warp];
                ++w.exited;
                if (w.arrived > 0)
                    fail("thread " + std::to_string(i) + " of " + r.kernel +
                         " exited while its warp waits in a full-mask collective");
                // Exited threads no longer count at __syncthreads.
                if (r.live > 0 && r.block_arrived == r.live) {
                    r.block_arrived = 0;
                    for (Fiber& o : r.fibers)
                        if (o.state == State::WaitBlock) o.state = State::Runnable;
                }
            }
        }
        if (!ran && r.live > 0) {
            std::string s;
            for (int i = 0; i < n; ++i)
                s += r.fibers[i].state == State::WaitBlock  ? 'B'
                     : r.fibers[i].state == State::WaitWarp ? 'W'
                     : r.fibers[i].state == State::Done     ? '.'
                                                            : 'R';
            fail("deadlock in " + r.kernel + " block (" + std::to_string(r.block_idx.x) + ", " +
                 std::to_string(r.block_idx.y) + ", " + std::to_string(r.block_idx.z) +
                 "): threads wait at barriers nobody else reaches (B = __syncthreads, W = warp "
                 "collective, . = exited): " +
                 s);
        }
    }
}

// Runs `body` (the kernel call) for every block of grid x block, with `smem_bytes` of dynamic
// shared memory.
inline void launch(const std::string& kernel, dim3 grid, dim3 block, unsigned smem_bytes,
                   const std::function<void()>& body) {
    Runtime& r = rt();
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64)
        fail(kernel + ": block " + std::to_string(block.x) + " x " + std::to_string(block.y) +
             " x " + std::to_string(block.z) + " is not a valid CUDA block");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
        grid.z > 65535)
        fail(kernel + ": grid " + std::to_string(grid.x) + " x " + std::to_string(grid.y) +
             " x " + std::to_string(grid.z) + " is not a valid CUDA grid");
    if (smem_bytes > kMaxDynSmem)
        fail(kernel + ": " + std::to_string(smem_bytes) + " bytes of dynamic shared memory");
    r.kernel = kernel;
    r.body = &body;
    r.block_dim = block;
    r.grid_dim = grid;
    unsigned char* dyn = (unsigned char*)smem;
    const size_t dyn_total = sizeof(smem);
    // Per call: each OS thread has its own block (the emulated GPU is called from several).
    const TlsBlock tls = main_tls_block();
    // The thread-local block holds `smem` (227 KB) and the static __shared__ variables: reset
    // the two parts around `smem` each block, and of `smem` only the launch's bytes.
    unsigned char *before = nullptr, *after = nullptr, *tls_end = nullptr;
    if (tls.data) {
        tls_end = tls.data + tls.bytes;
        before = dyn >= tls.data && dyn + dyn_total <= tls_end ? dyn : tls_end;
        after = before == dyn ? dyn + dyn_total : tls_end;
    }
    // Past the launch's bytes, `smem` holds a pattern: checked after each block within 4 KB of
    // the end (where an overrun lands), and all of it after the launch.
    std::memset(dyn + smem_bytes, 0xa5, dyn_total - smem_bytes);
    static const std::vector<unsigned char> pattern(dyn_total, 0xa5);
    auto check_past = [&](size_t bytes) {
        const size_t n = std::min(bytes, dyn_total - smem_bytes);
        if (std::memcmp(dyn + smem_bytes, pattern.data(), n) == 0) return;
        size_t i = smem_bytes;
        while (dyn[i] == 0xa5) ++i;
        fail(kernel + " wrote dynamic shared memory at byte " + std::to_string(i) +
             ", past the launch's " + std::to_string(smem_bytes) + " bytes");
    };
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                r.block_idx = uint3{x, y, z};
                // Shared memory is uninitialised on a GPU: every __shared__ variable starts as
                // 0xFF bytes (NaN in every float type), not as the previous block left it.
                if (tls.data) {
                    std::memset(tls.data, 0xff, (size_t)(before - tls.data));
                    std::memset(after, 0xff, (size_t)(tls_end - after));
                }
                std::memset(dyn, 0xff, smem_bytes);
                run_block();
                check_past(4096);
            }
    check_past(dyn_total);
    r.body = nullptr;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory addresses and cp.async
// ---------------------------------------------------------------------------------------------

inline thread_local unsigned char smem_anchor;

inline unsigned int smem_addr(const void* p) {
    return (unsigned int)((uintptr_t)p - (uintptr_t)&smem_anchor);
}
inline unsigned char* smem_ptr(unsigned int a) {
    const int32_t off = (int32_t)a;
    if (off > (1 << 28) || off < -(1 << 28))
        fail("a shared-memory address (" + std::to_string(a) +
             ") that no __shared__ variable yields, in " + rt().kernel);
    return &smem_anchor + off;
}

inline void cp_async16(unsigned int dst, const void* src, int src_bytes) {
    if (src_bytes < 0 || src_bytes > 16) fail("cp.async with src-size " + std::to_string(src_bytes));
    if (dst % 16 != 0 && (uintptr_t)smem_ptr(dst) % 16 != 0)
        fail("cp.async.cg to a shared address that is not 16-byte aligned in " + rt().kernel);
    if (src_bytes > 0 && (uintptr_t)src % 16 != 0)
        fail("cp.async.cg from a global address that is not 16-byte aligned in " + rt().kernel);
    cur().pending.push_back(CpAsync{smem_ptr(dst), src, src_bytes, -1});
}
inline void cp_async_commit() {
    Fiber& f = cur();
    for (CpAsync& c : f.pending)
        if (c.group < 0) c.group = f.groups;
    ++f.groups;
}
// cp.async.wait_group n: every committed group but the newest n is complete.
inline void cp_async_wait(int n) {
    Fiber& f = cur();
    std::vector<CpAsync> keep;
    for (CpAsync& c : f.pending) {
        if (c.group >= 0 && c.group < f.groups - n) {
            unsigned char* d = (unsigned char*)c.dst;
            if (c.src_bytes > 0) std::memcpy(d, c.src, (size_t)c.src_bytes);
            std::memset(d + c.src_bytes, 0, (size_t)(16 - c.src_bytes));
        } else {
            keep.push_back(c);
        }
    }
    f.pending.swap(keep);
}

// ---------------------------------------------------------------------------------------------
// Warp shuffles
// ---------------------------------------------------------------------------------------------

template <typename T> inline T shfl_from(unsigned mask, T v, int (*src_of)(int, int, int), int arg,
                                         int width, const char* what) {
    static_assert(sizeof(T) <= kSlotBytes, "shuffle of a large type");
    const int lane = cur().lane;
    const int parity = warp_rendezvous([&](unsigned char* s) { std::memcpy(s, &v, sizeof(T)); },
                                       nullptr, mask, what);
    const int src = src_of(lane, arg, width);
    T out;
    std::memcpy(&out, rt().warps[cur().warp].in[parity][src], sizeof(T));
    return out;
}

inline int src_idx(int lane, int s, int width) { return (lane & ~(width - 1)) + (s & (width - 1)); }
inline int src_xor(int lane, int m, int width) {
    const int s = lane ^ m;
    return (s & ~(width - 1)) == (lane & ~(width - 1)) ? s : lane;
}
inline int src_down(int lane, int d, int width) {
    const int s = lane + d;
    return (s & ~(width - 1)) == (lane & ~(width - 1)) ? s : lane;
}
inline int src_up(int lane, int d, int width) {
    const int s = lane - d;
    return s >= (lane & ~(width - 1)) ? s : lane;
}

// ---------------------------------------------------------------------------------------------
// Tensor cores: mma.sync m16n8k16 / m16n8k8 (row.col, f32 accumulate), PTX ISA fragment layouts
// (g = lane / 4, t = lane % 4; lower element index in the low 16 bits of a register):
//   m16n8k16 A: a[r] holds A[g + 8 (r & 1)][2t + 8 (r >> 1) + {0, 1}]
//            B: b[r] holds B[2t + 8 r + {0, 1}][g]
//   m16n8k8  A: a[r] holds A[g + 8 r][2t + {0, 1}];  B: b0 holds B[2t + {0, 1}][g]
//   C/D: c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1]
// ---------------------------------------------------------------------------------------------

struct MmaIn {
    unsigned int a[4];
    unsigned int b[2];
};

inline void mma_sync(Half kind, int ksize, float (&c)[4], const unsigned int* a, unsigned int b0,
                     unsigned int b1) {
    MmaIn mine{};
    for (int i = 0; i < (ksize == 16 ? 4 : 2); ++i) mine.a[i] = a[i];
    mine.b[0] = b0;
    mine.b[1] = b1;
    const int parity = warp_rendezvous(
        [&](unsigned char* s) { std::memcpy(s, &mine, sizeof(MmaIn)); }, nullptr, 0xffffffffu,
        "mma.sync");
    const Warp& w = rt().warps[cur().warp];
    auto in = [&](int lane) -> const MmaIn& {
        return *reinterpret_cast<const MmaIn*>(w.in[parity][lane]);
    };
    auto elem = [&](unsigned reg, int k) { return half_to_f32(kind, (reg >> (16 * (k & 1))) & 0xffffu); };
    auto A = [&](int row, int k) -> float {
        const MmaIn& s = in(4 * (row & 7) + ((k & 7) >> 1));
        const int reg = ksize == 16 ? (row >> 3) + 2 * (k >> 3) : (row >> 3);
        return elem(s.a[reg], k);
    };
    auto B = [&](int k, int n) -> float {
        const MmaIn& s = in(4 * n + ((k & 7) >> 1));
        return elem(s.b[k >> 3], k);
    };
    const int lane = cur().lane, g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        double sum = c[e];
        for (int k = 0; k < ksize; ++k) sum += (double)A(row, k) * (double)B(k, col);
        c[e] = (float)sum;
    }
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: matrix i's 8 row addresses come from
// lanes 8i .. 8i+7 (16 bytes a row, 16-byte aligned). Lane L receives, in register i,
// elements (L / 4, 2 (L % 4) + {0, 1}) of matrix i, or with .trans (2 (L % 4) + {0, 1}, L / 4).
// All lanes read shared memory at the same moment (the last lane to arrive reads for all).
// ---------------------------------------------------------------------------------------------

inline void ldmatrix(int num, bool trans, unsigned int* r, unsigned int addr) {
    const int parity = warp_rendezvous(
        [&](unsigned char* s) { std::memcpy(s, &addr, 4); },
        [&](Warp& w, int p) {
            for (int L = 0; L < 32; ++L) {
                unsigned int regs[4] = {0, 0, 0, 0};
                for (int i = 0; i < num; ++i) {
                    auto at = [&](int row, int col) -> unsigned int {
                        unsigned int ra;
                        std::memcpy(&ra, w.in[p][8 * i + row], 4);
                        if (ra % 16 != 0)
                            fail("ldmatrix row address not 16-byte aligned in " + rt().kernel);
                        uint16_t v;
                        std::memcpy(&v, smem_ptr(ra) + 2 * col, 2);
                        return v;
                    };
                    const int q = L >> 2, c2 = 2 * (L & 3);
                    const unsigned lo = trans ? at(c2, q) : at(q, c2);
                    const unsigned hi = trans ? at(c2 + 1, q) : at(q, c2 + 1);
                    regs[i] = lo | (hi << 16);
                }
                std::memcpy(w.out[p][L], regs, sizeof(regs));
            }
        },
        0xffffffffu, "ldmatrix");
    std::memcpy(r, rt().warps[cur().warp].out[parity][cur().lane], 4 * (size_t)num);
}

} // namespace hdb_emu

// ---------------------------------------------------------------------------------------------
// CUDA built-ins
// ---------------------------------------------------------------------------------------------

#define threadIdx (::hdb_emu::cur().tid)
#define blockIdx (::hdb_emu::rt().block_idx)
#define blockDim (::hdb_emu::rt().block_dim)
#define gridDim (::hdb_emu::rt().grid_dim)

inline void __syncthreads() { hdb_emu::__syncthreads_impl(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    hdb_emu::warp_rendezvous(nullptr, nullptr, mask, "__syncwarp");
}
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return hdb_emu::shfl_from(mask, v, hdb_emu::src_idx, src, width, "__shfl_sync");
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    return hdb_emu::shfl_from(mask, v, hdb_emu::src_xor, m, width, "__shfl_xor_sync");
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return hdb_emu::shfl_from(mask, v, hdb_emu::src_down, (int)d, width, "__shfl_down_sync");
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return hdb_emu::shfl_from(mask, v, hdb_emu::src_up, (int)d, width, "__shfl_up_sync");
}
