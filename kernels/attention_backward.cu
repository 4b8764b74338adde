// attention_backward.cu: the row step of attention's backward pass on materialised scores
// (src/backend/cuda/ops/attention_backward.rs runs it between cuBLAS GEMMs). Per (batch
// element, chunk of query rows), for every head at once, the host computes in f32
//   S = scale Q K^T and dP = dO V^T           (cuBLAS, f32 outputs),
// this kernel turns them into
//   P = softmax(S) (masked above the diagonal when causal), in T for dV = P^T dO, and
//   dS = P (dP - rowsum(P dP)), in T for dQ = scale dS K and dK = scale dS^T Q,
// and the host finishes with those three GEMMs (dK and dV accumulated over the chunks in f32).
// The probabilities are recomputed from q and k (nothing is saved by the forward), as the CPU
// backend's attention_backward does; P and dS are rounded to T once, as the forward rounds P
// before P V.
//
// ---------------------------------------------------------------------------------------------
// attention_backward_rows_{f32,f16,bf16}(T* p, T* ds, const float* s, const float* dp,
//                                        long long rows, int lk, int rows_per_head, int q0,
//                                        int causal)
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
//   of tensor cores: this is a bandwidth-bound path, what a flash-style backward (scores
//   kept on chip) would remove. TODO(perf): that kernel, measured against this path.
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
