// conv_igemm.cu: conv2d as an implicit GEMM on the tensor cores: no im2col buffer, the input
// patches are gathered from x straight into shared memory, tile by tile. Beside conv.cu's
// im2col + cuBLAS path so that a GPU run can measure both (`hdb bench cuda`).
//
// Checked on an H100 (2026-11-26, session 6) against backend::cpu::conv2d by tests/cuda_parity/
// (conv2d_implicit_matches_cpu) and tests/cuda_backend.rs, with or without split-K; on the host
// under tests/emu's CUDA emulation by tests/kernel_emulation/. On that H100 it beat im2col +
// cuBLAS at every SD 1.5 UNet and VAE shape with up to 512 output channels (docs/perf.md), so
// the generic backend takes it there (ops::conv2d_prefers_implicit).
//
// Layout (as conv.cu and the CPU backend): x [batch, c_in, h, w], weight [c_out, c_in, k, k],
// y [batch, c_out, oh, ow], all NCHW and dense; zero padding `pad` on every side, stride
// `stride`, square kernel k; oh = (h + 2 pad - k) / stride + 1, likewise ow. bias [c_out] or
// null. y may not overlap x, weight or bias. The host checks c_in*h*w, c_in*k*k, oh*ow and
// c_out*oh*ow below 2^31 (in-sample offsets are int; sample offsets long long).
//
// The GEMM, per sample b: Y_b [M = c_out, N = oh*ow] = W [M, K = c_in*k*k] . B_b [K, N], where
// B_b[(ci, ky, kx)][(oy, ox)] = x[b, ci, oy*stride - pad + ky, ox*stride - pad + kx] (zero
// outside the image): im2col's matrix, never written out.
//
// ---------------------------------------------------------------------------------------------
// conv2d_igemm_{f16,bf16}(T* y, float* partial, const T* x, const T* weight, const T* bias,
//                         int batch, int c_in, int h, int w, int c_out, int k, int stride,
//                         int pad, int oh, int ow, int tiles_per_split)
//   Launch contract: block = 128 threads (4 warps); static shared memory 30 KB (no opt-in);
//   grid = (ceil(oh*ow / 64), ceil(c_out / 128), batch * splits), where blockIdx.z = split *
//   batch + b, and split s reduces k-tiles [s * tiles_per_split, (s + 1) * tiles_per_split)
//   of the ceil(c_in*k*k / 32) tiles; every split must own at least one tile.
//   - partial == null (splits = 1, tiles_per_split >= the tile count): the epilogue adds
//     bias[m] (when bias is not null) to the f32 accumulator and rounds once to T into y.
//   - partial != null (split-K): each split writes its f32 partial sums, no bias, to
//     partial [splits, batch, c_out, oh*ow]; conv2d_igemm_reduce_* then finishes y. Every
//     element of every split's slice is written, so partial needs no clearing.
//   Block tile 128 (c_out) x 64 (pixels of one sample) x 32 (K); warps 2 x 2, each owning a
//   64 x 32 output tile: 4 x 4 mma.sync.aligned.m16n8k16 (f16/bf16 in, f32 accumulate) per
//   16-wide k-step, operands by ldmatrix (A) and ldmatrix.trans (B) from shared memory whose
//   row strides (80 and 144 bytes) make both conflict-free.
//   Why 128 x 64: the gathered B tile (2-byte loads, each with its own padding predicate) is
//   the expensive operand, and its cost is amortised over BM rows of c_out, so BM is the large
//   side (BM = 64 would double the gather per mma); BN = 64 keeps blocks numerous at the small
//   UNet levels (16x16 and 8x8 have 256 and 64 pixels a sample). 4 warps and 30 KB of shared
//   memory leave room for 3 blocks an SM.
//   Pipeline, two stages: while the tensor cores work on stage t, the weights of tile t+1 are
//   in flight by cp.async (16-byte chunks; when c_in*k*k % 8 != 0 or the weight is not
//   16-byte aligned, by 2-byte loads instead: conv_in's 36-wide rows) and the patches of tile
//   t+1 by ordinary loads into registers (8 x 32-bit, two adjacent pixels a row), stored to
//   shared memory after the mma; one __syncthreads a tile.
//   The gather: a thread owns two adjacent output pixels (their input origin, and for k*k <= 32
//   a bit mask of which of the k*k taps fall inside the image, computed once) and 8 of the 32
//   rows of a tile. Warp 0 writes, two tiles ahead, a 32-entry table per tile (per row
//   (ci, ky, kx): the offset ci*h*w + ky*w + kx and the tap's bit, stepped from the previous
//   tile with carries, no division) that every thread reads by broadcast. Per element: one AND
//   against the pixel's mask (or, for k > 5, two range compares), one wide multiply-add, one
//   predicated read-only 2-byte load. Rows past c_in*k*k and pixels past oh*ow gather zeros;
//   weight rows past c_out and columns past c_in*k*k load as zeros (cp.async src-size 0).
//   Epilogue: each thread holds rows (g, g+8) x columns (2t, 2t+1) of 16 m16n8 tiles; a pair
//   of adjacent pixels is stored as one 32-bit write when oh*ow is even (else two 16-bit).
//
// conv2d_igemm_reduce_{f16,bf16}(T* y, const float* partial, const T* bias, int splits,
//                                long long n, int c_out, long long p)
//   y[i] = round_T(sum over s < splits (in order) of partial[s * n + i] + bias[(i / p) %
//   c_out]) for i < n = batch * c_out * p (p = oh*ow); bias may be null. Elementwise contract
//   (block 256, grid = min(ceil(n / 256), 65536), grid-stride). Deterministic: no atomics.
//
// Napkin math, SD 1.5 at 64x64 latents, batch 2, fp16, H100 SXM (989 TFLOP/s dense fp16,
// 3.35 TB/s):
//   3x3 320 -> 320 at 64x64: 2 * 320 * 2880 * 8192 = 15.1 GFLOP; bytes x 5.2 MB + weight
//   1.8 MB + y 5.2 MB = 12.3 MB (3.7 us): compute-bound (1230 FLOP/B). At peak 15 us; mma.sync
//   (no wgmma) reaches ~2/3 of peak on Hopper, so ~23 us is the realistic floor. Grid 64 x 3 x
//   2 = 384 blocks; c_out = 320 in three 128-row tiles leaves 17 % of the mma on zero rows.
//   im2col + cuBLAS moves, on top, 2880 x 4096 x 2 B = 23.6 MB of columns per sample, written
//   and read back (94 MB for the batch: ~28 us if it left L2), in 2 launches a sample.
//   Issue budget (SASS of ptxas 12.8 for sm_90, the k*k <= 32 path): the main loop is ~200
//   instructions per warp and k-tile for its 32 HMMA: the gather's 16 LDG take ~70 (mask AND,
//   one IMAD.WIDE, zeroing, packing), the weights' 4 LDGSTS ~20, 12 LDSM, 8 LDS, 8 STS; warp 0
//   adds ~30 for the table. ~6 issue slots per HMMA against the SM's 4 a clock at ~1 HMMA a
//   clock: the gather may bound it (measure; TODO(perf) if so: cp.async of a zero-padded halo
//   tile for 3x3 stride 1, or an NHWC variant whose patches are 16-byte rows). 158 registers
//   (sm_90; 162 for sm_80), no spills: 3 blocks an SM.
//   The same 15 GFLOP at 640 x 32x32 (grid 16 x 5 x 2 = 160 blocks) and 1280 x 16x16 (4 x 10
//   x 2 = 80 blocks: under one a SM, so the host splits K 3 ways: +7.8 MB of f32 partials
//   written and read, ~5 us at DRAM speed, mostly L2); 1280 x 8x8 is 3.8 GFLOP on 20 blocks
//   (split further). conv_in (4 -> 320, K = 36: 2 tiles, scalar weight loads) and conv_out
//   (320 -> 4: 97 % of each 128-row tile idle) are bandwidth- and latency-bound: 0.2 GFLOP,
//   ~5 MB, a few microseconds.
// ---------------------------------------------------------------------------------------------

#include "common.cuh"

#define IG_BM 128          // output channels a block
#define IG_BN 64           // output pixels a block (one sample)
#define IG_BK 32           // reduction elements (c_in * k * k) a stage
#define IG_SA (IG_BK + 8)  // A row stride in shared memory (elements): 80 B
#define IG_SB (IG_BN + 8)  // B row stride (elements): 144 B
#define IG_THREADS 128
#define IG_FAR (1 << 28)   // an origin or tap offset that puts a coordinate outside any image

#define IG_GRID_STRIDE(i, n)                                                             \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);       \
         i += (long long)gridDim.x * blockDim.x)

// *p if `take` is non-zero, else 0: one predicated read-only global load (x is not written
// while the kernel runs). `p` is only dereferenced when taken.
__device__ __forceinline__ unsigned int ldg_u16_if(const unsigned short* p, unsigned int take) {
#ifdef HDB_EMULATE
    return take ? *p : 0u;
#else
    unsigned short v;
    asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %2, 0;\n\tmov.b16 %0, 0;\n\t"
                 "@q ld.global.nc.u16 %0, [%1];\n\t}"
                 : "=h"(v)
                 : "l"(p), "r"(take));
    return v;
#endif
}

// p itself, through a register move the compiler cannot see through (so it keeps one 64-bit
// pointer instead of re-deriving the address arithmetic per use).
__device__ __forceinline__ const unsigned short* opaque_ptr(const unsigned short* p) {
#ifdef HDB_EMULATE
    return p;
#else
    const unsigned short* r;
    asm("mov.b64 %0, %1;" : "=l"(r) : "l"(p));
    return r;
#endif
}

// MASK: k * k <= 32, a tap's validity is one bit of the pixel's mask; else range compares.
template <typename T, bool MASK>
__device__ __forceinline__ void conv2d_igemm(unsigned short* __restrict__ sa,
                                             unsigned short* __restrict__ sb, int4* rows,
                                             T* __restrict__ y, float* __restrict__ partial,
                                             const T* __restrict__ x, const T* __restrict__ wt,
                                             const T* __restrict__ bias, int batch, int c_in,
                                             int h, int w, int c_out, int k, int stride,
                                             int pad, int oh, int ow, int tiles_per_split) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int wm = warp & 1, wn = warp >> 1; // warp tile: rows wm*64.., columns wn*32..
    const int P = oh * ow;
    const int kk = k * k;
    const int K = c_in * kk;
    const int hw = h * w;
    const int n0 = blockIdx.x * IG_BN, m0 = blockIdx.y * IG_BM;
    const int b = blockIdx.z % batch, split = blockIdx.z / batch;
    const int tiles = (K + IG_BK - 1) / IG_BK;
    const int kt0 = split * tiles_per_split;
    const int nk = min(tiles - kt0, tiles_per_split);
    const T* xb = x + (long long)b * c_in * hw;
    const bool vec_a = (K % 8 == 0) && aligned16(wt);

    // This thread's two output pixels n0 + 2*lane + c: input origin and in-image taps.
    int cbase[2], cy[2], cx[2];
    unsigned int cmask[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const int n = n0 + 2 * lane + c;
        cbase[c] = 0;
        cy[c] = -IG_FAR;
        cx[c] = 0;
        cmask[c] = 0u;
        if (n < P) {
            const int oy = n / ow, ox = n - oy * ow;
            const int iy0 = oy * stride - pad, ix0 = ox * stride - pad;
            cbase[c] = iy0 * w + ix0;
            cy[c] = iy0;
            cx[c] = ix0;
            if (MASK) {
                unsigned int m = 0u;
                for (int ky = 0; ky < k; ++ky) {
                    if ((unsigned)(iy0 + ky) >= (unsigned)h) continue;
                    for (int kx = 0; kx < k; ++kx)
                        if ((unsigned)(ix0 + kx) < (unsigned)w) m |= 1u << (ky * k + kx);
                }
                cmask[c] = m;
            }
        }
    }

    // Warp 0, lane r: row r of the next table to write, as (ci, ky, kx), stepped by 32 a tile.
    int rci = 0, rky = 0, rkx = 0;
    const int dci = IG_BK / kk, drem = IG_BK - dci * kk;
    const int dky = drem / k, dkx = drem - dky * k;
    if (warp == 0) {
        const int kidx = kt0 * IG_BK + lane;
        rci = kidx / kk;
        const int r = kidx - rci * kk;
        rky = r / k;
        rkx = r - rky * k;
    }
    auto write_rows = [&](int buf) {
        int4 e;
        if (rci < c_in) {
            e.x = rci * hw + rky * w + rkx;
            e.y = MASK ? (int)(1u << (rky * k + rkx)) : 0;
            e.z = rky;
            e.w = rkx;
        } else {
            e.x = 0;
            e.y = 0;
            e.z = -IG_FAR;
            e.w = 0;
        }
        rows[buf * IG_BK + lane] = e;
        rkx += dkx;
        if (rkx >= k) {
            rkx -= k;
            ++rky;
        }
        rky += dky;
        if (rky >= k) {
            rky -= k;
            ++rci;
        }
        rci += dci;
    };

    // Weights of global k-tile kt into stage `stage`. 16-byte path: this thread copies chunk
    // column ac (elements ac*8 .. +7 of the tile's 32) of rows ar0 + 32 j; its row pointers are
    // fixed, the tile adds kbase.
    constexpr int ACH = IG_BM * IG_BK / 8 / IG_THREADS; // 16-byte chunks a thread (4)
    const int ac = tid & 3, ar0 = tid >> 2;
    const unsigned short* arow[ACH];
    unsigned int arow_ok = 0u;
#pragma unroll
    for (int j = 0; j < ACH; ++j) {
        const int m = m0 + ar0 + 32 * j;
        const unsigned short* p =
            (const unsigned short*)wt + (long long)min(m, c_out - 1) * K + ac * 8;
        arow[j] = opaque_ptr(p);
        if (m < c_out) arow_ok |= 1u << j;
    }
    const unsigned int sa_base = smem_addr(sa);
    auto load_a = [&](int stage, int kt) {
        const int kbase = kt * IG_BK;
        unsigned short* s = sa + stage * IG_BM * IG_SA;
        if (vec_a) {
            const unsigned int s0 = sa_base + (stage * IG_BM * IG_SA + ar0 * IG_SA + ac * 8) * 2;
            // Past K the copies zero-fill from the row's start: every source address stays
            // inside the weight (rows past c_out were clamped to the last one).
            const bool col_ok = kbase + ac * 8 < K;
            const unsigned int koff = col_ok ? (unsigned int)kbase : 0u;
#pragma unroll
            for (int j = 0; j < ACH; ++j)
                cp_async16(s0 + j * 32 * IG_SA * 2, arow[j] + koff,
                           (col_ok && ((arow_ok >> j) & 1u)) ? 16 : 0);
        } else {
            for (int j = 0; j < IG_BM * IG_BK / IG_THREADS; ++j) {
                const int i = tid + IG_THREADS * j;
                const int r = i >> 5, c = i & 31;
                const int m = m0 + r, kc = kbase + c;
                s[r * IG_SA + c] = (m < c_out && kc < K) ? wt[(long long)m * K + kc].bits : 0;
            }
        }
    };

    // Patches of the tile whose table is rows[buf]: rows warp + 4j, pixels 2*lane, 2*lane+1.
    // pcol[c] + the row's (non-negative) offset is the tap's address: one wide multiply-add
    // per element (opaque_ptr hides the sum from the compiler, which otherwise re-derives it in
    // 64-bit pieces per element). pcol may point before x for a pixel at the border; only
    // in-image taps are dereferenced.
    const unsigned short* pcol[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const unsigned short* p = (const unsigned short*)xb + cbase[c];
        pcol[c] = opaque_ptr(p);
    }
    unsigned int breg[IG_BK / 4];
    auto gather_b = [&](int buf) {
#pragma unroll
        for (int j = 0; j < IG_BK / 4; ++j) {
            const int4 e = rows[buf * IG_BK + warp + 4 * j];
            unsigned int v[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                unsigned int take;
                if (MASK) {
                    take = cmask[c] & (unsigned)e.y;
                } else {
                    take = (unsigned)(cy[c] + e.z) < (unsigned)h &&
                           (unsigned)(cx[c] + e.w) < (unsigned)w;
                }
                v[c] = ldg_u16_if(pcol[c] + (unsigned int)e.x, take);
            }
            breg[j] = pack2(v[0], v[1]);
        }
    };
    auto store_b = [&](int stage) {
        unsigned short* s = sb + stage * IG_BK * IG_SB;
#pragma unroll
        for (int j = 0; j < IG_BK / 4; ++j)
            *(unsigned int*)(s + (warp + 4 * j) * IG_SB + 2 * lane) = breg[j];
    };

    float acc[4][4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
            acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;

    auto compute = [&](int stage) {
        const unsigned int a_s = smem_addr(sa + stage * IG_BM * IG_SA);
        const unsigned int b_s = smem_addr(sb + stage * IG_BK * IG_SB);
#pragma unroll
        for (int ks = 0; ks < IG_BK / 16; ++ks) {
            unsigned int af[4][4], bf[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                ldsm_x4(af[mt],
                        a_s + ((wm * 64 + mt * 16 + (lane & 15)) * IG_SA + ks * 16 +
                               (lane >> 4) * 8) * 2);
            const int krow = ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                unsigned int r[4];
                ldsm_x4_t(r, b_s + (krow * IG_SB + wn * 32 + (2 * np + (lane >> 4)) * 8) * 2);
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
                    mma_16816<T>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
        }
    };

    // Prologue: table 0, tile 0 in stage 0, table 1.
    if (warp == 0) write_rows(0);
    __syncthreads();
    load_a(0, kt0);
    cp_async_commit();
    gather_b(0);
    if (warp == 0 && nk > 1) write_rows(1);
    store_b(0);
    cp_async_wait<0>();
    __syncthreads();

    for (int t = 0; t < nk; ++t) {
        const int cur = t & 1, nxt = cur ^ 1;
        const bool more = t + 1 < nk;
        if (more) {
            load_a(nxt, kt0 + t + 1);
            cp_async_commit();
            gather_b(nxt); // table t+1
            if (warp == 0 && t + 2 < nk) write_rows(cur); // table t+2 over table t
        }
        compute(cur);
        if (more) {
            store_b(nxt);
            cp_async_wait<0>();
        }
        __syncthreads();
    }

    // Epilogue.
    if (partial != nullptr) {
        float* pb = partial + ((long long)split * batch + b) * c_out * P;
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int m = m0 + wm * 64 + mt * 16 + g + 8 * hh;
                if (m >= c_out) continue;
                float* pr = pb + (long long)m * P;
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    const int n = n0 + wn * 32 + nt * 8 + 2 * t4;
                    if (n < P) pr[n] = acc[mt][nt][2 * hh];
                    if (n + 1 < P) pr[n + 1] = acc[mt][nt][2 * hh + 1];
                }
            }
        return;
    }
    T* yb = y + (long long)b * c_out * P;
    const bool pair = (P % 2 == 0) && (((unsigned long long)y & 3ull) == 0);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int m = m0 + wm * 64 + mt * 16 + g + 8 * hh;
            if (m >= c_out) continue;
            const float bv = bias != nullptr ? to_f32(bias[m]) : 0.0f;
            T* yr = yb + (long long)m * P;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int n = n0 + wn * 32 + nt * 8 + 2 * t4; // even
                const float v0 = acc[mt][nt][2 * hh] + bv, v1 = acc[mt][nt][2 * hh + 1] + bv;
                if (pair) {
                    if (n < P) *(unsigned int*)(yr + n) = pack2_f32<T>(v0, v1);
                } else {
                    if (n < P) yr[n] = from_f32<T>(v0);
                    if (n + 1 < P) yr[n + 1] = from_f32<T>(v1);
                }
            }
        }
}

template <typename T>
__device__ __forceinline__ void conv2d_igemm_reduce(T* __restrict__ y,
                                                    const float* __restrict__ partial,
                                                    const T* __restrict__ bias, int splits,
                                                    long long n, int c_out, long long p) {
    IG_GRID_STRIDE(i, n) {
        float s = 0.0f;
        for (int j = 0; j < splits; ++j) s += partial[(long long)j * n + i];
        if (bias != nullptr) s += to_f32(bias[(int)((i / p) % c_out)]);
        y[i] = from_f32<T>(s);
    }
}

#define HDB_CONV_IGEMM(sfx, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(IG_THREADS)                                   \
        conv2d_igemm_##sfx(T* y, float* partial, const T* x, const T* weight, const T* bias,   \
                           int batch, int c_in, int h, int w, int c_out, int k, int stride,    \
                           int pad, int oh, int ow, int tiles_per_split) {                     \
        __shared__ __align__(16) unsigned short sa[2 * IG_BM * IG_SA];                         \
        __shared__ __align__(16) unsigned short sb[2 * IG_BK * IG_SB];                         \
        __shared__ int4 rows[2 * IG_BK];                                                       \
        if (k * k <= 32)                                                                       \
            conv2d_igemm<T, true>(sa, sb, rows, y, partial, x, weight, bias, batch, c_in, h,   \
                                  w, c_out, k, stride, pad, oh, ow, tiles_per_split);          \
        else                                                                                   \
            conv2d_igemm<T, false>(sa, sb, rows, y, partial, x, weight, bias, batch, c_in, h,  \
                                   w, c_out, k, stride, pad, oh, ow, tiles_per_split);         \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        conv2d_igemm_reduce_##sfx(T* y, const float* partial, const T* bias, int splits,       \
                                  long long n, int c_out, long long p) {                       \
        conv2d_igemm_reduce<T>(y, partial, bias, splits, n, c_out, p);                         \
    }
HDB_FOR_EACH_HALF_DTYPE(HDB_CONV_IGEMM)
