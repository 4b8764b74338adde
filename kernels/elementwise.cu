// elementwise.cu: the small ops around the GEMMs: GEGLU, SiLU, GELU, quick GELU, row softmax,
// the timestep embedding, nearest 2x upsampling, and additions (tensor + tensor, per-channel
// and per-column bias).
//
// Checked on an NVIDIA H100 (2026-11-26) against the CPU backend by tests/cuda_parity/
// (scripts/gpu-check.sh; figures in docs/perf.md): backend::cpu::geglu, silu_inplace,
// softmax_rows, timestep_embedding, upsample_nearest2x, add_inplace, add_channel_bias.
// gelu_* and quick_gelu_* have not run on a GPU yet: tests/cuda_backend.rs checks them
// against the CPU backend's activations through the Backend trait (and, without a GPU,
// tests/kernel_emulation/ on the host).
//
// Launch contract, unless a kernel says otherwise: block = 256 threads, no shared memory,
// grid = min(ceil(n / 256), 65536) for n outputs; every kernel grid-strides, so any grid
// size is correct. Tensors are contiguous, row-major; f32 math, one rounding per output.
// All of these are bandwidth-bound: the bound is bytes / 3.35 TB/s (H100 SXM HBM3); at
// SD 1.5 sizes (a few MB) launch latency (~3-5 us) dominates, so fusing them into
// neighbours is the real win: GEGLU is one kernel here, and group norm carries its SiLU
// (norm.cu); the others are still launches of their own.
//
// geglu_{f32,f16,bf16}(T* y, const T* x, long long rows, int d)
//   x [rows, 2d] -> y [rows, d] = x[:, :d] * gelu(x[:, d:]), exact (erf) GELU: diffusers'
//   GEGLU after its projection. y may not overlap x.
//   Napkin math, SD 1.5 64x64 batch 2 (rows 8192, d = 1280, fp16): 42 MB in + 21 MB out
//   = 63 MB -> ~19 us.
// silu_{f32,f16,bf16}(T* y, const T* x, long long n)
//   y = x * sigmoid(x); y may equal x. n elements.
// gelu_{f32,f16,bf16}(T* y, const T* x, long long n)
//   y = x/2 * (1 + erf(x / sqrt 2)), exact (erf) GELU as the CPU backend's gelu_inplace (the
//   Backend trait's Activation::Gelu); y may equal x. n elements.
// quick_gelu_{f32,f16,bf16}(T* y, const T* x, long long n)
//   y = x * sigmoid(1.702 x) (OpenAI CLIP's quick GELU, the SD 1.x text encoder's MLP);
//   y may equal x. n elements.
//   Napkin math (silu, gelu, quick_gelu): 2 B read + 2 B written an element in f16; CLIP's
//   MLP at batch 2 (154 tokens x 3072) is 0.5 M elements = 1.9 MB -> ~1 us of bandwidth,
//   launch latency dominates; a 64x64 x 1280 x 2 SiLU (10.5 M elements, 42 MB) ~13 us.
// softmax_rows_{f32,f16,bf16}(T* y, const T* x, long long rows, int n)
//   Softmax over the last dim of x [rows, n] (max-subtracted, as torch); y may equal x.
//   grid = ceil(rows / 8); block = 256 threads = 8 warps, one row per warp; three sweeps over
//   the row (max, sum, write), the second and third from L1.
// softmax_rows_from_f32_{f32,f16,bf16}(T* y, const float* x, long long rows, int n)
//   The same over f32 scores, written as T (the materialised attention's probabilities: its
//   scores stay f32 so they are not rounded before the softmax). y may not overlap x unless
//   T is f32 and y == x. Checked on an H100 (2026-11-26, session 6) through the materialised
//   attention by tests/cuda_backend.rs and tests/cuda_parity/; tests/kernel_emulation/ runs it
//   on the host.
// timestep_embedding_{f32,f16,bf16}(T* y, const float* t, int n, int dim, int flip_sin_to_cos,
//                                   float downscale_freq_shift, float max_period)
//   diffusers' get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift, scale=1,
//   max_period): y [n, dim] for timesteps t [n] (f32). half = dim / 2; freq_i =
//   exp(-ln(max_period) * i / (half - shift)); row = [sin(t freq), cos(t freq)], or
//   [cos, sin] when flip_sin_to_cos (SD 1.5: flip = 1, shift = 0); an odd dim's last column is
//   0. The f32 steps are the CPU backend's (torch's): the exponent is an f32 product and
//   quotient, exp, sin and cos are evaluated in f64 and rounded once, so the result matches
//   the CPU backend's to the last bit where f64 sin/cos round the same way.
//   n * dim outputs (a few KB): latency only.
// upsample_nearest2x_{f32,f16,bf16}(T* y, const T* x, long long planes, int h, int w)
//   x [planes, h, w] -> y [planes, 2h, 2w], each pixel a 2x2 block. n = planes * 4hw outputs.
//   Napkin math, SD 1.5 up block at 32x32 -> 64x64, 1280 ch, batch 2, fp16: 5.2 MB in +
//   21 MB out -> ~8 us.
// add_{f32,f16,bf16}(T* y, const T* a, const T* b, long long n)
//   y = a + b, element-wise (y may equal a or b): residual connections.
// add_channel_bias_{f32,f16,bf16}(T* y, const T* v, long long batch, int channels,
//                                 long long hw)
//   y [batch, channels, hw] += v [batch, channels] broadcast over hw (the resnet's time
//   embedding added to its hidden state).
// add_bias_rows_{f32,f16,bf16}(T* y, const T* bias, long long rows, int n)
//   y [rows, n] += bias [n] (a linear layer's bias where the GEMM did not add it).
//
// Backward (training adapters: input gradients), f32 math, one rounding per output:
// silu_backward_{f32,f16,bf16}(T* dx, const T* x, const T* dy, long long n)
//   dx = dy silu'(x) = dy s (1 + x (1 - s)), s = sigmoid(x); x is the forward's input.
// gelu_backward_{f32,f16,bf16}(T* dx, const T* x, const T* dy, long long n)
//   dx = dy (Phi(x) + x phi(x)), exact GELU's derivative (Phi through erfc, as gelu).
// quick_gelu_backward_{f32,f16,bf16}(T* dx, const T* x, const T* dy, long long n)
//   dx = dy (s + 1.702 x s (1 - s)), s = sigmoid(1.702 x).
//   dx may equal dy (each element is read, then written, by one thread), not x. n elements.
//   Napkin math: 3 x 2 B an element in f16; the UNet's largest SiLU gradient (64x64 x 320 x
//   batch 1, 1.3 M elements) is 7.9 MB -> ~2.4 us.
// geglu_backward_{f32,f16,bf16}(T* dx, const T* x, const T* dy, long long rows, int d)
//   x [rows, 2d] = [a, g] the forward's input, dy [rows, d] -> dx [rows, 2d] =
//   [dy gelu(g), dy a gelu'(g)]. One thread per (row, j) writes dx[r, j] and dx[r, d + j];
//   n = rows * d threads' worth of work. dx may not overlap x or dy.
//   Napkin math, SD 1.5 64x64 batch 1 (rows 4096, d = 1280, fp16): 21 MB x + 10.5 MB dy in,
//   21 MB out -> ~16 us.
// upsample_nearest2x_backward_{f32,f16,bf16}(T* dx, const T* dy, long long planes, int h, int w)
//   dy [planes, 2h, 2w] -> dx [planes, h, w], each the f32 sum of its 2x2 block of dy.
//   n = planes * h * w outputs. dx may not overlap dy.
//   Napkin math, SD 1.5 up block 32x32 -> 64x64, 1280 ch, batch 1, fp16: 10.5 MB in + 2.6 MB
//   out -> ~4 us.
// cast_from_f32_{f32,f16,bf16}(T* y, const float* x, long long n)
//   y = x rounded to T (the attention backward's f32 accumulators of dk and dv). y may not
//   overlap x unless T is f32 and y == x. n elements; 6 B an element in f16.
// ---------------------------------------------------------------------------------------------

#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);       \
         i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float gelu_erf(float g) {
    return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
}

template <typename T>
__device__ __forceinline__ void geglu(T* __restrict__ y, const T* __restrict__ x, long long rows,
                                      int d) {
    GRID_STRIDE(i, rows * d) {
        const long long r = i / d, j = i - r * d;
        const T* xr = x + r * 2 * d;
        y[i] = from_f32<T>(to_f32(xr[j]) * gelu_erf(to_f32(xr[d + j])));
    }
}

template <typename T> __device__ __forceinline__ void silu(T* y, const T* x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = to_f32(x[i]);
        y[i] = from_f32<T>(v / (1.0f + expf(-v)));
    }
}

// x/2 * erfc(-x / sqrt 2) = x/2 * (1 + erf(x / sqrt 2)), without the cancellation of 1 + erf
// in the negative tail (the CPU backend's gelu also goes through erfc).
template <typename T> __device__ __forceinline__ void gelu(T* y, const T* x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = to_f32(x[i]);
        y[i] = from_f32<T>(0.5f * v * erfcf(-v * 0.70710678118654752f));
    }
}

template <typename T> __device__ __forceinline__ void quick_gelu(T* y, const T* x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = to_f32(x[i]);
        y[i] = from_f32<T>(v / (1.0f + expf(-1.702f * v)));
    }
}

template <typename T, typename In>
__device__ __forceinline__ void softmax_rows(T* y, const In* x, long long rows, int n) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows || n <= 0) return; // whole warps leave: only warp-level sync below
    const In* xr = x + row * n;
    T* yr = y + row * n;
    float m = HDB_NEG_INF;
    for (int c = lane; c < n; c += 32) m = fmaxf(m, to_f32(xr[c]));
    m = warp_max(m);
    float s = 0.0f;
    for (int c = lane; c < n; c += 32) s += expf(to_f32(xr[c]) - m);
    const float inv = 1.0f / warp_sum(s);
    // In place is safe: element c is only ever read and written by lane c % 32.
    for (int c = lane; c < n; c += 32) yr[c] = from_f32<T>(expf(to_f32(xr[c]) - m) * inv);
}

template <typename T>
__device__ __forceinline__ void timestep_embedding(T* __restrict__ y, const float* __restrict__ t,
                                                   int n, int dim, int flip, float shift,
                                                   float max_period) {
    const int half = dim / 2;
    const float neg_log = (float)(-log((double)max_period));
    const float denom = (float)((double)half - (double)shift);
    GRID_STRIDE(e, (long long)n * dim) {
        const long long r = e / dim;
        const int c = (int)(e - r * dim);
        float out = 0.0f; // an odd dim's padding column
        if (c < 2 * half) {
            const int i = c < half ? c : c - half;
            const float freq = (float)exp((double)((neg_log * (float)i) / denom));
            const double arg = (double)(t[r] * freq);
            const bool first = c < half;
            // first half: sin, or cos when flipped; second half the other one.
            out = (first != (flip != 0)) ? (float)sin(arg) : (float)cos(arg);
        }
        y[e] = from_f32<T>(out);
    }
}

template <typename T>
__device__ __forceinline__ void upsample_nearest2x(T* __restrict__ y, const T* __restrict__ x,
                                                   long long planes, int h, int w) {
    const long long ow = 2LL * w, plane_out = 4LL * h * w;
    GRID_STRIDE(e, planes * plane_out) {
        const long long p = e / plane_out;
        const long long rem = e - p * plane_out;
        const long long i = rem / ow, j = rem - i * ow;
        y[e] = x[(p * h + i / 2) * w + j / 2];
    }
}

template <typename T> __device__ __forceinline__ void add(T* y, const T* a, const T* b, long long n) {
    GRID_STRIDE(i, n) y[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename T>
__device__ __forceinline__ void add_channel_bias(T* y, const T* __restrict__ v, long long batch,
                                                 int channels, long long hw) {
    GRID_STRIDE(i, batch * channels * hw) {
        const long long bc = i / hw; // = b * channels + c
        y[i] = from_f32<T>(to_f32(y[i]) + to_f32(v[bc]));
    }
}

template <typename T>
__device__ __forceinline__ void add_bias_rows(T* y, const T* __restrict__ bias, long long rows,
                                              int n) {
    GRID_STRIDE(i, rows * n) y[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[i % n]));
}

#define HDB_ELEMENTWISE(sfx, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        geglu_##sfx(T* __restrict__ y, const T* __restrict__ x, long long rows, int d) {       \
        geglu<T>(y, x, rows, d);                                                               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) silu_##sfx(T* y, const T* x, long long n) { \
        silu<T>(y, x, n);                                                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) gelu_##sfx(T* y, const T* x, long long n) { \
        gelu<T>(y, x, n);                                                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        quick_gelu_##sfx(T* y, const T* x, long long n) {                                      \
        quick_gelu<T>(y, x, n);                                                                \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        softmax_rows_##sfx(T* y, const T* x, long long rows, int n) {                          \
        softmax_rows<T, T>(y, x, rows, n);                                                     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        softmax_rows_from_f32_##sfx(T* y, const float* x, long long rows, int n) {             \
        softmax_rows<T, float>(y, x, rows, n);                                                 \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        timestep_embedding_##sfx(T* __restrict__ y, const float* __restrict__ t, int n,        \
                                 int dim, int flip_sin_to_cos, float downscale_freq_shift,     \
                                 float max_period) {                                           \
        timestep_embedding<T>(y, t, n, dim, flip_sin_to_cos, downscale_freq_shift,             \
                              max_period);                                                     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        upsample_nearest2x_##sfx(T* __restrict__ y, const T* __restrict__ x, long long planes, \
                                 int h, int w) {                                               \
        upsample_nearest2x<T>(y, x, planes, h, w);                                             \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        add_##sfx(T* y, const T* a, const T* b, long long n) {                                 \
        add<T>(y, a, b, n);                                                                    \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        add_channel_bias_##sfx(T* y, const T* __restrict__ v, long long batch, int channels,   \
                               long long hw) {                                                 \
        add_channel_bias<T>(y, v, batch, channels, hw);                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        add_bias_rows_##sfx(T* y, const T* __restrict__ bias, long long rows, int n) {         \
        add_bias_rows<T>(y, bias, rows, n);                                                    \
    }
HDB_FOR_EACH_DTYPE(HDB_ELEMENTWISE)

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float sigmoid_f32(float v) { return 1.0f / (1.0f + expf(-v)); }

// Exact GELU's derivative: Phi(g) + g phi(g), Phi through erfc (no cancellation in the
// negative tail).
__device__ __forceinline__ float gelu_grad(float g) {
    const float cdf = 0.5f * erfcf(-g * 0.70710678118654752f);
    const float pdf = expf(-0.5f * g * g) * 0.39894228040143268f;
    return cdf + g * pdf;
}

template <typename T>
__device__ __forceinline__ void silu_backward(T* dx, const T* __restrict__ x, const T* dy,
                                              long long n) {
    GRID_STRIDE(i, n) {
        const float v = to_f32(x[i]), s = sigmoid_f32(v);
        dx[i] = from_f32<T>(to_f32(dy[i]) * (s * (1.0f + v * (1.0f - s))));
    }
}

template <typename T>
__device__ __forceinline__ void gelu_backward(T* dx, const T* __restrict__ x, const T* dy,
                                              long long n) {
    GRID_STRIDE(i, n) dx[i] = from_f32<T>(to_f32(dy[i]) * gelu_grad(to_f32(x[i])));
}

template <typename T>
__device__ __forceinline__ void quick_gelu_backward(T* dx, const T* __restrict__ x, const T* dy,
                                                    long long n) {
    GRID_STRIDE(i, n) {
        const float v = to_f32(x[i]), s = sigmoid_f32(1.702f * v);
        dx[i] = from_f32<T>(to_f32(dy[i]) * (s + 1.702f * v * s * (1.0f - s)));
    }
}

template <typename T>
__device__ __forceinline__ void geglu_backward(T* __restrict__ dx, const T* __restrict__ x,
                                               const T* __restrict__ dy, long long rows, int d) {
    GRID_STRIDE(i, rows * d) {
        const long long r = i / d, j = i - r * d;
        const T* xr = x + r * 2 * d;
        T* dxr = dx + r * 2 * d;
        const float a = to_f32(xr[j]), g = to_f32(xr[d + j]), gy = to_f32(dy[i]);
        dxr[j] = from_f32<T>(gy * (0.5f * g * erfcf(-g * 0.70710678118654752f)));
        dxr[d + j] = from_f32<T>(gy * a * gelu_grad(g));
    }
}

template <typename T>
__device__ __forceinline__ void upsample_nearest2x_backward(T* __restrict__ dx,
                                                            const T* __restrict__ dy,
                                                            long long planes, int h, int w) {
    const long long plane = (long long)h * w;
    GRID_STRIDE(e, planes * plane) {
        const long long p = e / plane;
        const long long rem = e - p * plane;
        const long long i = rem / w, j = rem - i * w;
        const T* top = dy + (p * 2 * h + 2 * i) * 2 * w + 2 * j;
        const T* bottom = top + 2 * w;
        dx[e] = from_f32<T>(to_f32(top[0]) + to_f32(top[1]) + to_f32(bottom[0]) +
                            to_f32(bottom[1]));
    }
}

template <typename T>
__device__ __forceinline__ void cast_from_f32(T* y, const float* x, long long n) {
    GRID_STRIDE(i, n) y[i] = from_f32<T>(x[i]);
}

#define HDB_ELEMENTWISE_BACKWARD(sfx, T)                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        silu_backward_##sfx(T* dx, const T* x, const T* dy, long long n) {                     \
        silu_backward<T>(dx, x, dy, n);                                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        gelu_backward_##sfx(T* dx, const T* x, const T* dy, long long n) {                     \
        gelu_backward<T>(dx, x, dy, n);                                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        quick_gelu_backward_##sfx(T* dx, const T* x, const T* dy, long long n) {               \
        quick_gelu_backward<T>(dx, x, dy, n);                                                  \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        geglu_backward_##sfx(T* dx, const T* x, const T* dy, long long rows, int d) {          \
        geglu_backward<T>(dx, x, dy, rows, d);                                                 \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) upsample_nearest2x_backward_##sfx(       \
        T* dx, const T* dy, long long planes, int h, int w) {                                  \
        upsample_nearest2x_backward<T>(dx, dy, planes, h, w);                                  \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        cast_from_f32_##sfx(T* y, const float* x, long long n) {                               \
        cast_from_f32<T>(y, x, n);                                                             \
    }
HDB_FOR_EACH_DTYPE(HDB_ELEMENTWISE_BACKWARD)
