// norm.cu: group normalisation (with the resnet's SiLU fused) and layer normalisation, torch
// semantics: biased variance, eps inside the square root, y = x_hat * gamma + beta.
//
// Checked on an NVIDIA H100 (2026-11-26) against the CPU backend by tests/cuda_parity/
// (scripts/gpu-check.sh; figures in docs/perf.md): backend::cpu::group_norm, layer_norm.
//
// Statistics are two-pass (mean, then centred squares) in f32 with a tree reduction; the CPU
// backend accumulates in f64, so expect ~1e-6 relative differences on f32 inputs.
//
// ---------------------------------------------------------------------------------------------
// group_norm_{f32,f16,bf16}, group_norm_silu_{f32,f16,bf16}
//   (T* y, const T* x, const T* gamma, const T* beta, int batch, int channels, long long hw,
//    int groups, float eps)
//   x, y [batch, channels, hw] (NCHW, contiguous; y may equal x); gamma, beta [channels].
//   Channels split into `groups` consecutive groups (channels % groups == 0: the host checks);
//   each (sample, group) is one contiguous run of (channels / groups) * hw elements.
//   grid  = batch * groups blocks, one per (sample, group); block = 512 threads; static
//   shared memory 128 bytes (reduction scratch). Three sweeps over the group: sum, centred
//   squares, then normalise + affine (+ SiLU) and write. The second and third sweeps hit L2
//   (a group is at most 10 ch x 4096 px x 4 B = 160 KB at SD 1.5 shapes).
//   Napkin math, SD 1.5 64x64, 320 channels, batch 2, fp16: 5.2 MB read from HBM once + 5.2 MB
//   written = 10.5 MB -> ~3 us at 3.35 TB/s (H100 SXM), the bound. Only batch * 32 = 64
//   blocks at batch 2, fewer than the H100's 132 SMs: expect well under the bound.
//   Where batch * groups blocks would leave the GPU idle (the VAE decoder at batch 1: 32
//   blocks over 1M-element groups took 1.2 ms a call on an H100), the host runs the split
//   pair below instead.
//
// group_norm_stats_{f32,f16,bf16}(float* stats, const T* x, long long len, int chunks)
//   x as above, seen as batch * groups runs of `len` = (channels / groups) * hw elements.
//   grid = (chunks, batch * groups); block = 512 threads; static shared memory 128 bytes.
//   Block (k, g) takes chunk k of run g: elements [k * per, min(len, (k + 1) * per)) with
//   per = ceil(len / chunks), and writes its mean and sum of centred squares (two sweeps, the
//   second from L2) to stats[(g * chunks + k) * 2 + {0, 1}] (f32; [batch * groups * chunks * 2]).
//   An empty chunk writes zeros.
//
// group_norm_apply_{f32,f16,bf16}, group_norm_apply_silu_{f32,f16,bf16}
//   (T* y, const T* x, const T* gamma, const T* beta, const float* stats, int channels,
//    long long hw, int groups, int chunks, float eps)
//   grid = (chunks, batch * groups); block = 512 threads. Thread 0 merges the run's `chunks`
//   (count, mean, M2) triples in f64 (Chan et al.'s pairwise update, so no sum of squares
//   loses the mean's digits), then the block normalises its chunk as group_norm does. y may
//   equal x (each element is read, then written, by one thread).
//   Napkin math, VAE decoder at 512x512, 128 channels, batch 1, fp16: 67 MB read twice (the
//   stats' second sweep hits L2 for a chunk) + 67 MB written -> ~60 us at 3.35 TB/s.
//
// layer_norm_{f32,f16,bf16}(T* y, const T* x, const T* gamma, const T* beta, long long rows,
//                           int dim, float eps)
//   x, y [rows, dim] (contiguous; y may equal x); gamma, beta [dim].
//   grid  = ceil(rows / 8); block = 256 threads = 8 warps, one row per warp (lanes stride
//   over dim; warp sums). No shared memory.
//   Napkin math, SD 1.5 transformer at 64x64, batch 2: rows 8192, dim 320, fp16: 5.2 MB in +
//   5.2 MB out -> ~3 us at 3.35 TB/s; the second and third reads of a row hit L1.
//
// Backward (training adapters: input gradients; gamma and beta are frozen). With x_hat the
// normalised input, g = gamma and, with SiLU, z = x_hat g + beta the SiLU's input:
//   d_hat = dy g (times silu'(z) = s (1 + z (1 - s)), s = sigmoid(z), with SiLU)
//   dx = rstd (d_hat - mean(d_hat) - x_hat mean(d_hat x_hat))   over the run (group or row).
// The statistics are recomputed from x as the forward computes them (f32 two-pass in one
// block, or the split's f64 merge), and the two means are f32 block sums.
//
// group_norm_backward_{f32,f16,bf16}(T* dx, const T* x, const T* gamma, const T* beta,
//                                    const T* dy, int batch, int channels, long long hw,
//                                    int groups, float eps, int silu)
//   x, dy, dx [batch, channels, hw]; gamma, beta [channels] (beta is read only with SiLU).
//   dx may not overlap x or dy. group_norm's contract: grid = batch * groups blocks, one per
//   (sample, group) run; block = 512 threads; static shared memory 128 bytes. Four sweeps
//   over the run (sum, centred squares, the two gradient sums, write), the last three from L2.
//   Napkin math, SD 1.5 64x64, 320 channels, batch 1, fp16: x and dy 2.6 MB each read once
//   from HBM + dx 2.6 MB written = 7.9 MB -> ~2.4 us at 3.35 TB/s; 32 blocks on 132 SMs, so
//   the host splits runs this long (below), as the forward does.
//
// group_norm_backward_sums_{f32,f16,bf16}(float* sums, const T* x, const T* gamma,
//                                         const T* beta, const T* dy, const float* stats,
//                                         int channels, long long hw, int groups, int chunks,
//                                         float eps, int silu)
//   The split form's middle step, after group_norm_stats_* wrote `stats` (its contract):
//   grid = (chunks, batch * groups); block = 512 threads. Block (k, g) merges run g's stats as
//   group_norm_apply_* does, then writes its chunk's sums of d_hat and d_hat x_hat to
//   sums[(g * chunks + k) * 2 + {0, 1}] (f32; zeros for an empty chunk).
//
// group_norm_backward_apply_{f32,f16,bf16}(T* dx, const T* x, const T* gamma, const T* beta,
//                                          const T* dy, const float* stats,
//                                          const float* sums, int channels, long long hw,
//                                          int groups, int chunks, float eps, int silu)
//   grid = (chunks, batch * groups); block = 512 threads. Thread 0 merges the run's stats and
//   sums (f64), then the block writes dx over its chunk. dx may not overlap x or dy.
//   Napkin math, the split trio at SD 1.5 64x64, 320 channels, batch 1, fp16: x read three
//   times, dy twice (the second of each mostly from L2 for a chunk), dx written once: ~13 MB
//   -> ~4 us at 3.35 TB/s over 5 x 32 blocks.
//
// layer_norm_backward_{f32,f16,bf16}(T* dx, const T* x, const T* gamma, const T* dy,
//                                    long long rows, int dim, float eps)
//   x, dy, dx [rows, dim]; gamma [dim]. layer_norm's contract: grid = ceil(rows / 8); block =
//   256 threads = 8 warps, one row per warp; no shared memory. dx may not overlap x or dy.
//   Napkin math, SD 1.5 transformer at 64x64, batch 1: rows 4096, dim 320, fp16: 2.6 MB x +
//   2.6 MB dy in, 2.6 MB out -> ~2.4 us; the later sweeps of a row hit L1.
// ---------------------------------------------------------------------------------------------

#include "common.cuh"

template <typename T, bool SILU>
__device__ __forceinline__ void group_norm(T* y, const T* x, const T* __restrict__ gamma,
                                           const T* __restrict__ beta, int batch, int channels,
                                           long long hw, int groups, float eps) {
    __shared__ float scratch[32];
    if (groups <= 0 || (int)blockIdx.x >= batch * groups) return;
    const int cg = channels / groups;
    const int grp = blockIdx.x % groups;
    const long long len = (long long)cg * hw;
    const long long base = (long long)blockIdx.x * len; // (sample, group) runs are contiguous
    const T* xg = x + base;
    T* yg = y + base;
    if (len == 0) return;

    float s = 0.0f;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) s += to_f32(xg[i]);
    const float mean = block_sum(s, scratch) / (float)len;
    float sq = 0.0f;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const float dv = to_f32(xg[i]) - mean;
        sq += dv * dv;
    }
    const float var = block_sum(sq, scratch) / (float)len;
    const float rstd = 1.0f / sqrtf(var + eps);

    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const int c = grp * cg + (int)(i / hw);
        const float a = to_f32(gamma[c]) * rstd;
        float val = (to_f32(xg[i]) - mean) * a + to_f32(beta[c]);
        if (SILU) val = val / (1.0f + expf(-val));
        yg[i] = from_f32<T>(val);
    }
}

#define HDB_GROUP_NORM(sfx, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(512)                                          \
        group_norm_##sfx(T* y, const T* x, const T* __restrict__ gamma,                        \
                         const T* __restrict__ beta, int batch, int channels, long long hw,    \
                         int groups, float eps) {                                              \
        group_norm<T, false>(y, x, gamma, beta, batch, channels, hw, groups, eps);             \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(512)                                          \
        group_norm_silu_##sfx(T* y, const T* x, const T* __restrict__ gamma,                   \
                              const T* __restrict__ beta, int batch, int channels,             \
                              long long hw, int groups, float eps) {                           \
        group_norm<T, true>(y, x, gamma, beta, batch, channels, hw, groups, eps);              \
    }
HDB_FOR_EACH_DTYPE(HDB_GROUP_NORM)

template <typename T>
__device__ __forceinline__ void group_norm_stats(float* stats, const T* x, long long len,
                                                 int chunks) {
    __shared__ float scratch[32];
    if (chunks <= 0 || (int)blockIdx.x >= chunks) return;
    const long long per = (len + chunks - 1) / chunks;
    const long long lo = min(len, (long long)blockIdx.x * per);
    const long long hi = min(len, lo + per);
    const T* xg = x + (long long)blockIdx.y * len;
    float s = 0.0f;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) s += to_f32(xg[i]);
    const long long n = hi - lo;
    const float mean = n > 0 ? block_sum(s, scratch) / (float)n : block_sum(0.0f, scratch);
    float sq = 0.0f;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float dv = to_f32(xg[i]) - mean;
        sq += dv * dv;
    }
    const float m2 = block_sum(sq, scratch);
    if (threadIdx.x == 0) {
        float* out = stats + ((long long)blockIdx.y * chunks + blockIdx.x) * 2;
        out[0] = n > 0 ? mean : 0.0f;
        out[1] = n > 0 ? m2 : 0.0f;
    }
}

// A run's (mean, rstd) from its `chunks` (mean, M2) pairs at stats + blockIdx.y * chunks * 2
// (group_norm_stats_*), merged in f64 (Chan et al.'s pairwise update, so no sum of squares
// loses the mean's digits), into norm[0], norm[1]. One thread calls it.
__device__ __forceinline__ void merge_chunk_stats(float* norm, const float* __restrict__ stats,
                                                  long long len, int chunks, float eps) {
    const long long per = (len + chunks - 1) / chunks;
    const float* st = stats + (long long)blockIdx.y * chunks * 2;
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int k = 0; k < chunks; ++k) {
        const long long klo = min(len, (long long)k * per);
        const double nb = (double)(min(len, klo + per) - klo);
        if (nb == 0.0) continue;
        const double d = (double)st[2 * k] - mean, nn = n + nb;
        mean += d * nb / nn;
        m2 += (double)st[2 * k + 1] + d * d * n * nb / nn;
        n = nn;
    }
    norm[0] = (float)mean;
    norm[1] = (float)(1.0 / sqrt((n > 0.0 ? m2 / n : 0.0) + (double)eps));
}

template <typename T, bool SILU>
__device__ __forceinline__ void group_norm_apply(T* y, const T* x, const T* __restrict__ gamma,
                                                 const T* __restrict__ beta,
                                                 const float* __restrict__ stats, int channels,
                                                 long long hw, int groups, int chunks,
                                                 float eps) {
    __shared__ float norm[2];
    if (groups <= 0 || chunks <= 0 || (int)blockIdx.x >= chunks) return;
    const int cg = channels / groups;
    const int grp = (int)(blockIdx.y % (unsigned)groups);
    const long long len = (long long)cg * hw;
    const long long per = (len + chunks - 1) / chunks;
    if (threadIdx.x == 0) merge_chunk_stats(norm, stats, len, chunks, eps);
    __syncthreads();
    const float mean = norm[0], rstd = norm[1];
    const long long lo = min(len, (long long)blockIdx.x * per);
    const long long hi = min(len, lo + per);
    const long long base = (long long)blockIdx.y * len;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const int c = grp * cg + (int)(i / hw);
        const float a = to_f32(gamma[c]) * rstd;
        float val = (to_f32(x[base + i]) - mean) * a + to_f32(beta[c]);
        if (SILU) val = val / (1.0f + expf(-val));
        y[base + i] = from_f32<T>(val);
    }
}

#define HDB_GROUP_NORM_SPLIT(sfx, T)                                                            \
    extern "C" __global__ void __launch_bounds__(512)                                          \
        group_norm_stats_##sfx(float* stats, const T* x, long long len, int chunks) {          \
        group_norm_stats<T>(stats, x, len, chunks);                                            \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(512)                                          \
        group_norm_apply_##sfx(T* y, const T* x, const T* __restrict__ gamma,                  \
                               const T* __restrict__ beta, const float* __restrict__ stats,    \
                               int channels, long long hw, int groups, int chunks, float eps) { \
        group_norm_apply<T, false>(y, x, gamma, beta, stats, channels, hw, groups, chunks, eps); \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(512)                                          \
        group_norm_apply_silu_##sfx(T* y, const T* x, const T* __restrict__ gamma,             \
                                    const T* __restrict__ beta,                                \
                                    const float* __restrict__ stats, int channels,             \
                                    long long hw, int groups, int chunks, float eps) {         \
        group_norm_apply<T, true>(y, x, gamma, beta, stats, channels, hw, groups, chunks, eps); \
    }
HDB_FOR_EACH_DTYPE(HDB_GROUP_NORM_SPLIT)

template <typename T>
__device__ __forceinline__ void layer_norm(T* y, const T* x, const T* __restrict__ gamma,
                                           const T* __restrict__ beta, long long rows, int dim,
                                           float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows || dim <= 0) return; // whole warps leave: only warp-level sync below
    const T* xr = x + row * dim;
    T* yr = y + row * dim;

    float s = 0.0f;
    for (int c = lane; c < dim; c += 32) s += to_f32(xr[c]);
    const float mean = warp_sum(s) / (float)dim;
    float sq = 0.0f;
    for (int c = lane; c < dim; c += 32) {
        const float dv = to_f32(xr[c]) - mean;
        sq += dv * dv;
    }
    const float rstd = 1.0f / sqrtf(warp_sum(sq) / (float)dim + eps);
    for (int c = lane; c < dim; c += 32)
        yr[c] = from_f32<T>((to_f32(xr[c]) - mean) * rstd * to_f32(gamma[c]) + to_f32(beta[c]));
}

#define HDB_LAYER_NORM(sfx, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        layer_norm_##sfx(T* y, const T* x, const T* __restrict__ gamma,                        \
                         const T* __restrict__ beta, long long rows, int dim, float eps) {     \
        layer_norm<T>(y, x, gamma, beta, rows, dim, eps);                                      \
    }
HDB_FOR_EACH_DTYPE(HDB_LAYER_NORM)

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// d_hat at one element: dy gamma, times SiLU's derivative at z = x_hat gamma + beta with SiLU.
__device__ __forceinline__ float norm_d_hat(float dy, float x_hat, float g, float b, int silu) {
    if (silu) {
        const float z = x_hat * g + b;
        const float s = 1.0f / (1.0f + expf(-z));
        dy *= s * (1.0f + z * (1.0f - s));
    }
    return dy * g;
}

template <typename T>
__device__ __forceinline__ void group_norm_backward(T* __restrict__ dx, const T* __restrict__ x,
                                                    const T* __restrict__ gamma,
                                                    const T* __restrict__ beta,
                                                    const T* __restrict__ dy, int batch,
                                                    int channels, long long hw, int groups,
                                                    float eps, int silu) {
    __shared__ float scratch[32];
    if (groups <= 0 || (int)blockIdx.x >= batch * groups) return;
    const int cg = channels / groups;
    const int grp = blockIdx.x % groups;
    const long long len = (long long)cg * hw;
    const long long base = (long long)blockIdx.x * len;
    if (len == 0) return;
    const T* xg = x + base;
    const T* dyg = dy + base;
    T* dxg = dx + base;

    // The statistics, as group_norm computes them.
    float s = 0.0f;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) s += to_f32(xg[i]);
    const float mean = block_sum(s, scratch) / (float)len;
    float sq = 0.0f;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const float dv = to_f32(xg[i]) - mean;
        sq += dv * dv;
    }
    const float rstd = 1.0f / sqrtf(block_sum(sq, scratch) / (float)len + eps);

    float s1 = 0.0f, s2 = 0.0f;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const int c = grp * cg + (int)(i / hw);
        const float xh = (to_f32(xg[i]) - mean) * rstd;
        const float d = norm_d_hat(to_f32(dyg[i]), xh, to_f32(gamma[c]), to_f32(beta[c]), silu);
        s1 += d;
        s2 += d * xh;
    }
    const float m1 = block_sum(s1, scratch) / (float)len;
    const float m2 = block_sum(s2, scratch) / (float)len;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const int c = grp * cg + (int)(i / hw);
        const float xh = (to_f32(xg[i]) - mean) * rstd;
        const float d = norm_d_hat(to_f32(dyg[i]), xh, to_f32(gamma[c]), to_f32(beta[c]), silu);
        dxg[i] = from_f32<T>(rstd * (d - m1 - xh * m2));
    }
}

template <typename T>
__device__ __forceinline__ void group_norm_backward_sums(
    float* __restrict__ sums, const T* __restrict__ x, const T* __restrict__ gamma,
    const T* __restrict__ beta, const T* __restrict__ dy, const float* __restrict__ stats,
    int channels, long long hw, int groups, int chunks, float eps, int silu) {
    __shared__ float norm[2];
    __shared__ float scratch[32];
    if (groups <= 0 || chunks <= 0 || (int)blockIdx.x >= chunks) return;
    const int cg = channels / groups;
    const int grp = (int)(blockIdx.y % (unsigned)groups);
    const long long len = (long long)cg * hw;
    const long long per = (len + chunks - 1) / chunks;
    if (threadIdx.x == 0) merge_chunk_stats(norm, stats, len, chunks, eps);
    __syncthreads();
    const float mean = norm[0], rstd = norm[1];
    const long long lo = min(len, (long long)blockIdx.x * per);
    const long long hi = min(len, lo + per);
    const long long base = (long long)blockIdx.y * len;
    float s1 = 0.0f, s2 = 0.0f;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const int c = grp * cg + (int)(i / hw);
        const float xh = (to_f32(x[base + i]) - mean) * rstd;
        const float d =
            norm_d_hat(to_f32(dy[base + i]), xh, to_f32(gamma[c]), to_f32(beta[c]), silu);
        s1 += d;
        s2 += d * xh;
    }
    s1 = block_sum(s1, scratch);
    s2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
        float* out = sums + ((long long)blockIdx.y * chunks + blockIdx.x) * 2;
        out[0] = s1;
        out[1] = s2;
    }
}

template <typename T>
__device__ __forceinline__ void group_norm_backward_apply(
    T* __restrict__ dx, const T* __restrict__ x, const T* __restrict__ gamma,
    const T* __restrict__ beta, const T* __restrict__ dy, const float* __restrict__ stats,
    const float* __restrict__ sums, int channels, long long hw, int groups, int chunks,
    float eps, int silu) {
    __shared__ float norm[4];
    if (groups <= 0 || chunks <= 0 || (int)blockIdx.x >= chunks) return;
    const int cg = channels / groups;
    const int grp = (int)(blockIdx.y % (unsigned)groups);
    const long long len = (long long)cg * hw;
    const long long per = (len + chunks - 1) / chunks;
    if (threadIdx.x == 0) {
        merge_chunk_stats(norm, stats, len, chunks, eps);
        const float* sm = sums + (long long)blockIdx.y * chunks * 2;
        double s1 = 0.0, s2 = 0.0;
        for (int k = 0; k < chunks; ++k) {
            s1 += (double)sm[2 * k];
            s2 += (double)sm[2 * k + 1];
        }
        norm[2] = len > 0 ? (float)(s1 / (double)len) : 0.0f;
        norm[3] = len > 0 ? (float)(s2 / (double)len) : 0.0f;
    }
    __syncthreads();
    const float mean = norm[0], rstd = norm[1], m1 = norm[2], m2 = norm[3];
    const long long lo = min(len, (long long)blockIdx.x * per);
    const long long hi = min(len, lo + per);
    const long long base = (long long)blockIdx.y * len;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const int c = grp * cg + (int)(i / hw);
        const float xh = (to_f32(x[base + i]) - mean) * rstd;
        const float d =
            norm_d_hat(to_f32(dy[base + i]), xh, to_f32(gamma[c]), to_f32(beta[c]), silu);
        dx[base + i] = from_f32<T>(rstd * (d - m1 - xh * m2));
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_backward(T* __restrict__ dx, const T* __restrict__ x,
                                                    const T* __restrict__ gamma,
                                                    const T* __restrict__ dy, long long rows,
                                                    int dim, float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows || dim <= 0) return; // whole warps leave: only warp-level sync below
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    T* dxr = dx + row * dim;
    float s = 0.0f;
    for (int c = lane; c < dim; c += 32) s += to_f32(xr[c]);
    const float mean = warp_sum(s) / (float)dim;
    float sq = 0.0f;
    for (int c = lane; c < dim; c += 32) {
        const float dv = to_f32(xr[c]) - mean;
        sq += dv * dv;
    }
    const float rstd = 1.0f / sqrtf(warp_sum(sq) / (float)dim + eps);
    float s1 = 0.0f, s2 = 0.0f;
    for (int c = lane; c < dim; c += 32) {
        const float xh = (to_f32(xr[c]) - mean) * rstd;
        const float d = to_f32(dyr[c]) * to_f32(gamma[c]);
        s1 += d;
        s2 += d * xh;
    }
    const float m1 = warp_sum(s1) / (float)dim, m2 = warp_sum(s2) / (float)dim;
    for (int c = lane; c < dim; c += 32) {
        const float xh = (to_f32(xr[c]) - mean) * rstd;
        const float d = to_f32(dyr[c]) * to_f32(gamma[c]);
        dxr[c] = from_f32<T>(rstd * (d - m1 - xh * m2));
    }
}

#define HDB_NORM_BACKWARD(sfx, T)                                                               \
    extern "C" __global__ void __launch_bounds__(512)                                          \
        group_norm_backward_##sfx(T* dx, const T* x, const T* gamma, const T* beta,            \
                                  const T* dy, int batch, int channels, long long hw,          \
                                  int groups, float eps, int silu) {                           \
        group_norm_backward<T>(dx, x, gamma, beta, dy, batch, channels, hw, groups, eps, silu); \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(512) group_norm_backward_sums_##sfx(          \
        float* sums, const T* x, const T* gamma, const T* beta, const T* dy,                   \
        const float* stats, int channels, long long hw, int groups, int chunks, float eps,     \
        int silu) {                                                                             \
        group_norm_backward_sums<T>(sums, x, gamma, beta, dy, stats, channels, hw, groups,     \
                                    chunks, eps, silu);                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(512) group_norm_backward_apply_##sfx(         \
        T* dx, const T* x, const T* gamma, const T* beta, const T* dy, const float* stats,     \
        const float* sums, int channels, long long hw, int groups, int chunks, float eps,      \
        int silu) {                                                                             \
        group_norm_backward_apply<T>(dx, x, gamma, beta, dy, stats, sums, channels, hw,        \
                                     groups, chunks, eps, silu);                               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        layer_norm_backward_##sfx(T* dx, const T* x, const T* gamma, const T* dy,              \
                                  long long rows, int dim, float eps) {                        \
        layer_norm_backward<T>(dx, x, gamma, dy, rows, dim, eps);                              \
    }
HDB_FOR_EACH_DTYPE(HDB_NORM_BACKWARD)
