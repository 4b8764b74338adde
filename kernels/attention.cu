// attention.cu: fused multi-head attention, out = softmax(scale * q k^T) v, flash style: an
// online softmax over key tiles, never materialising the lq x lk score matrix.
//
// Checked on an NVIDIA H100 (2026-11-26) against the CPU backend by tests/cuda_parity/
// (scripts/gpu-check.sh; figures in docs/perf.md): backend::cpu::attention, for
// attention_scalar_* and flash_attn_*. flash2_attn_* (below) is the faster rewrite of flash_attn_*.
//
// Layout (both kernels, as the CPU backend): q, out [batch, lq, heads * d]; k, v
// [batch, lk, heads * d]; head h owns columns h*d .. (h+1)*d of a row. Row strides ld_q, ld_k,
// ld_v, ld_o are in elements (>= heads * d), so q, k and v may be slices of one fused qkv
// buffer; a batch's rows follow one another (batch stride = rows * ld). out may not overlap
// q, k or v. scale is the host's 1 / sqrt(d).
//
// ---------------------------------------------------------------------------------------------
// flash_attn_d{40,64,80,160}_{f16,bf16}(T* out, const T* q, const T* k, const T* v, int lq,
//                                       int lk, long long ld_q, long long ld_k, long long ld_v,
//                                       long long ld_o, float scale)
//   Tensor cores: mma.sync.m16n8k16 (f16 or bf16 in, f32 accumulate), inline PTX.
//   Templated on the head dim d, no padding to 64/96 in memory: d = 40 is zero-padded to 48
//   only inside shared memory for the k-dimension of q k^T (the mma's k is 16); p v uses
//   n-tiles of 8, so d = 40 needs 5 of them, exactly. Other head dims need one more
//   instantiation (d % 8 == 0, smem within 48 KB).
//   grid  = (ceil(lq / 64), heads, batch); block = 128 threads (4 warps, 16 query rows each).
//   Static shared memory (16-bit elements, row stride DP + 8 to spread banks): q tile
//   64 x (DP+8), k and v tiles BN x (DP+8); DP = d rounded up to 16; BN = 64 keys for
//   d <= 80, 32 for d = 160. d40: 21.5 KB, d64: 27.6 KB, d80: 33.8 KB, d160: 43 KB (< 48 KB:
//   no opt-in needed).
//   Per key tile: S = q k^T (f32 fragments), masked past lk, scaled by scale * log2(e);
//   running row max and sum with exp2; O rescaled; P rounded to the input dtype and fed as
//   the A operand of O += P v straight from the S accumulator fragments (FlashAttention-2's
//   register reuse). Softmax statistics and O are f32; O / l is rounded once.
//   Precision: P in f16 (11-bit mantissa) or bf16 (8-bit) limits the result to ~1e-3 / ~8e-3
//   relative, as in FlashAttention-2.
//   Napkin math, SD 1.5 self-attention at 64x64 latents, batch 2, 8 heads, d = 40,
//   lq = lk = 4096: 4 * B*H*lq*lk*d = 43 GFLOP -> ~43 us at 990 TFLOP/s dense fp16 (H100
//   SXM); realistic target ~40 % of peak = ~110 us; bytes (q, k, v, out) 21 MB = 6 us.
//   Compute-bound. Cross-attention (lk = 77, two tiles of 64 with the second masked) is
//   bytes-bound: q + out at 4096 x 320 x 2 B x 2 batches = 10.5 MB -> ~3 us.
//   This is the fallback for rows that are not 16-byte aligned: flash2_attn_* (below) takes
//   its operands by ldmatrix(.trans), double-buffers k/v tiles with cp.async in 16-byte copies,
//   and flash3_attn_d40_* gives each warp two m-tiles. What is left is an sm_90a wgmma kernel
//   (docs/perf.md: the 4096-token d40 shape, 0.87x cuDNN's wgmma SDPA).
//
// attention_scalar_{f32,f16,bf16}(T* out, const T* q, const T* k, const T* v, int lq, int lk,
//                                 int d, long long ld_q, long long ld_k, long long ld_v,
//                                 long long ld_o, float scale)
//   The plain-FMA version for any d <= 256 (the f32 path, odd head dims, and the reference
//   the tensor-core kernel is checked against on the GPU). One warp per query row: the warp
//   takes keys 32 at a time, lane j scoring key j (f32 dot product), then an online softmax
//   update, then each lane accumulates output columns lane, lane + 32, ... over those keys.
//   grid  = (ceil(lq / 4), heads, batch); block = 128 threads (4 warps = 4 query rows);
//   static shared memory 4 x 256 x 4 = 4 KB (the query rows in f32).
//   Napkin math: the same 43 GFLOP on the f32 FMA units (67 TFLOP/s on an H100 SXM) is
//   >= 0.7 ms, and k/v rows are re-read per query row from L2: a correctness fallback, not
//   the fast path.
//
// attention_scalar_causal_{f32,f16,bf16}: attention_scalar_* with the same arguments and
//   launch, and a causal mask: query row i sees keys 0..=i only (the key loop stops at
//   min(lk, i + 1)). For CLIP's text encoder, where lq == lk (the host checks it).
//   Napkin math, CLIP ViT-L/14 text encoder (77 tokens, 12 heads, d = 64), batch 2: 3003
//   (query, key) pairs a head (77 * 78 / 2), 4d FLOP each: 2 * 12 * 3003 * 256 = 18 MFLOP,
//   and q, k, v, out at 2 * 77 * 768 * 2 B = 0.24 MB each in f16: a few microseconds,
//   latency-bound (2 * 12 * 20 = 480 blocks of 4 warps). Checked on an H100 (2026-11-26,
//   session 6) by tests/cuda_backend.rs against the CPU backend's causal attention; without a
//   GPU, tests/kernel_emulation/ runs it on the host under tests/emu's CUDA emulation.
//
// flash2_attn_d{40,64,80,160}_{f16,bf16}: the same contract and arguments as flash_attn_*,
// plus: q, k, v 16-byte aligned at every row (ld_* % 8 == 0, base addresses % 16 == 0: the
// host checks and falls back to flash_attn_* otherwise). Dynamic shared memory:
// (64 + 4 * BN) * (DP + 8) * 2 bytes (d40: 35.8 KB, d64: 46 KB, d80: 56.3 KB, d160: 64.5 KB;
// the host raises the function's dynamic shared memory limit above 48 KB).
//   grid = (ceil(lq / 64), heads, batch); block = 128 threads (4 warps x 16 query rows).
//   What changes against flash_attn_*: k/v tiles arrive by cp.async (16 bytes a copy) into two
//   stages, so the next tile loads while this one computes; every mma operand comes from
//   shared memory by ldmatrix (v through ldmatrix.trans) instead of 16-bit loads; tiles past
//   lk are zero-filled by the copy and masked only in the last tile; the softmax keeps its
//   running max on raw scores so each probability is one FFMA and one ex2.approx.ftz, and P
//   and the output are packed two at a time (cvt.rn.{f16,bf16}x2.f32). BN = 64 keys (32 for
//   d = 160, for registers and shared memory).
//
// flash3_attn_d40_{f16,bf16}: flash2_attn_* with MT = 2 m-tiles (32 query rows) per warp, so
//   each k/v fragment taken by ldmatrix feeds two mma chains and a warp interleaves two softmax
//   chains (an H100 run found flash2 issuing under a third of its instruction slots:
//   latency-bound); q k^T is not padded (two k16 steps and one m16n8k8 step for d = 40), and
//   the shared-memory row stride is chosen per d so ldmatrix has no bank conflicts (40 itself).
//   grid = (ceil(lq / 128), heads, batch); block = 128 threads; dynamic shared memory
//   (128 + 4 * 64) * 40 * 2 = 30.7 KB; 173 registers (2 blocks an SM).
//   Measured on an H100 (docs/perf.md): 0.204 ms against flash2's 0.245 at 4096 tokens. Tried
//   and dropped, each slower there: 8 warps a block (flash2, 0.29 ms), one m-tile per warp
//   with the unpadded k (0.240 ms), MT = 2 held to 168 registers for 3 blocks an SM
//   (0.221 ms), and MT = 2 at d = 80 (0.0375 against flash2's 0.0355 ms at 1024 tokens).
// ---------------------------------------------------------------------------------------------

#include "common.cuh"

// Two consecutive 16-bit elements of shared memory as one mma operand register.
__device__ __forceinline__ unsigned int smem_pair(const unsigned short* s, int i) {
    return pack2(s[i], s[i + 1]);
}

template <typename T, int D, int BN>
__device__ __forceinline__ void flash_attn(T* __restrict__ out, const T* __restrict__ q,
                                           const T* __restrict__ k, const T* __restrict__ v,
                                           int lq, int lk, long long ld_q, long long ld_k,
                                           long long ld_v, long long ld_o, float scale) {
    constexpr int BM = 64;                  // query rows per block (4 warps x 16)
    constexpr int DP = (D + 15) / 16 * 16;  // k-dim of q k^T, zero-padded in smem only
    constexpr int SK = DP + 8;              // smem row stride in elements (bank spread)
    constexpr int KS = DP / 16;             // mma k-steps of q k^T
    constexpr int NT = BN / 8;              // n-tiles of S (keys)
    constexpr int DT = D / 8;               // n-tiles of O (head columns)
    static_assert(D % 8 == 0, "head dim must be a multiple of 8");
    static_assert(BN % 16 == 0, "key tile must be a multiple of 16");
    static_assert((BM + 2 * BN) * SK * 2 <= 48 * 1024, "static shared memory over 48 KB");

    __shared__ __align__(16) unsigned short sq[BM * SK];
    __shared__ __align__(16) unsigned short sk[BN * SK];
    __shared__ __align__(16) unsigned short sv[BN * SK];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y;
    const int q0 = blockIdx.x * BM;
    const T* qb = q + (long long)b * lq * ld_q + (long long)h * D;
    const T* kb = k + (long long)b * lk * ld_k + (long long)h * D;
    const T* vb = v + (long long)b * lk * ld_v + (long long)h * D;
    T* ob = out + (long long)b * lq * ld_o + (long long)h * D;

    // q tile -> smem (rows past lq and columns past D are zero) -> A fragments in registers.
    for (int i = tid; i < BM * DP; i += blockDim.x) {
        const int r = i / DP, c = i - r * DP;
        unsigned short val = 0;
        if (q0 + r < lq && c < D) val = qb[(long long)(q0 + r) * ld_q + c].bits;
        sq[r * SK + c] = val;
    }
    __syncthreads();
    const int wr = warp * 16; // this warp's first row in the tile
    unsigned int qa[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        qa[ks][0] = smem_pair(sq, (wr + g) * SK + ks * 16 + 2 * t4);
        qa[ks][1] = smem_pair(sq, (wr + g + 8) * SK + ks * 16 + 2 * t4);
        qa[ks][2] = smem_pair(sq, (wr + g) * SK + ks * 16 + 2 * t4 + 8);
        qa[ks][3] = smem_pair(sq, (wr + g + 8) * SK + ks * 16 + 2 * t4 + 8);
    }

    // This thread's share of O: rows wr+g (acc[.][0..1]) and wr+g+8 (acc[.][2..3]).
    float acc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.0f;
    float m0 = HDB_NEG_INF, m1 = HDB_NEG_INF; // running max (log2 domain), rows g and g+8
    float l0 = 0.0f, l1 = 0.0f;               // this thread's part of the running sums
    const float sl2 = scale * 1.4426950408889634f;

    for (int kt = 0; kt < lk; kt += BN) {
        __syncthreads(); // everyone is done with the previous k/v tile
        for (int i = tid; i < BN * DP; i += blockDim.x) {
            const int r = i / DP, c = i - r * DP;
            unsigned short kv = 0, vv = 0;
            if (kt + r < lk && c < D) {
                kv = kb[(long long)(kt + r) * ld_k + c].bits;
                vv = vb[(long long)(kt + r) * ld_v + c].bits;
            }
            sk[r * SK + c] = kv;
            sv[r * SK + c] = vv;
        }
        __syncthreads();

        // S = q k^T for this warp's 16 rows and the tile's BN keys.
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const int kr = (nt * 8 + g) * SK + 2 * t4; // key nt*8+g, dims 2t, 2t+1
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
                mma_16816<T>(s[nt], qa[ks], smem_pair(sk, kr + ks * 16),
                             smem_pair(sk, kr + ks * 16 + 8));
        }

        // Scale into the log2 domain, mask keys past lk, row max over the quad.
        float mx0 = HDB_NEG_INF, mx1 = HDB_NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kt + nt * 8 + 2 * t4 + (e & 1);
                const float val = key < lk ? s[nt][e] * sl2 : HDB_NEG_INF;
                s[nt][e] = val;
                if (e < 2) mx0 = fmaxf(mx0, val);
                else mx1 = fmaxf(mx1, val);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with no finite score yet keeps 0 as its reference, so exp2 never sees inf-inf.
        const float r0 = mn0 == HDB_NEG_INF ? 0.0f : mn0;
        const float r1 = mn1 == HDB_NEG_INF ? 0.0f : mn1;
        const float c0 = exp2f(m0 - r0), c1 = exp2f(m1 - r1); // 0 on the first tile
        m0 = mn0;
        m1 = mn1;

        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - r0);
            s[nt][1] = exp2f(s[nt][1] - r0);
            s[nt][2] = exp2f(s[nt][2] - r1);
            s[nt][3] = exp2f(s[nt][3] - r1);
            ps0 += s[nt][0] + s[nt][1];
            ps1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * c0 + ps0;
        l1 = l1 * c1 + ps1;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            acc[dt][0] *= c0;
            acc[dt][1] *= c0;
            acc[dt][2] *= c1;
            acc[dt][3] *= c1;
        }

        // O += P v. The S fragments of n-tiles 2kk and 2kk+1 (keys kk*16 .. kk*16+15) are
        // exactly the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned int pa[4];
            pa[0] = pack2(half_bits<T>(s[2 * kk][0]), half_bits<T>(s[2 * kk][1]));
            pa[1] = pack2(half_bits<T>(s[2 * kk][2]), half_bits<T>(s[2 * kk][3]));
            pa[2] = pack2(half_bits<T>(s[2 * kk + 1][0]), half_bits<T>(s[2 * kk + 1][1]));
            pa[3] = pack2(half_bits<T>(s[2 * kk + 1][2]), half_bits<T>(s[2 * kk + 1][3]));
            const int kr = kk * 16 + 2 * t4; // keys kr, kr+1 (b0) and kr+8, kr+9 (b1)
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const int n = dt * 8 + g; // head column
                const unsigned int b0 = pack2(sv[kr * SK + n], sv[(kr + 1) * SK + n]);
                const unsigned int b1 = pack2(sv[(kr + 8) * SK + n], sv[(kr + 9) * SK + n]);
                mma_16816<T>(acc[dt], pa, b0, b1);
            }
        }
    }

    // Finish: the quad's partial sums make the row sum; out = O / l.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
    const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int row0 = q0 + wr + g, row1 = row0 + 8;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t4;
        if (row0 < lq) {
            ob[(long long)row0 * ld_o + col] = from_f32<T>(acc[dt][0] * inv0);
            ob[(long long)row0 * ld_o + col + 1] = from_f32<T>(acc[dt][1] * inv0);
        }
        if (row1 < lq) {
            ob[(long long)row1 * ld_o + col] = from_f32<T>(acc[dt][2] * inv1);
            ob[(long long)row1 * ld_o + col + 1] = from_f32<T>(acc[dt][3] * inv1);
        }
    }
}

#define HDB_FLASH_ATTN(sfx, T, D, BN)                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        flash_attn_d##D##_##sfx(T* __restrict__ out, const T* __restrict__ q,                  \
                                const T* __restrict__ k, const T* __restrict__ v, int lq,      \
                                int lk, long long ld_q, long long ld_k, long long ld_v,        \
                                long long ld_o, float scale) {                                 \
        flash_attn<T, D, BN>(out, q, k, v, lq, lk, ld_q, ld_k, ld_v, ld_o, scale);             \
    }
#define HDB_FLASH_ATTN_ALL_D(sfx, T) \
    HDB_FLASH_ATTN(sfx, T, 40, 64)   \
    HDB_FLASH_ATTN(sfx, T, 64, 64)   \
    HDB_FLASH_ATTN(sfx, T, 80, 64)   \
    HDB_FLASH_ATTN(sfx, T, 160, 32)
HDB_FOR_EACH_HALF_DTYPE(HDB_FLASH_ATTN_ALL_D)

#define SCALAR_ROWS 4    // query rows (warps) per block
#define SCALAR_MAX_D 256 // head dims up to this
#define SCALAR_SLOTS (SCALAR_MAX_D / 32)

// CAUSAL: query row `row` sees keys 0..=row only (keys past min(lk, row + 1) are skipped).
template <typename T, bool CAUSAL>
__device__ __forceinline__ void attention_scalar(T* __restrict__ out, const T* __restrict__ q,
                                                 const T* __restrict__ k, const T* __restrict__ v,
                                                 int lq, int lk, int d, long long ld_q,
                                                 long long ld_k, long long ld_v, long long ld_o,
                                                 float scale) {
    __shared__ float sq[SCALAR_ROWS][SCALAR_MAX_D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.z, h = blockIdx.y;
    const int row = blockIdx.x * SCALAR_ROWS + warp;
    if (row >= lq || d > SCALAR_MAX_D) return; // no block-wide barrier below
    const T* qr = q + ((long long)b * lq + row) * ld_q + (long long)h * d;
    const T* kb = k + (long long)b * lk * ld_k + (long long)h * d;
    const T* vb = v + (long long)b * lk * ld_v + (long long)h * d;
    T* orow = out + ((long long)b * lq + row) * ld_o + (long long)h * d;

    for (int c = lane; c < d; c += 32) sq[warp][c] = to_f32(qr[c]);
    __syncwarp();

    float o[SCALAR_SLOTS]; // output columns lane + 32 * j
#pragma unroll
    for (int j = 0; j < SCALAR_SLOTS; ++j) o[j] = 0.0f;
    float m = HDB_NEG_INF, l = 0.0f;
    const int kend = CAUSAL ? min(lk, row + 1) : lk; // keys this row sees
    for (int k0 = 0; k0 < kend; k0 += 32) {
        const int key = k0 + lane;
        float sc = HDB_NEG_INF;
        if (key < kend) {
            const T* kr = kb + (long long)key * ld_k;
            float dot = 0.0f;
            for (int c = 0; c < d; ++c) dot += sq[warp][c] * to_f32(kr[c]);
            sc = dot * scale;
        }
        const float mn = fmaxf(m, warp_max(sc)); // finite: key k0 < kend always exists
        const float corr = expf(m - mn);         // 0 on the first chunk
        const float p = key < kend ? expf(sc - mn) : 0.0f;
        l = l * corr + warp_sum(p);
        m = mn;
#pragma unroll
        for (int j = 0; j < SCALAR_SLOTS; ++j) o[j] *= corr;
        const int nk = min(32, kend - k0);
        for (int kk = 0; kk < nk; ++kk) {
            const float pk = __shfl_sync(0xffffffffu, p, kk);
            const T* vr = vb + (long long)(k0 + kk) * ld_v;
#pragma unroll
            for (int j = 0; j < SCALAR_SLOTS; ++j) {
                const int c = lane + 32 * j;
                if (c < d) o[j] += pk * to_f32(vr[c]);
            }
        }
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int j = 0; j < SCALAR_SLOTS; ++j) {
        const int c = lane + 32 * j;
        if (c < d) orow[c] = from_f32<T>(o[j] * inv);
    }
}

#define HDB_ATTN_SCALAR(sfx, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        attention_scalar_##sfx(T* __restrict__ out, const T* __restrict__ q,                   \
                               const T* __restrict__ k, const T* __restrict__ v, int lq,       \
                               int lk, int d, long long ld_q, long long ld_k, long long ld_v,  \
                               long long ld_o, float scale) {                                  \
        attention_scalar<T, false>(out, q, k, v, lq, lk, d, ld_q, ld_k, ld_v, ld_o, scale);    \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        attention_scalar_causal_##sfx(T* __restrict__ out, const T* __restrict__ q,            \
                                      const T* __restrict__ k, const T* __restrict__ v,        \
                                      int lq, int lk, int d, long long ld_q, long long ld_k,   \
                                      long long ld_v, long long ld_o, float scale) {           \
        attention_scalar<T, true>(out, q, k, v, lq, lk, d, ld_q, ld_k, ld_v, ld_o, scale);     \
    }
HDB_FOR_EACH_DTYPE(HDB_ATTN_SCALAR)

template <typename T, int D, int BN, int WARPS>
__device__ __forceinline__ void flash2_attn(T* __restrict__ out, const T* __restrict__ q,
                                            const T* __restrict__ k, const T* __restrict__ v,
                                            int lq, int lk, long long ld_q, long long ld_k,
                                            long long ld_v, long long ld_o, float scale) {
    constexpr int BM = 16 * WARPS; // query rows per block, 16 per warp
    constexpr int DP = (D + 15) / 16 * 16;
    constexpr int SK = DP + 8; // row stride (elements): 16-byte rows, conflict-free ldmatrix
    constexpr int KS = DP / 16;
    constexpr int NT = BN / 8;
    constexpr int DT = D / 8;
    constexpr int CH = D / 8; // 16-byte chunks per row
    static_assert(D % 8 == 0 && BN % 16 == 0 && NT % 2 == 0, "tile shape");
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* sq = smem;                 // [BM][SK]
    unsigned short* skv = smem + BM * SK;      // [stage 2][k, v][BN][SK]
    const unsigned int sq_a = smem_addr(sq);
    const unsigned int skv_a = smem_addr(skv);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y;
    const int q0 = blockIdx.x * BM;
    const T* qb = q + (long long)b * lq * ld_q + (long long)h * D;
    const T* kb = k + (long long)b * lk * ld_k + (long long)h * D;
    const T* vb = v + (long long)b * lk * ld_v + (long long)h * D;
    T* ob = out + (long long)b * lq * ld_o + (long long)h * D;

    // Zero the padding columns D..DP of q and of both k stages (read by q k^T; v's are not).
    if (DP > D) {
        for (int i = tid; i < (BM + 2 * BN) * (DP - D); i += blockDim.x) {
            const int r = i / (DP - D), c = D + i % (DP - D);
            if (r < BM) sq[r * SK + c] = 0;
            else {
                const int rr = r - BM; // stage rr / BN, k rows
                skv[(rr / BN) * 2 * BN * SK + (rr % BN) * SK + c] = 0;
            }
        }
    }
    // q tile and the first k/v tile.
    for (int i = tid; i < BM * CH; i += blockDim.x) {
        const int r = i / CH, c = i - r * CH;
        const bool in = q0 + r < lq;
        cp_async16(sq_a + (r * SK + c * 8) * 2, qb + (long long)(in ? q0 + r : 0) * ld_q + c * 8,
                   in ? 16 : 0);
    }
    auto load_kv = [&](int stage, int kt) {
        const unsigned int ks_a = skv_a + stage * 2 * BN * SK * 2;
        const unsigned int vs_a = ks_a + BN * SK * 2;
        for (int i = tid; i < BN * CH; i += blockDim.x) {
            const int r = i / CH, c = i - r * CH;
            const bool in = kt + r < lk;
            const long long row = in ? kt + r : 0;
            cp_async16(ks_a + (r * SK + c * 8) * 2, kb + row * ld_k + c * 8, in ? 16 : 0);
            cp_async16(vs_a + (r * SK + c * 8) * 2, vb + row * ld_v + c * 8, in ? 16 : 0);
        }
    };
    load_kv(0, 0);
    cp_async_commit();

    const int wr = warp * 16;
    unsigned int qa[KS][4];
    float acc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.0f;
    float m0 = HDB_NEG_INF, m1 = HDB_NEG_INF, l0 = 0.0f, l1 = 0.0f;
    const float sl2 = scale * 1.4426950408889634f;
    const int ntiles = (lk + BN - 1) / BN;

    for (int it = 0; it < ntiles; ++it) {
        const int kt = it * BN;
        if (it + 1 < ntiles) {
            load_kv((it + 1) & 1, kt + BN);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
            // ldmatrix.x4: lane L addresses row (L & 7) + 8 * ((L >> 3) & 1), column 8 * (L >> 4)
            // of the 16 x 16 block: registers a[0..3] as mma's A fragment.
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
                ldsm_x4(qa[ks], sq_a + ((wr + (lane & 7) + ((lane >> 3) & 1) * 8) * SK +
                                        ks * 16 + (lane >> 4) * 8) * 2);
        }
        const unsigned int ks_a = skv_a + (it & 1) * 2 * BN * SK * 2;
        const unsigned int vs_a = ks_a + BN * SK * 2;

        // S = q k^T: per k-step, one ldmatrix.x4 gives b0, b1 of two 8-key n-tiles.
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned int kf[4];
                const int key = (2 * np + (lane >> 4)) * 8 + (lane & 7);
                const int col = ks * 16 + ((lane >> 3) & 1) * 8;
                ldsm_x4(kf, ks_a + (key * SK + col) * 2);
                mma_16816<T>(s[2 * np], qa[ks], kf[0], kf[1]);
                mma_16816<T>(s[2 * np + 1], qa[ks], kf[2], kf[3]);
            }
        }

        // Running max on the raw scores (scale > 0 keeps the order); then
        // p = 2^(s * scale * log2 e - m * scale * log2 e) as one FFMA and one ex2.
        float mx0 = HDB_NEG_INF, mx1 = HDB_NEG_INF;
        if (kt + BN > lk) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (kt + nt * 8 + 2 * t4 + (e & 1) >= lk) s[nt][e] = HDB_NEG_INF;
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with no finite score yet keeps 0 as its reference, so ex2 never sees inf-inf.
        const float r0 = mn0 == HDB_NEG_INF ? 0.0f : mn0 * sl2;
        const float r1 = mn1 == HDB_NEG_INF ? 0.0f : mn1 * sl2;
        const float c0 = fast_exp2(fmaf(m0, sl2, -r0)), c1 = fast_exp2(fmaf(m1, sl2, -r1));
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = fast_exp2(fmaf(s[nt][0], sl2, -r0));
            s[nt][1] = fast_exp2(fmaf(s[nt][1], sl2, -r0));
            s[nt][2] = fast_exp2(fmaf(s[nt][2], sl2, -r1));
            s[nt][3] = fast_exp2(fmaf(s[nt][3], sl2, -r1));
            ps0 += s[nt][0] + s[nt][1];
            ps1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * c0 + ps0;
        l1 = l1 * c1 + ps1;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            acc[dt][0] *= c0;
            acc[dt][1] *= c0;
            acc[dt][2] *= c1;
            acc[dt][3] *= c1;
        }

        // O += P v: v's B fragments by ldmatrix.trans, two head-column tiles per x4.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned int pa[4];
            pa[0] = pack2_f32<T>(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack2_f32<T>(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack2_f32<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack2_f32<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
            for (int dt = 0; dt + 1 < DT; dt += 2) {
                unsigned int vf[4];
                ldsm_x4_t(vf, vs_a + (key * SK + (dt + (lane >> 4)) * 8) * 2);
                mma_16816<T>(acc[dt], pa, vf[0], vf[1]);
                mma_16816<T>(acc[dt + 1], pa, vf[2], vf[3]);
            }
            if (DT % 2) {
                unsigned int v0, v1;
                ldsm_x2_t(v0, v1, vs_a + (key * SK + (DT - 1) * 8) * 2);
                mma_16816<T>(acc[DT - 1], pa, v0, v1);
            }
        }
        __syncthreads(); // this stage is overwritten by the load two iterations on
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
    const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int row0 = q0 + wr + g, row1 = row0 + 8;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t4;
        if (row0 < lq) {
            const unsigned int p = pack2_f32<T>(acc[dt][0] * inv0, acc[dt][1] * inv0);
            *(unsigned int*)(ob + (long long)row0 * ld_o + col) = p;
        }
        if (row1 < lq) {
            const unsigned int p = pack2_f32<T>(acc[dt][2] * inv1, acc[dt][3] * inv1);
            *(unsigned int*)(ob + (long long)row1 * ld_o + col) = p;
        }
    }
}

// m16n8k8: the k-tail of q k^T when d % 16 == 8 (d = 40: 2 k16 steps and one k8, no padding).
//   a[0]: A[g][2t, 2t+1]  a[1]: A[g+8][2t, 2t+1]   b0: B[2t, 2t+1][g].
template <typename T>
__device__ __forceinline__ void mma_1688(float (&c)[4], unsigned int a0, unsigned int a1,
                                         unsigned int b0);
template <>
__device__ __forceinline__ void mma_1688<hdb_f16>(float (&c)[4], unsigned int a0, unsigned int a1,
                                                  unsigned int b0) {
#ifdef HDB_EMULATE
    const unsigned int a[2] = {a0, a1};
    hdb_emu::mma_sync(hdb_emu::Half::F16, 8, c, a, b0, 0u);
#else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, "
                 "{%6}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
#endif
}
template <>
__device__ __forceinline__ void mma_1688<hdb_bf16>(float (&c)[4], unsigned int a0,
                                                   unsigned int a1, unsigned int b0) {
#ifdef HDB_EMULATE
    const unsigned int a[2] = {a0, a1};
    hdb_emu::mma_sync(hdb_emu::Half::BF16, 8, c, a, b0, 0u);
#else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, "
                 "{%6}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
#endif
}
__device__ __forceinline__ void ldsm_x2(unsigned int& r0, unsigned int& r1, unsigned int addr) {
#ifdef HDB_EMULATE
    unsigned int r[2];
    hdb_emu::ldmatrix(2, false, r, addr);
    r0 = r[0];
    r1 = r[1];
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r0), "=r"(r1)
                 : "r"(addr));
#endif
}

// Shared-memory row stride (elements) for ldmatrix without bank conflicts: the 8 rows of an
// 8x8 matrix must start in 8 different 4-bank groups, i.e. the stride in 4-byte words must be
// an odd multiple of 4 modulo 32. d = 40 takes 40 itself (no padding), 64 -> 72, 80 -> 88,
// 160 -> 168.
__host__ __device__ constexpr int conflict_free_stride(int d) {
    return ((d / 2) % 8 == 4) ? d : ((d + 8) / 2 % 8 == 4) ? d + 8 : ((d + 16) / 2 % 8 == 4) ? d + 16 : d + 24;
}

// flash3: flash2 with MT m-tiles (16 query rows each) per warp, so every k/v fragment taken
// by ldmatrix feeds MT mma chains and each warp has MT independent softmax chains to
// interleave; the q k^T k-dimension is not padded (a m16n8k8 step takes d % 16 == 8).
template <typename T, int D, int BN, int MT>
__device__ __forceinline__ void flash3_attn(T* __restrict__ out, const T* __restrict__ q,
                                            const T* __restrict__ k, const T* __restrict__ v,
                                            int lq, int lk, long long ld_q, long long ld_k,
                                            long long ld_v, long long ld_o, float scale) {
    constexpr int WARPS = 4;
    constexpr int BM = 16 * MT * WARPS;
    constexpr int SK = conflict_free_stride(D);
    constexpr int KS = D / 16;        // full k16 steps of q k^T
    constexpr bool K8 = D % 16 == 8;  // one more k8 step
    constexpr int NT = BN / 8;
    constexpr int DT = D / 8;
    constexpr int CH = D / 8;
    static_assert(D % 8 == 0 && BN % 32 == 0, "tile shape");
    extern __shared__ __align__(16) unsigned short smem[];
    const unsigned int sq_a = smem_addr(smem);
    const unsigned int skv_a = sq_a + BM * SK * 2;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y;
    const int q0 = blockIdx.x * BM;
    const T* qb = q + (long long)b * lq * ld_q + (long long)h * D;
    const T* kb = k + (long long)b * lk * ld_k + (long long)h * D;
    const T* vb = v + (long long)b * lk * ld_v + (long long)h * D;
    T* ob = out + (long long)b * lq * ld_o + (long long)h * D;

    for (int i = tid; i < BM * CH; i += blockDim.x) {
        const int r = i / CH, c = i - r * CH;
        const bool in = q0 + r < lq;
        cp_async16(sq_a + (r * SK + c * 8) * 2, qb + (long long)(in ? q0 + r : 0) * ld_q + c * 8,
                   in ? 16 : 0);
    }
    auto load_kv = [&](int stage, int kt) {
        const unsigned int ks_a = skv_a + stage * 2 * BN * SK * 2;
        const unsigned int vs_a = ks_a + BN * SK * 2;
        for (int i = tid; i < BN * CH; i += blockDim.x) {
            const int r = i / CH, c = i - r * CH;
            const bool in = kt + r < lk;
            const long long row = in ? kt + r : 0;
            cp_async16(ks_a + (r * SK + c * 8) * 2, kb + row * ld_k + c * 8, in ? 16 : 0);
            cp_async16(vs_a + (r * SK + c * 8) * 2, vb + row * ld_v + c * 8, in ? 16 : 0);
        }
    };
    load_kv(0, 0);
    cp_async_commit();

    const int wr = warp * 16 * MT;
    unsigned int qa[MT][KS + 1][4];
    float acc[MT][DT][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
            acc[mt][dt][0] = acc[mt][dt][1] = acc[mt][dt][2] = acc[mt][dt][3] = 0.0f;
        m[mt][0] = m[mt][1] = HDB_NEG_INF;
        l[mt][0] = l[mt][1] = 0.0f;
    }
    const float sl2 = scale * 1.4426950408889634f;
    const int ntiles = (lk + BN - 1) / BN;

    for (int it = 0; it < ntiles; ++it) {
        const int kt = it * BN;
        if (it + 1 < ntiles) {
            load_kv((it + 1) & 1, kt + BN);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int row = wr + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks)
                    ldsm_x4(qa[mt][ks], sq_a + (row * SK + ks * 16 + (lane >> 4) * 8) * 2);
                if (K8) ldsm_x2(qa[mt][KS][0], qa[mt][KS][1], sq_a + (row * SK + KS * 16) * 2);
            }
        }
        const unsigned int ks_a = skv_a + (it & 1) * 2 * BN * SK * 2;
        const unsigned int vs_a = ks_a + BN * SK * 2;

        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned int kf[4];
                const int key = (2 * np + (lane >> 4)) * 8 + (lane & 7);
                ldsm_x4(kf, ks_a + (key * SK + ks * 16 + ((lane >> 3) & 1) * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(s[mt][2 * np], qa[mt][ks], kf[0], kf[1]);
                    mma_16816<T>(s[mt][2 * np + 1], qa[mt][ks], kf[2], kf[3]);
                }
            }
        }
        if (K8) {
            // ldmatrix.x4 of keys (4 nq + j) * 8 .. + 7, dims KS*16 .. + 7: b0 of n-tile 4 nq + j.
#pragma unroll
            for (int nq = 0; nq < NT / 4; ++nq) {
                unsigned int kf[4];
                const int key = (4 * nq + (lane >> 3)) * 8 + (lane & 7);
                ldsm_x4(kf, ks_a + (key * SK + KS * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        mma_1688<T>(s[mt][4 * nq + j], qa[mt][KS][0], qa[mt][KS][1], kf[j]);
            }
        }

        if (kt + BN > lk) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (kt + nt * 8 + 2 * t4 + (e & 1) >= lk) s[mt][nt][e] = HDB_NEG_INF;
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx0 = HDB_NEG_INF, mx1 = HDB_NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                mx0 = fmaxf(mx0, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                mx1 = fmaxf(mx1, fmaxf(s[mt][nt][2], s[mt][nt][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m[mt][0], mx0), mn1 = fmaxf(m[mt][1], mx1);
            const float r0 = mn0 == HDB_NEG_INF ? 0.0f : mn0 * sl2;
            const float r1 = mn1 == HDB_NEG_INF ? 0.0f : mn1 * sl2;
            const float c0 = fast_exp2(fmaf(m[mt][0], sl2, -r0));
            const float c1 = fast_exp2(fmaf(m[mt][1], sl2, -r1));
            m[mt][0] = mn0;
            m[mt][1] = mn1;
            float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[mt][nt][0] = fast_exp2(fmaf(s[mt][nt][0], sl2, -r0));
                s[mt][nt][1] = fast_exp2(fmaf(s[mt][nt][1], sl2, -r0));
                s[mt][nt][2] = fast_exp2(fmaf(s[mt][nt][2], sl2, -r1));
                s[mt][nt][3] = fast_exp2(fmaf(s[mt][nt][3], sl2, -r1));
                ps0 += s[mt][nt][0] + s[mt][nt][1];
                ps1 += s[mt][nt][2] + s[mt][nt][3];
            }
            l[mt][0] = l[mt][0] * c0 + ps0;
            l[mt][1] = l[mt][1] * c1 + ps1;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                acc[mt][dt][0] *= c0;
                acc[mt][dt][1] *= c0;
                acc[mt][dt][2] *= c1;
                acc[mt][dt][3] *= c1;
            }
        }

#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned int pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = pack2_f32<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = pack2_f32<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = pack2_f32<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = pack2_f32<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
            const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
            for (int dt = 0; dt + 1 < DT; dt += 2) {
                unsigned int vf[4];
                ldsm_x4_t(vf, vs_a + (key * SK + (dt + (lane >> 4)) * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc[mt][dt], pa[mt], vf[0], vf[1]);
                    mma_16816<T>(acc[mt][dt + 1], pa[mt], vf[2], vf[3]);
                }
            }
            if (DT % 2) {
                unsigned int v0, v1;
                ldsm_x2_t(v0, v1, vs_a + (key * SK + (DT - 1) * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) mma_16816<T>(acc[mt][DT - 1], pa[mt], v0, v1);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float l0 = l[mt][0], l1 = l[mt][1];
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
        const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
        const int row0 = q0 + wr + mt * 16 + g, row1 = row0 + 8;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const int col = dt * 8 + 2 * t4;
            if (row0 < lq)
                *(unsigned int*)(ob + (long long)row0 * ld_o + col) =
                    pack2_f32<T>(acc[mt][dt][0] * inv0, acc[mt][dt][1] * inv0);
            if (row1 < lq)
                *(unsigned int*)(ob + (long long)row1 * ld_o + col) =
                    pack2_f32<T>(acc[mt][dt][2] * inv1, acc[mt][dt][3] * inv1);
        }
    }
}

#define HDB_FLASH3_ATTN(sfx, T)                                                                \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        flash3_attn_d40_##sfx(T* __restrict__ out, const T* __restrict__ q,                    \
                              const T* __restrict__ k, const T* __restrict__ v, int lq,        \
                              int lk, long long ld_q, long long ld_k, long long ld_v,          \
                              long long ld_o, float scale) {                                   \
        flash3_attn<T, 40, 64, 2>(out, q, k, v, lq, lk, ld_q, ld_k, ld_v, ld_o, scale);        \
    }
#define HDB_FLASH3_ATTN_ALL(sfx, T) HDB_FLASH3_ATTN(sfx, T)
HDB_FOR_EACH_HALF_DTYPE(HDB_FLASH3_ATTN_ALL)

#define HDB_FLASH2_ATTN(name, sfx, T, D, BN, WARPS)                                            \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                   \
        name##_d##D##_##sfx(T* __restrict__ out, const T* __restrict__ q,                      \
                            const T* __restrict__ k, const T* __restrict__ v, int lq, int lk,  \
                            long long ld_q, long long ld_k, long long ld_v, long long ld_o,    \
                            float scale) {                                                     \
        flash2_attn<T, D, BN, WARPS>(out, q, k, v, lq, lk, ld_q, ld_k, ld_v, ld_o, scale);     \
    }
#define HDB_FLASH2_ATTN_ALL_D(sfx, T)               \
    HDB_FLASH2_ATTN(flash2_attn, sfx, T, 40, 64, 4) \
    HDB_FLASH2_ATTN(flash2_attn, sfx, T, 64, 64, 4) \
    HDB_FLASH2_ATTN(flash2_attn, sfx, T, 80, 64, 4) \
    HDB_FLASH2_ATTN(flash2_attn, sfx, T, 160, 32, 4)
HDB_FOR_EACH_HALF_DTYPE(HDB_FLASH2_ATTN_ALL_D)
