// lora.cu: multi-identity runtime LoRA, Punica BGMV style: every row of the batch gathers its
// own adapter, so one UNet pass serves several identities at the cost of one.
//
// Checked on an NVIDIA H100 (2026-11-26) against the CPU backend by tests/cuda_parity/
// (scripts/gpu-check.sh; figures in docs/perf.md): an f64 reference of the
// per-sample update (adapter::apply::AdapterCtx::add_runtime's semantics).
//
// ---------------------------------------------------------------------------------------------
// lora_bgmv_{f32,f16,bf16}(T* y, const T* x, long long rows, long long rows_per_sample,
//                          const int* sample_adapter, const hdb_lora_factor* adapters,
//                          int n_adapters, int din, int dout, long long ld_x, long long ld_y)
//   For each row i of x [rows, din] (row stride ld_x) with a = sample_adapter[i /
//   rows_per_sample] (one index per batch sample, -1 = none):
//     t = scale_a * (x_i . down_a^T)       shrink: [rank_a] (f32, shared memory)
//     y_i += t . up_a^T                    expand: y [rows, dout] (row stride ld_y), in place
//   y is the output of the base projection (cuBLAS) and is read, updated and written once.
//   Factors are f32 (hdb_lora_factor in common.cuh: down [rank, din], up [dout, rank]);
//   x and y are the kernel's dtype; accumulation is f32; y is rounded once.
//   Rows whose index is -1, out of range, or whose adapter's rank exceeds LORA_MAX_RANK (128)
//   are left untouched: the host validates indices and refuses larger ranks.
//   Several adapters on every sample (the non-per-sample runtime mode): launch once per
//   adapter with all indices equal, or merge them (lidb_merge).
//   grid  = ceil(rows / LORA_ROWS) blocks (LORA_ROWS = 16 rows each);
//   block = 256 threads (8 warps); static shared memory 16 x 128 x 4 = 8 KB for t.
//   Shrink: warp w computes the dot products of rows w and w + 8 (lanes stride over din,
//   then a warp sum). Expand: threads stride over (row, group of 8 outputs).
//   x, y may not overlap. sample_adapter has ceil(rows / rows_per_sample) entries.
//   Napkin math, SD 1.5 to_q at 64x64 latents, batch 2 (rows 8192, din = dout = 320, fp16,
//   rank 1): x read 5.2 MB + y read and written 10.5 MB = 15.7 MB -> ~5 us at 3.35 TB/s
//   (H100 SXM), the bound; FLOPs 2 * rows * r * (din + dout) = 10 M, nothing. The factors
//   (r * (din + dout) * 4 bytes per adapter) are read once per block from L2, so 8 different
//   identities in a batch cost the same as one (the issue's target: within 10 %).
//   x, y and the down factors are read 8 elements (16 bytes in f16) at a time where every row
//   is 16-byte aligned; otherwise element by element (same result). The first version
//   (element accesses only) added 3.3x the base GEMMs' time over SD 1.5's 128 projections at
//   batch 8 on an H100.
//   TODO(perf): fuse into the base GEMM's epilogue (cuBLASLt has no gather epilogue; needs
//   our own GEMM).
// ---------------------------------------------------------------------------------------------

#include "common.cuh"

#define LORA_ROWS 16
#define LORA_MAX_RANK 128

template <typename T>
__device__ __forceinline__ void lora_bgmv(T* __restrict__ y, const T* __restrict__ x, long long rows,
                                          long long rows_per_sample,
                                          const int* __restrict__ sample_adapter,
                                          const hdb_lora_factor* __restrict__ adapters,
                                          int n_adapters, int din, int dout, long long ld_x,
                                          long long ld_y) {
    __shared__ float t[LORA_ROWS][LORA_MAX_RANK];
    __shared__ int row_adapter[LORA_ROWS];
    const long long row0 = (long long)blockIdx.x * LORA_ROWS;
    if (row0 >= rows || rows_per_sample <= 0) return; // uniform over the block
    const int nrows = (int)min((long long)LORA_ROWS, rows - row0);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;

    if ((int)threadIdx.x < LORA_ROWS) {
        int a = -1;
        if ((int)threadIdx.x < nrows) {
            a = sample_adapter[(row0 + threadIdx.x) / rows_per_sample];
            if (a < 0 || a >= n_adapters || adapters[a].rank > LORA_MAX_RANK) a = -1;
        }
        row_adapter[threadIdx.x] = a;
    }
    __syncthreads();

    // 8-wide accesses where every row of x, y and down is 16-byte aligned (SD shapes).
    const bool vec = din % 8 == 0 && dout % 8 == 0 && ld_x % 8 == 0 && ld_y % 8 == 0 &&
                     aligned16(x) && aligned16(y);

    // Shrink: t[rr][q] = scale * sum_c x[rr, c] * down[q, c], one warp per row.
    for (int rr = warp; rr < nrows; rr += nwarps) {
        const int a = row_adapter[rr];
        if (a < 0) continue; // uniform over the warp
        const hdb_lora_factor F = adapters[a];
        const T* xr = x + (row0 + rr) * ld_x;
        if (vec && aligned16(F.down)) {
            for (int q = 0; q < F.rank; ++q) {
                const float* d = F.down + (long long)q * din;
                float s = 0.0f;
                for (int c = lane * 8; c < din; c += 32 * 8) {
                    float xv[8], dv[8];
                    load8(xr + c, xv);
                    load8(d + c, dv);
#pragma unroll
                    for (int j = 0; j < 8; ++j) s += xv[j] * dv[j];
                }
                s = warp_sum(s);
                if (lane == 0) t[rr][q] = F.scale * s;
            }
        } else {
            for (int q = 0; q < F.rank; ++q) {
                const float* d = F.down + (long long)q * din;
                float s = 0.0f;
                for (int c = lane; c < din; c += 32) s += to_f32(xr[c]) * d[c];
                s = warp_sum(s);
                if (lane == 0) t[rr][q] = F.scale * s;
            }
        }
    }
    __syncthreads();

    // Expand: y[rr, o] += sum_q t[rr][q] * up[o, q]; threads over (row, output group).
    if (vec) {
        const int nv = dout / 8;
        for (int i = threadIdx.x; i < nrows * nv; i += blockDim.x) {
            const int rr = i / nv, o = (i - rr * nv) * 8;
            const int a = row_adapter[rr];
            if (a < 0) continue;
            const hdb_lora_factor F = adapters[a];
            float acc[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
            for (int q = 0; q < F.rank; ++q) {
                const float tq = t[rr][q];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] += tq * F.up[(long long)(o + j) * F.rank + q];
            }
            T* yp = y + (row0 + rr) * ld_y + o;
            float yv[8];
            load8(yp, yv);
#pragma unroll
            for (int j = 0; j < 8; ++j) yv[j] += acc[j];
            store8(yp, yv);
        }
        return;
    }
    for (int rr = 0; rr < nrows; ++rr) {
        const int a = row_adapter[rr];
        if (a < 0) continue;
        const hdb_lora_factor F = adapters[a];
        T* yr = y + (row0 + rr) * ld_y;
        for (int o = threadIdx.x; o < dout; o += blockDim.x) {
            const float* u = F.up + (long long)o * F.rank;
            float acc = 0.0f;
            for (int q = 0; q < F.rank; ++q) acc += t[rr][q] * u[q];
            yr[o] = from_f32<T>(to_f32(yr[o]) + acc);
        }
    }
}

#define HDB_LORA_BGMV(sfx, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        lora_bgmv_##sfx(T* __restrict__ y, const T* __restrict__ x, long long rows,             \
                        long long rows_per_sample, const int* __restrict__ sample_adapter,      \
                        const hdb_lora_factor* __restrict__ adapters, int n_adapters, int din,  \
                        int dout, long long ld_x, long long ld_y) {                             \
        lora_bgmv<T>(y, x, rows, rows_per_sample, sample_adapter, adapters, n_adapters, din,    \
                     dout, ld_x, ld_y);                                                         \
    }
HDB_FOR_EACH_DTYPE(HDB_LORA_BGMV)
