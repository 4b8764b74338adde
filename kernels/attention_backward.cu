// attention_backward.cu: attention's backward pass, two ways.
//
// The flash path (flash_attn_bwd_*; src/backend/cuda/ops/flash_backward.rs) keeps the scores on
// chip, FlashAttention-2 style, for f16/bf16 at head dims 40, 64, 80 and 160; the materialised
// path (attention_backward_rows_*; src/backend/cuda/ops/attention_backward.rs) takes f32 and
// every other head dim. Both recompute the probabilities from q and k (the forward saves
// nothing), with S = scale q k^T, P = softmax(S) (causal: keys past the query masked),
// dP = dO V^T, D = rowsum(P dP), dS = P (dP - D):
//   dV = P^T dO,  dQ = scale dS K,  dK = scale dS^T Q.
// P and dS are rounded to T once, as operands of the products that read them (as the forward
// rounds P before P V); everything else is f32.
//
// Layout (as attention.cu): q, dout, dq [batch, lq, heads * d]; k, v, dk, dv
// [batch, lk, heads * d]; head h owns columns h*d .. (h+1)*d; rows dense (ld = heads * d).
//
// ---------------------------------------------------------------------------------------------
// flash_attn_bwd_dq_d{40,64,80,160}_{f16,bf16}(T* dq, float* stats, const T* q, const T* k,
//     const T* v, const T* dout, int lq, int lk, long long ld, float scale, int causal)
//   Query-parallel: grid = (ceil(lq / 64), heads, batch); block = 128 threads (4 warps x 16
//   query rows). Two sweeps over the key tiles (BN = 64 keys; 32 at d = 160), one
//   double-buffered cp.async pipeline running through both:
//   1. S = q k^T and dP = dO V^T by mma.sync m16n8k16 (f32 accumulate), masked (keys past lk;
//      causal: past the row's query; tiles wholly past the block's last query are skipped);
//      an online max m, sum l of p = 2^(S scale log2 e - m) and sum of p dP, rescaled as the
//      max moves. At the end L = m scale log2(e) + log2(l) (the log-sum-exp, log2 domain) and
//      D = (sum p dP) / l, written to stats (f32 [2][batch * heads][lq]: L, then D).
//   2. S and dP again; P = 2^(S scale log2 e - L), dS = P (dP - D), dQ += dS K with dS taken
//      from the accumulator registers as the A operand (rounded to T) and K by ldmatrix.trans.
//      dq = scale dQ, rounded once.
//   Dynamic shared memory (16-bit elements, rows of SK = round16(d) + 8): q and dO tiles
//   64 x SK, two stages of k and v tiles BN x SK: d40 43 KB, d64 55.3 KB, d80 67.6 KB, d160
//   86 KB (the host raises the function's limit above 48 KB).
//
// flash_attn_bwd_dkv_d{40,64,80,160}_{f16,bf16}(T* dk, T* dv, float* part, const T* q,
//     const T* k, const T* v, const T* dout, const float* stats, int lq, int lk, long long ld,
//     float scale, int causal, int splits, int tiles_per_split)
//   Key-parallel: grid = (ceil(lk / 64) * splits, heads, batch); block = 128 threads (4 warps
//   x 16 keys); block x takes key tile x / splits and, of the query tiles (BM = 64 queries; 32
//   at d = 160), split x % splits's tiles_per_split of them (causal: none before the first
//   that sees one of its keys). The k and v tiles stay in shared memory; q, dO, L and D tiles
//   are double-buffered. Per query tile: S^T = k q^T and dP^T = v dO^T (the warp's 16 keys as
//   the mma's rows), P^T = 2^(S^T scale log2 e - L) (0 for masked pairs and queries past lq),
//   dS^T = P^T (dP^T - D); dV += P^T dO and dK += dS^T q (A from the accumulator registers,
//   B by ldmatrix.trans). One split: dk = scale dK and dv = dV rounded into dk, dv. Several:
//   f32 partial sums into part ([splits][2][batch * lk * ld]: dk's then dv's), every row a
//   split owns written (zeros where it had no tile), for flash_attn_bwd_reduce_*. The
//   heuristic (flash_backward_splits) splits only grids under two blocks an SM: cross-attention
//   over 77 text tokens, where 2 key tiles x heads x batch blocks would each sweep every query.
//   Dynamic shared memory: k and v tiles 64 x SK, two stages of q and dO tiles BM x SK, two
//   stages of L and D (BM f32 each): d40 44 KB, d64 56.3 KB, d80 68.6 KB, d160 86.5 KB.
//
// flash_attn_bwd_reduce_{f16,bf16}(T* dk, T* dv, const float* part, long long n, int splits)
//   dk[i], dv[i] = the sum over splits of part's (f32, in split order), rounded once to T.
//   The element-wise contract (256 threads a block, grid-stride over n = batch * lk * ld).
//
// Why dQ has its own sweep. FlashAttention-2 accumulates dQ in the key-parallel kernel with
// f32 atomics (each key block adds dS K into a shared f32 dQ). Here the query-parallel kernel
// that must sweep the keys for L and D anyway sweeps them again for dQ instead: S and dP are
// recomputed once more (2 of the 9 products below, where the atomic version has 7 and an f32
// dQ buffer, its zeroing and a cast), but dQ needs no atomics, so the gradients are the same
// bit for bit from run to run (a checkpointed run equals an unchecked one), the kernels have
// no inter-block reduction the emulation's two schedules could miss, and the dQ traffic that
// atomics would put on L2 is gone: 64 key tiles x 10.5 MB of f32 adds at the shape below.
//
// Napkin math, SD 1.5 self-attention at 64x64 latents, batch 2, 8 heads, d = 40,
// lq = lk = 4096: one product over all (query, key) pairs is 2 B H lq lk d = 21.5 GFLOP;
// the dq kernel takes 5 (S, dP; S, dP, dS K) and the dkv kernel 4 (S^T, dP^T, P^T dO,
// dS^T q): 193 GFLOP -> ~0.2 ms at 990 TFLOP/s dense fp16 (H100 SXM), ~0.5 ms at the 40 % of
// peak that mma.sync kernels reach; bytes are small (q, k, v, dO 5.2 MB each, re-read from
// L2). The materialised path at the same shape: ~1.1 ms of memory traffic (below).
// Cross-attention (lk = 77) is latency- and bytes-bound: q, dO, dq 3 x 5.2 MB -> ~5 us.
//
// Checked (no GPU has run these kernels yet): against the CPU backend under the kernel
// emulation (tests/backend_ops emu::attention_backward: tile edges, lk = 77, causal, every head
// dim, several heads and batch elements, splits), on the emulated GPU (gpu::attention_backward,
// and the whole-model gradients of tests/cuda_models.rs on Cuda<f16|bf16> through these
// kernels), and compiled by NVRTC for sm_80 and sm_90 (tests/kernels_compile.rs). Registers,
// from ptxas through NVRTC 12.8 (cubin for sm_80 / sm_90, -Xptxas -v): no spills; dq 126-168
// a thread, dkv 140 (d 40) to 251 (d 160: 160 f32 accumulators), so 2 to 4 blocks an SM by
// registers and 2 (d 160) to 5 (d 40, on an H100) by shared memory. Timing waits for a GPU:
// `hdb bench cuda` (scripts/gpu-check.sh's bench phase) prints both paths against PyTorch's
// SDPA backward.
//
// ---------------------------------------------------------------------------------------------
// attention_backward_rows_{f32,f16,bf16}(T* p, T* ds, const float* s, const float* dp,
//                                        long long rows, int lk, int rows_per_head, int q0,
//                                        int causal)
//   The materialised path's row step. Per (batch element, chunk of query rows), for every
//   head at once, the host computes S = scale Q K^T and dP = dO V^T in f32 (cuBLAS), this
//   kernel turns them into P = softmax(S) and dS = P (dP - rowsum(P dP)) in T, and the host
//   finishes with the three GEMMs (dK and dV accumulated over the chunks in f32).
//   s, dp [rows, lk] f32; p, ds [rows, lk] in T. Row r is query q0 + r % rows_per_head of
//   head r / rows_per_head (the chunk's rows start at query q0). Causal: keys j > that query
//   are masked (p = ds = 0 there; lq == lk, the host checks). p and ds may not overlap s or
//   dp. The softmax is torch's (max-subtracted, expf), the row sum of P dP an f32 warp sum.
//   grid = ceil(rows / 8); block = 256 threads = 8 warps, one row per warp (lanes stride over
//   lk); no shared memory. Sweeps: max, sum, dot, write: s is read four times and dp twice,
//   all but the first of each from L1/L2 (a row is at most 16 KB of each at lk = 4096).
//   Napkin math, SD 1.5's self-attention at 64x64 (8 heads, lk = 4096), one chunk of 256
//   query rows, fp16: 2 x 33.5 MB f32 in from HBM + 2 x 16.8 MB out = 101 MB -> ~30 us at
//   3.35 TB/s; the chunk's five GEMMs are 5 x 2 x 8 x 256 x 4096 x 40 = 3.4 GFLOP -> ~5 us
//   of tensor cores: a bandwidth-bound path (32 chunks: ~1.1 ms at batch 2), which the flash
//   path above replaces where it applies.
// ---------------------------------------------------------------------------------------------

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void attention_backward_rows(T* __restrict__ p, T* __restrict__ ds,
                                                        const float* __restrict__ s,
                                                        const float* __restrict__ dp,
                                                        long long rows, int lk,
                                                        int rows_per_head, int q0, int causal) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows || lk <= 0 || rows_per_head <= 0) return; // whole warps leave
    const long long qi = (long long)q0 + row % rows_per_head;
    const int visible = causal ? (int)min((long long)lk, qi + 1) : lk;
    const float* sr = s + row * lk;
    const float* dpr = dp + row * lk;
    T* pr = p + row * lk;
    T* dsr = ds + row * lk;
    float m = HDB_NEG_INF;
    for (int j = lane; j < visible; j += 32) m = fmaxf(m, sr[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < visible; j += 32) sum += expf(sr[j] - m);
    const float inv = 1.0f / warp_sum(sum);
    float dot = 0.0f;
    for (int j = lane; j < visible; j += 32) dot += expf(sr[j] - m) * inv * dpr[j];
    dot = warp_sum(dot);
    for (int j = lane; j < lk; j += 32) {
        float pv = 0.0f, g = 0.0f;
        if (j < visible) {
            pv = expf(sr[j] - m) * inv;
            g = pv * (dpr[j] - dot);
        }
        pr[j] = from_f32<T>(pv);
        dsr[j] = from_f32<T>(g);
    }
}

#define HDB_ATTENTION_BACKWARD(sfx, T)                                                          \
    extern "C" __global__ void __launch_bounds__(256) attention_backward_rows_##sfx(           \
        T* p, T* ds, const float* s, const float* dp, long long rows, int lk,                  \
        int rows_per_head, int q0, int causal) {                                                \
        attention_backward_rows<T>(p, ds, s, dp, rows, lk, rows_per_head, q0, causal);         \
    }
HDB_FOR_EACH_DTYPE(HDB_ATTENTION_BACKWARD)

// ---------------------------------------------------------------------------------------------
// The flash backward: pieces both kernels share (one warp's 16 rows of mma fragments)
// ---------------------------------------------------------------------------------------------

#define HDB_POS_INF __int_as_float(0x7f800000)

// Zeroes columns D .. DP of `rows` shared-memory rows of stride SK: the k-padding of the
// products over the head dim (d = 40 pads to 48), which the copies below never write.
template <int D, int DP, int SK>
__device__ __forceinline__ void bwd_zero_pad(unsigned short* s, int rows) {
    constexpr int W = DP > D ? DP - D : 1; // never 0: NVRTC warns on `% 0` in the dead branch
    if (DP > D)
        for (int i = threadIdx.x; i < rows * W; i += blockDim.x)
            s[(i / W) * SK + D + i % W] = 0;
}

// `rows` rows of D elements, global rows r0 on (row stride ld), into shared memory at `dst`
// (row stride SK elements) by 16-byte cp.async; rows at or past `limit` are zero-filled.
template <int D, int SK, typename T>
__device__ __forceinline__ void bwd_load_rows(unsigned int dst, const T* src, int r0, int limit,
                                              long long ld, int rows) {
    constexpr int CH = D / 8; // 16-byte chunks a row
    for (int i = threadIdx.x; i < rows * CH; i += blockDim.x) {
        const int r = i / CH, c = i - r * CH;
        const bool in = r0 + r < limit;
        cp_async16(dst + (r * SK + c * 8) * 2, src + (long long)(in ? r0 + r : 0) * ld + c * 8,
                   in ? 16 : 0);
    }
}

// x = A1 B1^T and y = A2 B2^T for one warp's 16 rows: A1, A2 row-major [16][DP] at shared
// addresses a1, a2 (the warp's first row); B1, B2 row-major [8 NT][DP] at b1, b2 (their rows
// are the n dimension, so ldmatrix without .trans gives the B fragments). The four operands
// are read by ldmatrix each time rather than held in registers: at d = 160 the accumulators
// alone take 80 to 160 registers.
template <typename T, int KS, int NT, int SK>
__device__ __forceinline__ void bwd_two_products(float (&x)[NT][4], float (&y)[NT][4],
                                                 unsigned int a1, unsigned int a2,
                                                 unsigned int b1, unsigned int b2) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        x[nt][0] = x[nt][1] = x[nt][2] = x[nt][3] = y[nt][0] = y[nt][1] = y[nt][2] = y[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        unsigned int fa1[4], fa2[4];
        const unsigned int ao =
            (((lane & 7) + ((lane >> 3) & 1) * 8) * SK + ks * 16 + (lane >> 4) * 8) * 2;
        ldsm_x4(fa1, a1 + ao);
        ldsm_x4(fa2, a2 + ao);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            // One ldmatrix.x4: b0, b1 of n-tiles 2 np and 2 np + 1.
            const unsigned int bo =
                (((2 * np + (lane >> 4)) * 8 + (lane & 7)) * SK + ks * 16 + ((lane >> 3) & 1) * 8) * 2;
            unsigned int f1[4], f2[4];
            ldsm_x4(f1, b1 + bo);
            ldsm_x4(f2, b2 + bo);
            mma_16816<T>(x[2 * np], fa1, f1[0], f1[1]);
            mma_16816<T>(x[2 * np + 1], fa1, f1[2], f1[3]);
            mma_16816<T>(y[2 * np], fa2, f2[0], f2[1]);
            mma_16816<T>(y[2 * np + 1], fa2, f2[2], f2[3]);
        }
    }
}

// acc [16 x D] += A [16 x 8 NT] B [8 NT x D]. A is one warp's f32 C fragments x, rounded to T:
// n-tiles 2 kk and 2 kk + 1 are exactly A's k-step kk (FlashAttention-2's register reuse). B is
// row-major [8 NT][SK] at shared address b (its rows are the k dimension: ldmatrix.trans).
template <typename T, int NT, int DT, int SK>
__device__ __forceinline__ void bwd_accumulate(float (&acc)[DT][4], const float (&x)[NT][4],
                                               unsigned int b) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        unsigned int pa[4];
        pa[0] = pack2_f32<T>(x[2 * kk][0], x[2 * kk][1]);
        pa[1] = pack2_f32<T>(x[2 * kk][2], x[2 * kk][3]);
        pa[2] = pack2_f32<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        pa[3] = pack2_f32<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
        const int row = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
        for (int dt = 0; dt + 1 < DT; dt += 2) {
            unsigned int f[4];
            ldsm_x4_t(f, b + (row * SK + (dt + (lane >> 4)) * 8) * 2);
            mma_16816<T>(acc[dt], pa, f[0], f[1]);
            mma_16816<T>(acc[dt + 1], pa, f[2], f[3]);
        }
        if (DT % 2) {
            unsigned int f0, f1;
            ldsm_x2_t(f0, f1, b + (row * SK + (DT - 1) * 8) * 2);
            mma_16816<T>(acc[DT - 1], pa, f0, f1);
        }
    }
}

// Rows row0 and row0 + 8 (those below `limit`) of one warp's [16 x D] f32 C fragments, times
// `mul`, rounded to T (two elements a store) into rows of stride ld.
template <typename T, int DT>
__device__ __forceinline__ void bwd_store(T* out, const float (&acc)[DT][4], int row0, int limit,
                                          long long ld, float mul) {
    const int t4 = threadIdx.x & 3;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t4;
        if (row0 < limit)
            *(unsigned int*)(out + (long long)row0 * ld + col) =
                pack2_f32<T>(acc[dt][0] * mul, acc[dt][1] * mul);
        if (row0 + 8 < limit)
            *(unsigned int*)(out + (long long)(row0 + 8) * ld + col) =
                pack2_f32<T>(acc[dt][2] * mul, acc[dt][3] * mul);
    }
}

// The same rows in f32 (the split key kernel's partial sums), unrounded.
template <int DT>
__device__ __forceinline__ void bwd_store_f32(float* out, const float (&acc)[DT][4], int row0,
                                              int limit, long long ld, float mul) {
    const int t4 = threadIdx.x & 3;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t4;
        if (row0 < limit)
            *(float2*)(out + (long long)row0 * ld + col) =
                make_float2(acc[dt][0] * mul, acc[dt][1] * mul);
        if (row0 + 8 < limit)
            *(float2*)(out + (long long)(row0 + 8) * ld + col) =
                make_float2(acc[dt][2] * mul, acc[dt][3] * mul);
    }
}

// ---------------------------------------------------------------------------------------------
// flash_attn_bwd_dq: per query tile, two sweeps over the keys (statistics, then dQ)
// ---------------------------------------------------------------------------------------------

template <typename T, int D, int BN>
__device__ __forceinline__ void flash_attn_bwd_dq(T* __restrict__ dq, float* __restrict__ stats,
                                                  const T* __restrict__ q, const T* __restrict__ k,
                                                  const T* __restrict__ v,
                                                  const T* __restrict__ dout, int lq, int lk,
                                                  long long ld, float scale, int causal) {
    constexpr int BM = 64; // query rows a block: 4 warps x 16
    constexpr int DP = (D + 15) / 16 * 16;
    constexpr int SK = DP + 8; // 16-byte rows, conflict-free ldmatrix (as flash2_attn)
    constexpr int KS = DP / 16;
    constexpr int NT = BN / 8;
    constexpr int DT = D / 8;
    static_assert(D % 8 == 0 && BN % 16 == 0, "tile shape");
    extern __shared__ __align__(16) unsigned short smem[];
    // Rows of SK elements: q [BM], dO [BM], then two stages of k [BN] and v [BN].
    const unsigned int sq_a = smem_addr(smem);
    const unsigned int sdo_a = sq_a + BM * SK * 2;
    const unsigned int skv_a = sdo_a + BM * SK * 2;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y;
    const int q0 = blockIdx.x * BM;
    const long long bh = (long long)b * gridDim.y + h;
    const long long qoff = (long long)b * lq * ld + (long long)h * D;
    const long long koff = (long long)b * lk * ld + (long long)h * D;
    float* lse = stats + bh * lq;
    float* delta = stats + ((long long)gridDim.z * gridDim.y + bh) * lq;

    bwd_zero_pad<D, DP, SK>(smem, 2 * BM + 4 * BN);
    bwd_load_rows<D, SK>(sq_a, q + qoff, q0, lq, ld, BM);
    bwd_load_rows<D, SK>(sdo_a, dout + qoff, q0, lq, ld, BM);
    auto load_kv = [&](int stage, int kt) {
        const unsigned int ks_a = skv_a + stage * 2 * BN * SK * 2;
        bwd_load_rows<D, SK>(ks_a, k + koff, kt, lk, ld, BN);
        bwd_load_rows<D, SK>(ks_a + BN * SK * 2, v + koff, kt, lk, ld, BN);
    };
    // Causal: no row of this tile sees a key past its last query.
    const int kend = causal ? min(lk, q0 + BM) : lk;
    const int ntiles = (kend + BN - 1) / BN;
    load_kv(0, 0);
    cp_async_commit();

    const int wr = warp * 16, row0 = q0 + wr + g, row1 = row0 + 8;
    const float sl2 = scale * 1.4426950408889634f;
    // Sweep 1: running max (raw scores), sum of p and sum of p dP, per row g and g + 8 (this
    // thread's share of the quad's keys). Sweep 2: L (log2 domain) and D from them.
    float m0 = HDB_NEG_INF, m1 = HDB_NEG_INF, l0 = 0.0f, l1 = 0.0f, e0 = 0.0f, e1 = 0.0f;
    float L0 = 0.0f, L1 = 0.0f, D0 = 0.0f, D1 = 0.0f;
    float acc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.0f;

    // Iterations 0 .. ntiles - 1 are sweep 1, ntiles .. 2 ntiles - 1 sweep 2, over the same key
    // tiles; the double buffer runs straight across the boundary.
    for (int it = 0; it < 2 * ntiles; ++it) {
        const bool second = it >= ntiles;
        const int kt = (second ? it - ntiles : it) * BN;
        if (it + 1 < 2 * ntiles) {
            const int nx = it + 1;
            load_kv(nx & 1, (nx >= ntiles ? nx - ntiles : nx) * BN);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const unsigned int ks_a = skv_a + (it & 1) * 2 * BN * SK * 2;
        const unsigned int vs_a = ks_a + BN * SK * 2;

        float s[NT][4], dp[NT][4]; // S = Q K^T (unscaled), dP = dO V^T
        bwd_two_products<T, KS, NT, SK>(s, dp, sq_a + wr * SK * 2, sdo_a + wr * SK * 2, ks_a,
                                        vs_a);
        // Keys past lk, and (causal) past the row's own query, get no probability.
        if (kt + BN > lk || (causal && kt + BN - 1 > q0 + wr)) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = kt + nt * 8 + 2 * t4 + (e & 1);
                    if (key >= lk || (causal && key > (e < 2 ? row0 : row1)))
                        s[nt][e] = HDB_NEG_INF;
                }
        }

        if (!second) {
            float mx0 = HDB_NEG_INF, mx1 = HDB_NEG_INF;
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
            // A row with no visible key yet keeps 0 as its reference (no inf - inf).
            const float r0 = mn0 == HDB_NEG_INF ? 0.0f : mn0 * sl2;
            const float r1 = mn1 == HDB_NEG_INF ? 0.0f : mn1 * sl2;
            const float c0 = fast_exp2(fmaf(m0, sl2, -r0)), c1 = fast_exp2(fmaf(m1, sl2, -r1));
            m0 = mn0;
            m1 = mn1;
            float ps0 = 0.0f, ps1 = 0.0f, pd0 = 0.0f, pd1 = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float p0 = fast_exp2(fmaf(s[nt][0], sl2, -r0));
                const float p1 = fast_exp2(fmaf(s[nt][1], sl2, -r0));
                const float p2 = fast_exp2(fmaf(s[nt][2], sl2, -r1));
                const float p3 = fast_exp2(fmaf(s[nt][3], sl2, -r1));
                ps0 += p0 + p1;
                ps1 += p2 + p3;
                pd0 += p0 * dp[nt][0] + p1 * dp[nt][1];
                pd1 += p2 * dp[nt][2] + p3 * dp[nt][3];
            }
            l0 = l0 * c0 + ps0;
            l1 = l1 * c1 + ps1;
            e0 = e0 * c0 + pd0;
            e1 = e1 * c1 + pd1;
            if (it == ntiles - 1) {
                // Every row sees key 0 (causal: key 0 <= its query), so l >= 1 here.
                l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
                l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
                l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
                l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
                e0 += __shfl_xor_sync(0xffffffffu, e0, 1);
                e0 += __shfl_xor_sync(0xffffffffu, e0, 2);
                e1 += __shfl_xor_sync(0xffffffffu, e1, 1);
                e1 += __shfl_xor_sync(0xffffffffu, e1, 2);
                L0 = m0 * sl2 + log2f(l0);
                L1 = m1 * sl2 + log2f(l1);
                D0 = e0 / l0;
                D1 = e1 / l1;
                if (t4 == 0) {
                    if (row0 < lq) {
                        lse[row0] = L0;
                        delta[row0] = D0;
                    }
                    if (row1 < lq) {
                        lse[row1] = L1;
                        delta[row1] = D1;
                    }
                }
            }
        } else {
            // P = exp2(S scale log2(e) - L), dS = P (dP - D) in place of S; dQ += dS K.
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][0] = fast_exp2(fmaf(s[nt][0], sl2, -L0)) * (dp[nt][0] - D0);
                s[nt][1] = fast_exp2(fmaf(s[nt][1], sl2, -L0)) * (dp[nt][1] - D0);
                s[nt][2] = fast_exp2(fmaf(s[nt][2], sl2, -L1)) * (dp[nt][2] - D1);
                s[nt][3] = fast_exp2(fmaf(s[nt][3], sl2, -L1)) * (dp[nt][3] - D1);
            }
            bwd_accumulate<T, NT, DT, SK>(acc, s, ks_a);
        }
        __syncthreads(); // this stage is overwritten by the load two iterations on
    }
    bwd_store<T, DT>(dq + qoff, acc, row0, lq, ld, scale);
}

// ---------------------------------------------------------------------------------------------
// flash_attn_bwd_dkv: per key tile (and split of the query tiles), one sweep over the queries
// ---------------------------------------------------------------------------------------------

template <typename T, int D, int BM>
__device__ __forceinline__ void flash_attn_bwd_dkv(
    T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ part, const T* __restrict__ q,
    const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ stats, int lq, int lk, long long ld, float scale, int causal,
    int splits, int tiles_per_split) {
    constexpr int BN = 64; // keys a block: 4 warps x 16
    constexpr int DP = (D + 15) / 16 * 16;
    constexpr int SK = DP + 8;
    constexpr int KS = DP / 16;
    constexpr int NT = BM / 8; // n-tiles of S^T: queries
    constexpr int DT = D / 8;
    static_assert(D % 8 == 0 && BM % 16 == 0, "tile shape");
    extern __shared__ __align__(16) unsigned short smem[];
    // Rows of SK elements: k [BN], v [BN], two stages of q [BM] and dO [BM]; then f32: two
    // stages of L [BM] and D [BM].
    const unsigned int sk_a = smem_addr(smem);
    const unsigned int sv_a = sk_a + BN * SK * 2;
    const unsigned int sqd_a = sv_a + BN * SK * 2;
    float* sst = (float*)(smem + (2 * BN + 4 * BM) * SK);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int kti = blockIdx.x / splits, split = blockIdx.x - kti * splits;
    const int k0 = kti * BN;
    const int b = blockIdx.z, h = blockIdx.y;
    const long long bh = (long long)b * gridDim.y + h;
    const long long qoff = (long long)b * lq * ld + (long long)h * D;
    const long long koff = (long long)b * lk * ld + (long long)h * D;
    const float* lse = stats + bh * lq;
    const float* delta = stats + ((long long)gridDim.z * gridDim.y + bh) * lq;

    // This block's query tiles: its split's share, from the first tile that sees one of its
    // keys when causal. A split may get none; it still writes its (zero) partial sums.
    const int qtiles = (lq + BM - 1) / BM;
    const int first = causal ? k0 / BM : 0;
    const int qbeg = max(first, split * tiles_per_split);
    const int qend = min(qtiles, (split + 1) * tiles_per_split);
    const int wk = warp * 16, key0 = k0 + wk + g, key1 = key0 + 8;
    const float sl2 = scale * 1.4426950408889634f;
    float dka[DT][4], dva[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
        dka[dt][0] = dka[dt][1] = dka[dt][2] = dka[dt][3] = dva[dt][0] = dva[dt][1] = dva[dt][2] =
            dva[dt][3] = 0.0f;

    if (qbeg < qend) {
        bwd_zero_pad<D, DP, SK>(smem, 2 * BN + 4 * BM);
        bwd_load_rows<D, SK>(sk_a, k + koff, k0, lk, ld, BN);
        bwd_load_rows<D, SK>(sv_a, v + koff, k0, lk, ld, BN);
        auto load_q = [&](int stage, int qt) {
            const unsigned int a = sqd_a + stage * 2 * BM * SK * 2;
            bwd_load_rows<D, SK>(a, q + qoff, qt, lq, ld, BM);
            bwd_load_rows<D, SK>(a + BM * SK * 2, dout + qoff, qt, lq, ld, BM);
            // L = +inf past lq makes those queries' p exactly 0 (their q and dO rows are 0).
            float* st = sst + stage * 2 * BM;
            for (int j = threadIdx.x; j < BM; j += blockDim.x) {
                const bool in = qt + j < lq;
                st[j] = in ? lse[qt + j] : HDB_POS_INF;
                st[BM + j] = in ? delta[qt + j] : 0.0f;
            }
        };
        load_q(0, qbeg * BM);
        cp_async_commit();
        const int n = qend - qbeg;
        // Keys past lk (their rows are never stored) and, causal, keys past a query.
        const bool key_edge = k0 + BN > lk;
        for (int i = 0; i < n; ++i) {
            const int qt = (qbeg + i) * BM;
            if (i + 1 < n) {
                load_q((i + 1) & 1, qt + BM);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const unsigned int sq = sqd_a + (i & 1) * 2 * BM * SK * 2;
            const unsigned int sdo = sq + BM * SK * 2;
            const float* st = sst + (i & 1) * 2 * BM;

            float s[NT][4], dp[NT][4]; // S^T = K Q^T, dP^T = V dO^T: this warp's 16 keys
            bwd_two_products<T, KS, NT, SK>(s, dp, sk_a + wk * SK * 2, sv_a + wk * SK * 2, sq,
                                            sdo);
            const bool mask = key_edge || (causal && qt < k0 + BN);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = nt * 8 + 2 * t4 + (e & 1); // query qt + col
                    const int key = e < 2 ? key0 : key1;
                    float p = fast_exp2(fmaf(s[nt][e], sl2, -st[col]));
                    if (mask && (key >= lk || (causal && key > qt + col))) p = 0.0f;
                    s[nt][e] = p;                         // P^T
                    dp[nt][e] = p * (dp[nt][e] - st[BM + col]); // dS^T
                }
            bwd_accumulate<T, NT, DT, SK>(dva, s, sdo); // dV += P^T dO
            bwd_accumulate<T, NT, DT, SK>(dka, dp, sq); // dK += dS^T Q (scaled at the end)
            __syncthreads(); // this stage is overwritten by the load two iterations on
        }
    }
    if (splits == 1) {
        bwd_store<T, DT>(dk + koff, dka, key0, lk, ld, scale);
        bwd_store<T, DT>(dv + koff, dva, key0, lk, ld, 1.0f);
    } else {
        const long long n_all = (long long)gridDim.z * lk * ld;
        float* pk = part + 2 * split * n_all + koff;
        bwd_store_f32<DT>(pk, dka, key0, lk, ld, scale);
        bwd_store_f32<DT>(pk + n_all, dva, key0, lk, ld, 1.0f);
    }
}

// dk, dv = the sums of the splits' partials (f32), rounded to T once.
template <typename T>
__device__ __forceinline__ void flash_attn_bwd_reduce(T* __restrict__ dk, T* __restrict__ dv,
                                                      const float* __restrict__ part,
                                                      long long n, int splits) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float a = 0.0f, c = 0.0f;
        for (int s = 0; s < splits; ++s) {
            a += part[2 * s * n + i];
            c += part[(2 * s + 1) * n + i];
        }
        dk[i] = from_f32<T>(a);
        dv[i] = from_f32<T>(c);
    }
}

#define HDB_FLASH_BWD(sfx, T, D, BN, BM)                                                        \
    extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_dq_d##D##_##sfx(          \
        T* dq, float* stats, const T* q, const T* k, const T* v, const T* dout, int lq, int lk, \
        long long ld, float scale, int causal) {                                               \
        flash_attn_bwd_dq<T, D, BN>(dq, stats, q, k, v, dout, lq, lk, ld, scale, causal);      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_dkv_d##D##_##sfx(         \
        T* dk, T* dv, float* part, const T* q, const T* k, const T* v, const T* dout,          \
        const float* stats, int lq, int lk, long long ld, float scale, int causal, int splits, \
        int tiles_per_split) {                                                                  \
        flash_attn_bwd_dkv<T, D, BM>(dk, dv, part, q, k, v, dout, stats, lq, lk, ld, scale,    \
                                     causal, splits, tiles_per_split);                          \
    }
#define HDB_FLASH_BWD_ALL_D(sfx, T)                                                            \
    HDB_FLASH_BWD(sfx, T, 40, 64, 64)                                                          \
    HDB_FLASH_BWD(sfx, T, 64, 64, 64)                                                          \
    HDB_FLASH_BWD(sfx, T, 80, 64, 64)                                                          \
    HDB_FLASH_BWD(sfx, T, 160, 32, 32)                                                         \
    extern "C" __global__ void __launch_bounds__(256) flash_attn_bwd_reduce_##sfx(             \
        T* dk, T* dv, const float* part, long long n, int splits) {                            \
        flash_attn_bwd_reduce<T>(dk, dv, part, n, splits);                                     \
    }
HDB_FOR_EACH_HALF_DTYPE(HDB_FLASH_BWD_ALL_D)
