// lidb.cu: LiDB identity adapters on the device: compose every layer's LoRA factors in one
// launch, and merge any number of factor pairs into the weights in one launch.
//
// Checked on an NVIDIA H100 (2026-11-26) against the CPU backend by tests/cuda_parity/
// (scripts/gpu-check.sh; figures in docs/perf.md): f64 references of compose and merge;
// an empty factor set restores the base bit for bit.
//
// ---------------------------------------------------------------------------------------------
// lidb_compose_f32(const LidbComposeLayer* layers, int n_layers, int r, int a, int b,
//                  float alpha)
//   Per layer (DESIGN.md section 4): down [r, din] = D_train [r, a] . D_aux [a, din];
//   up [dout, r] = alpha * U_aux [dout, b] . U_train [b, r]. All f32, row-major, device memory.
//   grid  = (x: any, e.g. ceil(max over layers of (r*din + dout*r) / 256), capped at 4096;
//            y: n_layers)
//   block = 256 threads, no shared memory. blockIdx.y picks the layer; the x blocks
//   grid-stride over its r*din + dout*r outputs, one output per thread-iteration.
//   LidbComposeLayer (host mirror: #[repr(C)], 6 x u64 pointers then din: i64, dout: i64;
//   64 bytes) is an array in device memory. The basis (D_aux, U_aux) comes from the model's
//   basis cache, uploaded once per model; D_train/U_train from the adapter file.
//   Napkin math, SD 1.5 UNet (128 layers, r = 1, a = 100, b = 50, din/dout 320..1280):
//   reads the basis once (sum of a*din + b*dout = 15 M f32 = 60 MB; the train matrices are
//   KBs and stay in L1/L2), writes ~0.2 M f32. Bound: HBM read of the basis, ~18 us at
//   3.35 TB/s on an H100 SXM; FLOPs (2 * 15 M) are nothing.
//
// lidb_merge_{f32,f16,bf16}(const MergeLayer* layers, int n_layers,
//                           const hdb_lora_factor* factors)
//   Per layer: W [dout, din] = W_base + sum_f scale_f * up_f [dout, r_f] . down_f [r_f, din],
//   computed from the pristine base (W_base is never written), f32 accumulation, one
//   rounding to the weight dtype. A layer with no factors is copied bit for bit (so an empty
//   adapter set restores the base exactly). The layer's factors are
//   factors[first_factor .. first_factor + n_factors] (hdb_lora_factor, common.cuh), and
//   the sum of their ranks must be <= MERGE_MAX_RANK (256): the host checks.
//   MergeLayer (host mirror: #[repr(C)] { w_base: u64, w: u64, dout: i64, din: i64,
//   first_factor: i32, n_factors: i32 }, 40 bytes) is an array in device memory; w_base and w
//   point to the weight dtype of the kernel's name and may not overlap.
//   grid  = (x: ceil(max_dout / MERGE_ROWS), y: n_layers); blocks past a layer's dout exit.
//   block = 256 threads; static shared memory MERGE_ROWS * MERGE_MAX_RANK * 4 = 32 KB of
//   coefficients (scale * up rows), MERGE_ROWS = 32. The block's threads stride over
//   (row, 8-column group) items: each item reads 8 weights (16 bytes in f16/bf16), the
//   factors' 8 down values per rank (L1/L2: r * din * 4 bytes per layer), and writes 8
//   weights. A layer whose din is not a multiple of 8 or whose pointers are not 16-byte
//   aligned takes a scalar path (same result).
//   Napkin math, SD 1.5 UNet, all 128 adapted projections in fp16 (93.5 M weights): one
//   read of W_base and one write of W = 2 x 187 MB = 374 MB -> ~112 us at 3.35 TB/s, the bound
//   (the issue's target: >= 80 % of a device-to-device copy of the same bytes). FLOPs:
//   2 * r per weight. The first version (8 rows a block, 2-byte accesses, threads over
//   columns only) ran at 45 % of the copy on an H100: din = 320 left most threads idle.
// ---------------------------------------------------------------------------------------------

#include "common.cuh"

#define MERGE_ROWS 32
#define MERGE_MAX_RANK 256

struct LidbComposeLayer {
    const float* d_train; // [r, a]
    const float* u_train; // [b, r]
    const float* d_aux;   // [a, din]
    const float* u_aux;   // [dout, b]
    float* down;          // [r, din], written
    float* up;            // [dout, r], written
    long long din;
    long long dout;
};

extern "C" __global__ void __launch_bounds__(256)
lidb_compose_f32(const LidbComposeLayer* __restrict__ layers, int n_layers, int r, int a, int b,
                 float alpha) {
    if ((int)blockIdx.y >= n_layers) return;
    const LidbComposeLayer L = layers[blockIdx.y];
    const long long n_down = (long long)r * L.din;
    const long long total = n_down + L.dout * r;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        if (e < n_down) {
            // down[i, c] = sum_j D_train[i, j] * D_aux[j, c]; adjacent threads read adjacent c.
            const long long i = e / L.din, c = e - i * L.din;
            float acc = 0.0f;
            for (int j = 0; j < a; ++j) acc += L.d_train[i * a + j] * L.d_aux[j * L.din + c];
            L.down[e] = acc;
        } else {
            // up[o, i] = alpha * sum_j U_aux[o, j] * U_train[j, i].
            const long long e2 = e - n_down;
            const long long o = e2 / r, i = e2 - o * r;
            float acc = 0.0f;
            for (int j = 0; j < b; ++j) acc += L.u_aux[o * b + j] * L.u_train[(long long)j * r + i];
            L.up[e2] = alpha * acc;
        }
    }
}

struct MergeLayer {
    const void* w_base; // [dout, din], the kernel's dtype
    void* w;            // [dout, din], the kernel's dtype, written
    long long dout;
    long long din;
    int first_factor;
    int n_factors;
};

template <typename T>
__device__ __forceinline__ void lidb_merge(const MergeLayer* __restrict__ layers, int n_layers,
                                           const hdb_lora_factor* __restrict__ factors) {
    __shared__ float coef[MERGE_ROWS][MERGE_MAX_RANK];
    if ((int)blockIdx.y >= n_layers) return;
    const MergeLayer L = layers[blockIdx.y];
    const long long row0 = (long long)blockIdx.x * MERGE_ROWS;
    if (row0 >= L.dout) return; // uniform over the block: before any barrier
    const int nrows = (int)min((long long)MERGE_ROWS, L.dout - row0);
    const T* base = (const T*)L.w_base + row0 * L.din;
    T* w = (T*)L.w + row0 * L.din;

    // coef[rr][q_total] = scale_f * up_f[row0 + rr, q] for every factor f, ranks concatenated.
    // The 8-wide path needs din % 8 == 0 and 16-byte aligned rows of W and of every down.
    int total_rank = 0;
    bool vec = L.din % 8 == 0 && aligned16(L.w_base) && aligned16(L.w);
    for (int f = 0; f < L.n_factors; ++f) {
        const hdb_lora_factor F = factors[L.first_factor + f];
        vec = vec && aligned16(F.down);
        for (int k = threadIdx.x; k < nrows * F.rank; k += blockDim.x) {
            const int rr = k / F.rank, q = k - rr * F.rank;
            if (total_rank + q < MERGE_MAX_RANK)
                coef[rr][total_rank + q] = F.scale * F.up[(row0 + rr) * F.rank + q];
        }
        total_rank += F.rank;
    }
    __syncthreads();
    const bool none = total_rank == 0 || total_rank > MERGE_MAX_RANK;

    if (vec) {
        // An over-long factor list is refused by the host; copying keeps the kernel from
        // reading past coef. No factors: an exact copy (also keeps -0.0 and NaN payloads).
        const long long nv = L.din / 8, items = nrows * nv;
        for (long long i = threadIdx.x; i < items; i += blockDim.x) {
            const int rr = (int)(i / nv);
            const long long c = (i - rr * nv) * 8;
            const long long off = rr * L.din + c;
            if (none) {
                copy8(w + off, base + off);
                continue;
            }
            float acc[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
            int qo = 0;
            for (int f = 0; f < L.n_factors; ++f) {
                const hdb_lora_factor F = factors[L.first_factor + f];
                for (int q = 0; q < F.rank; ++q) {
                    float d[8];
                    load8(F.down + q * L.din + c, d);
                    const float cf = coef[rr][qo + q];
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[j] += cf * d[j];
                }
                qo += F.rank;
            }
            float b[8];
            load8(base + off, b);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += b[j]; // base + delta: the scalar path's order
            store8(w + off, acc);
        }
        return;
    }
    for (long long i = threadIdx.x; i < nrows * L.din; i += blockDim.x) {
        const int rr = (int)(i / L.din);
        const long long c = i - rr * L.din;
        const long long off = rr * L.din + c;
        if (none) {
            w[off] = base[off];
            continue;
        }
        float acc = 0.0f;
        int qo = 0;
        for (int f = 0; f < L.n_factors; ++f) {
            const hdb_lora_factor F = factors[L.first_factor + f];
            for (int q = 0; q < F.rank; ++q) acc += coef[rr][qo + q] * F.down[q * L.din + c];
            qo += F.rank;
        }
        w[off] = from_f32<T>(to_f32(base[off]) + acc);
    }
}

#define HDB_LIDB_MERGE(sfx, T)                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                        \
        lidb_merge_##sfx(const MergeLayer* __restrict__ layers, int n_layers,                \
                         const hdb_lora_factor* __restrict__ factors) {                      \
        lidb_merge<T>(layers, n_layers, factors);                                            \
    }
HDB_FOR_EACH_DTYPE(HDB_LIDB_MERGE)
