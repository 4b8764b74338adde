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
//   TODO(perf): split each group over several blocks (partial sums, then a second pass) so
//   small batches fill the GPU; vector loads.
//
// layer_norm_{f32,f16,bf16}(T* y, const T* x, const T* gamma, const T* beta, long long rows,
//                           int dim, float eps)
//   x, y [rows, dim] (contiguous; y may equal x); gamma, beta [dim].
//   grid  = ceil(rows / 8); block = 256 threads = 8 warps, one row per warp (lanes stride
//   over dim; warp sums). No shared memory.
//   Napkin math, SD 1.5 transformer at 64x64, batch 2: rows 8192, dim 320, fp16: 5.2 MB in +
//   5.2 MB out -> ~3 us at 3.35 TB/s; the second and third reads of a row hit L1.
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
