// common.cuh: what every hdb kernel file shares. The Rust side (src/backend/cuda) pastes this
// file in place of each `#include "common.cuh"` before handing a source to NVRTC.
//
// Self-contained on purpose: no CUDA header is included (not cuda_fp16.h, not mma.h), so the
// kernels compile with libnvrtc alone. A machine that runs hdb needs the driver and libnvrtc,
// not a CUDA toolkit. Half types are raw 16-bit storage converted with the PTX `cvt`
// instructions that cuda_fp16.h itself uses; tensor-core code uses inline PTX `mma.sync`.
//
// Conventions of every kernel file:
// - Storage types: f32 = float, f16 = hdb_f16 (IEEE half), bf16 = hdb_bf16 (bfloat16).
//   Arithmetic and accumulation are f32; a result is rounded to the storage type once
//   (round to nearest even).
// - Kernel names are `<op>_<dtype>`, `extern "C"`, so the host finds them by name in the PTX.
// - Element counts and offsets that can pass 2^31 are `long long`.
// - Targets sm_80 and newer (bf16 conversion and mma.sync m16n8k16 need sm_80).
// - Every inline-PTX helper has an `#ifdef HDB_EMULATE` branch calling tests/emu/cuda_emu.h,
//   the host emulation tests/kernel_emulation/ runs the kernels under; NVRTC never defines
//   HDB_EMULATE, so the GPU code is the `#else` branch, unchanged.
#pragma once

// ---------------------------------------------------------------------------------------------
// Storage types
// ---------------------------------------------------------------------------------------------

struct hdb_f16 {
    unsigned short bits;
};
struct hdb_bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_f32(float x) { return x; }

__device__ __forceinline__ float to_f32(hdb_f16 x) {
#ifdef HDB_EMULATE
    return hdb_emu::f16_to_f32(x.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}

// bf16 is the high half of an f32: widening is exact.
__device__ __forceinline__ float to_f32(hdb_bf16 x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);

template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

template <> __device__ __forceinline__ hdb_f16 from_f32<hdb_f16>(float x) {
    hdb_f16 h;
#ifdef HDB_EMULATE
    h.bits = hdb_emu::f32_to_f16(x);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#endif
    return h;
}

template <> __device__ __forceinline__ hdb_bf16 from_f32<hdb_bf16>(float x) {
    hdb_bf16 h;
#ifdef HDB_EMULATE
    h.bits = hdb_emu::f32_to_bf16(x);
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#endif
    return h;
}

// Raw 16-bit pattern of `x` rounded to the half type T (for packing mma operands).
template <typename T> __device__ __forceinline__ unsigned int half_bits(float x) {
    return (unsigned int)from_f32<T>(x).bits;
}

// Two 16-bit values in one 32-bit register, `lo` in the low half: the element order mma.sync
// expects ("low to high").
__device__ __forceinline__ unsigned int pack2(unsigned int lo, unsigned int hi) {
    return (lo & 0xffffu) | (hi << 16);
}

// Two f32 values rounded (to nearest even) to the half type T and packed, `lo` in the low 16
// bits: one cvt.rn.{f16,bf16}x2.f32 instead of two conversions and a shift-or.
template <typename T> __device__ __forceinline__ unsigned int pack2_f32(float lo, float hi);
template <> __device__ __forceinline__ unsigned int pack2_f32<hdb_f16>(float lo, float hi) {
    unsigned int r;
#ifdef HDB_EMULATE
    r = (unsigned int)hdb_emu::f32_to_f16(lo) | ((unsigned int)hdb_emu::f32_to_f16(hi) << 16);
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
template <> __device__ __forceinline__ unsigned int pack2_f32<hdb_bf16>(float lo, float hi) {
    unsigned int r;
#ifdef HDB_EMULATE
    r = (unsigned int)hdb_emu::f32_to_bf16(lo) | ((unsigned int)hdb_emu::f32_to_bf16(hi) << 16);
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

// 2^x on the special-function unit, flushing subnormal results to zero (exp2f adds
// instructions to handle them). ex2(-inf) = +0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
#ifdef HDB_EMULATE
    y = hdb_emu::ex2_approx_ftz(x);
#else
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
#endif
    return y;
}

#define HDB_NEG_INF __int_as_float(0xff800000)

// ---------------------------------------------------------------------------------------------
// One low-rank factor pair, as lidb.cu (merge) and lora.cu (runtime) read it. Host mirror:
// `#[repr(C)] struct { down: u64, up: u64, rank: i32, scale: f32 }`, 24 bytes, 8-aligned.
// ---------------------------------------------------------------------------------------------

struct hdb_lora_factor {
    const float* down; // [rank, din] row-major
    const float* up;   // [dout, rank] row-major (LiDB: alpha already applied by compose)
    int rank;
    float scale; // the adapter's user scale; applied by the kernel
};

// ---------------------------------------------------------------------------------------------
// Reductions (blockDim.x a multiple of 32, at most 1024)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum of `v` over the block, returned to every thread. `scratch` is 32 floats of shared
// memory; the function synchronises before reusing it, so it may be called repeatedly.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads(); // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// ---------------------------------------------------------------------------------------------
// Instantiation helper: X(suffix, storage type) once per dtype.
// ---------------------------------------------------------------------------------------------

#define HDB_FOR_EACH_DTYPE(X) \
    X(f32, float)             \
    X(f16, hdb_f16)           \
    X(bf16, hdb_bf16)

#define HDB_FOR_EACH_HALF_DTYPE(X) \
    X(f16, hdb_f16)                \
    X(bf16, hdb_bf16)

// ---------------------------------------------------------------------------------------------
// 16-byte vector access: eight consecutive elements as f32 (two float4 for f32, one uint4 of
// halves otherwise), and raw 16-byte copies (bit-exact). Pointers must be 16-byte aligned.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void load8(const float* p, float (&x)[8]) {
    const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}
template <typename H> __device__ __forceinline__ void load8(const H* p, float (&x)[8]) {
    const uint4 u = *(const uint4*)p;
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        H lo, hi;
        lo.bits = (unsigned short)(w[i] & 0xffffu);
        hi.bits = (unsigned short)(w[i] >> 16);
        x[2 * i] = to_f32(lo);
        x[2 * i + 1] = to_f32(hi);
    }
}
__device__ __forceinline__ void store8(float* p, const float (&x)[8]) {
    ((float4*)p)[0] = make_float4(x[0], x[1], x[2], x[3]);
    ((float4*)p)[1] = make_float4(x[4], x[5], x[6], x[7]);
}
template <typename H> __device__ __forceinline__ void store8(H* p, const float (&x)[8]) {
    uint4 u;
    u.x = pack2(half_bits<H>(x[0]), half_bits<H>(x[1]));
    u.y = pack2(half_bits<H>(x[2]), half_bits<H>(x[3]));
    u.z = pack2(half_bits<H>(x[4]), half_bits<H>(x[5]));
    u.w = pack2(half_bits<H>(x[6]), half_bits<H>(x[7]));
    *(uint4*)p = u;
}
template <typename T> __device__ __forceinline__ void copy8(T* dst, const T* src) {
#pragma unroll
    for (int i = 0; i < (int)(8 * sizeof(T) / 16); ++i) ((uint4*)dst)[i] = ((const uint4*)src)[i];
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return ((unsigned long long)p & 15ull) == 0;
}

// ---------------------------------------------------------------------------------------------
// Tensor cores and asynchronous copies (sm_80+), shared by attention.cu and conv_igemm.cu
// ---------------------------------------------------------------------------------------------

// D += A (16x16, row) . B (16x8, col), f32 accumulators; fragment layouts per the PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type" (g = lane / 4, t = lane % 4):
//   a[0]: A[g][2t, 2t+1]  a[1]: A[g+8][2t, 2t+1]  a[2]: A[g][2t+8, 2t+9]  a[3]: A[g+8][2t+8, 2t+9]
//   b0: B[2t, 2t+1][g]    b1: B[2t+8, 2t+9][g]
//   c[0], c[1]: C[g][2t, 2t+1]   c[2], c[3]: C[g+8][2t, 2t+1]
// (lower element index in the low 16 bits of each register).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                                          unsigned int b1);

template <>
__device__ __forceinline__ void mma_16816<hdb_f16>(float (&c)[4], const unsigned int (&a)[4],
                                                   unsigned int b0, unsigned int b1) {
#ifdef HDB_EMULATE
    hdb_emu::mma_sync(hdb_emu::Half::F16, 16, c, a, b0, b1);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<hdb_bf16>(float (&c)[4], const unsigned int (&a)[4],
                                                    unsigned int b0, unsigned int b1) {
#ifdef HDB_EMULATE
    hdb_emu::mma_sync(hdb_emu::Half::BF16, 16, c, a, b0, b1);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// The 32-bit shared-memory address of a generic pointer into shared memory (for ldmatrix and
// cp.async operands).
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    unsigned int a;
#ifdef HDB_EMULATE
    a = hdb_emu::smem_addr(p);
#else
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
#endif
    return a;
}

// 16 bytes global -> shared, asynchronously; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(unsigned int dst, const void* src, int src_bytes) {
#ifdef HDB_EMULATE
    hdb_emu::cp_async16(dst, src, src_bytes);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef HDB_EMULATE
    hdb_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;");
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef HDB_EMULATE
    hdb_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldsm_x4(unsigned int (&r)[4], unsigned int addr) {
#ifdef HDB_EMULATE
    hdb_emu::ldmatrix(4, false, r, addr);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}
__device__ __forceinline__ void ldsm_x4_t(unsigned int (&r)[4], unsigned int addr) {
#ifdef HDB_EMULATE
    hdb_emu::ldmatrix(4, true, r, addr);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

// ldmatrix.x2.trans: the B fragment (b0, b1) of one 8-column n-tile from a row-major
// [k][n] tile; lanes 0-15 give the row addresses (lanes 16-31's are ignored).
__device__ __forceinline__ void ldsm_x2_t(unsigned int& r0, unsigned int& r1, unsigned int addr) {
#ifdef HDB_EMULATE
    unsigned int r[2];
    hdb_emu::ldmatrix(2, true, r, addr);
    r0 = r[0];
    r1 = r[1];
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r0), "=r"(r1)
                 : "r"(addr));
#endif
}
