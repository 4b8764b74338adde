// conv.cu: what the convolutions and the layout changes around the GEMMs need: im2col for
// conv2d through cuBLAS (im2col + GEMM), a tiled batched transpose (NCHW <-> NHWC for the
// transformer blocks), a per-channel bias over NCHW, and the VAE encoder's bottom-right
// zero padding.
//
// Checked against the CPU backend (backend::cpu::conv2d, nchw_to_nhwc, ...) by
// tests/cuda_parity/ and tests/cuda_backend.rs on an H100 (pad_bottom_right_* since 2026-11-26,
// session 6), and on the host by tests/kernel_emulation/.
//
// ---------------------------------------------------------------------------------------------
// im2col_{f32,f16,bf16}(T* cols, const T* x, int c, int h, int w, int k, int stride, int pad,
//                       int oh, int ow)
//   One sample x [c, h, w] -> cols [c * k * k, oh * ow] (row (ci, ky, kx), column (oy, ox)),
//   zero outside the image: then y [c_out, oh*ow] = W [c_out, c*k*k] . cols is one GEMM.
//   Launch contract: block = 256, grid = min(ceil(n / 256), 65536) for n = c*k*k*oh*ow,
//   grid-stride. Adjacent threads write adjacent columns (coalesced writes; reads of x are
//   contiguous along ox for stride 1).
//   Napkin math, SD 1.5 3x3 conv at 64x64, 320 channels, fp16, one sample: cols = 2880 x 4096
//   x 2 B = 23.6 MB written, 2.6 MB read (L2) -> ~8 us at 3.35 TB/s; the GEMM that follows
//   does 2 * 320 * 2880 * 4096 = 7.5 GFLOP -> ~10 us at 750 TFLOP/s. im2col's traffic is the
//   price of using cuBLAS; kernels/conv_igemm.cu avoids it, and the backend takes it wherever
//   it measured faster (up to 512 output channels: `ops::conv2d_prefers_implicit`,
//   docs/perf.md), so im2col now serves the 640- and 1280-channel convolutions.
//
// col2im_{f32,f16,bf16}(T* x, const float* cols, int c, int h, int w, int k, int stride,
//                       int pad, int oh, int ow)
//   conv2d's input gradient after its column GEMM: cols [c * k * k, oh * ow] (f32, im2col's
//   layout: the column gradient W^T dy of one sample, or of c of its channels) -> x [c, h, w],
//   each input element the f32 sum of the columns that read it (the rows (ci, ky, kx) with
//   iy + pad - ky = oy * stride and ix + pad - kx = ox * stride inside the output), in
//   (ky, kx) order as the CPU backend's col2im; 0 where no output reads it. A gather, so no
//   atomics and one rounding to T per element. Elementwise contract over n = c * h * w.
//   Napkin math, SD 1.5 3x3 conv at 64x64, 320 channels, one sample: cols 2880 x 4096 x 4 B =
//   47 MB read (each element once; reads along ox are contiguous for stride 1) + 2.6 MB
//   written (fp16) -> ~15 us at 3.35 TB/s, beside the 7.5 GFLOP column GEMM (~10 us).
//
// transpose_{f32,f16,bf16}(T* y, const T* x, long long batch, int rows, int cols)
//   y [batch, cols, rows] = x [batch, rows, cols] transposed per batch. NCHW -> NHWC is
//   rows = C, cols = HW; back is rows = HW, cols = C.
//   grid = (ceil(cols / 32), ceil(rows / 32), batch); block = (32, 8); a 32 x 33 f32 tile of
//   shared memory (the extra column avoids bank conflicts). Reads and writes coalesced.
//
// add_bias_channels_{f32,f16,bf16}(T* y, const T* bias, long long batch, int channels,
//                                  long long hw)
//   y [batch, channels, hw] += bias [channels] (a convolution's bias). Elementwise contract.
//
// pad_bottom_right_{f32,f16,bf16}(T* y, const T* x, long long planes, int h, int w)
//   x [planes, h, w] -> y [planes, h + 1, w + 1]: x in the top-left h x w of each plane, zeros
//   in the last row and the last column (diffusers' VAE Downsample2D pads (0, 1, 0, 1) before
//   its stride-2 3x3 conv). y may not overlap x. Elementwise contract over the n = planes *
//   (h + 1) * (w + 1) outputs, every output written.
//   Napkin math, the VAE encoder's first downsampler (512x512, 128 channels, batch 1, fp16):
//   67 MB in + 67 MB out -> ~40 us at 3.35 TB/s (im2col with asymmetric padding would skip
//   the copy: TODO(perf)).
// ---------------------------------------------------------------------------------------------

#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);       \
         i += (long long)gridDim.x * blockDim.x)

template <typename T>
__device__ __forceinline__ void im2col(T* __restrict__ cols, const T* __restrict__ x, int c, int h,
                                       int w, int k, int stride, int pad, int oh, int ow) {
    const long long p = (long long)oh * ow;
    const long long n = (long long)c * k * k * p;
    GRID_STRIDE(i, n) {
        const long long row = i / p, col = i - row * p;
        const int ci = (int)(row / (k * k));
        const int kk = (int)(row - (long long)ci * k * k);
        const int ky = kk / k, kx = kk - ky * k;
        const int oy = (int)(col / ow), ox = (int)(col - (long long)oy * ow);
        const int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        T v = from_f32<T>(0.0f);
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = x[((long long)ci * h + iy) * w + ix];
        cols[i] = v;
    }
}

template <typename T>
__device__ __forceinline__ void col2im(T* __restrict__ x, const float* __restrict__ cols, int c,
                                       int h, int w, int k, int stride, int pad, int oh, int ow) {
    const long long p = (long long)oh * ow;
    const long long n = (long long)c * h * w;
    GRID_STRIDE(i, n) {
        const long long ci = i / ((long long)h * w);
        const int rem = (int)(i - ci * h * w);
        const int iy = rem / w, ix = rem - iy * w;
        float acc = 0.0f;
        for (int ky = 0; ky < k; ++ky) {
            const int ty = iy + pad - ky;
            if (ty < 0 || ty % stride != 0 || ty / stride >= oh) continue;
            const int oy = ty / stride;
            for (int kx = 0; kx < k; ++kx) {
                const int tx = ix + pad - kx;
                if (tx < 0 || tx % stride != 0 || tx / stride >= ow) continue;
                const long long row = (ci * k + ky) * k + kx;
                acc += cols[row * p + (long long)oy * ow + tx / stride];
            }
        }
        x[i] = from_f32<T>(acc);
    }
}

template <typename T>
__device__ __forceinline__ void transpose(T* __restrict__ y, const T* __restrict__ x, int rows,
                                          int cols) {
    __shared__ float tile[32][33];
    const long long b = blockIdx.z;
    const T* xb = x + b * rows * cols;
    T* yb = y + b * rows * cols;
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int j = threadIdx.y; j < 32; j += 8) {
        const int r = r0 + j, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[j][threadIdx.x] = to_f32(xb[(long long)r * cols + c]);
    }
    __syncthreads();
    for (int j = threadIdx.y; j < 32; j += 8) {
        const int c = c0 + j, r = r0 + threadIdx.x;
        if (r < rows && c < cols) yb[(long long)c * rows + r] = from_f32<T>(tile[threadIdx.x][j]);
    }
}

template <typename T>
__device__ __forceinline__ void add_bias_channels(T* __restrict__ y, const T* __restrict__ bias,
                                                  long long batch, int channels, long long hw) {
    const long long n = batch * channels * hw;
    GRID_STRIDE(i, n) {
        const int ch = (int)((i / hw) % channels);
        y[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[ch]));
    }
}

template <typename T>
__device__ __forceinline__ void pad_bottom_right(T* __restrict__ y, const T* __restrict__ x,
                                                 long long planes, int h, int w) {
    const long long pw = (long long)w + 1, plane_out = ((long long)h + 1) * pw;
    GRID_STRIDE(e, planes * plane_out) {
        const long long p = e / plane_out;
        const long long rem = e - p * plane_out;
        const long long i = rem / pw, j = rem - i * pw;
        y[e] = (i < h && j < w) ? x[(p * h + i) * w + j] : from_f32<T>(0.0f);
    }
}

#define HDB_CONV_KERNELS(sfx, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        im2col_##sfx(T* cols, const T* x, int c, int h, int w, int k, int stride, int pad,      \
                     int oh, int ow) {                                                          \
        im2col<T>(cols, x, c, h, w, k, stride, pad, oh, ow);                                    \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        col2im_##sfx(T* x, const float* cols, int c, int h, int w, int k, int stride, int pad,  \
                     int oh, int ow) {                                                          \
        col2im<T>(x, cols, c, h, w, k, stride, pad, oh, ow);                                    \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        transpose_##sfx(T* y, const T* x, long long batch, int rows, int cols) {                \
        (void)batch;                                                                             \
        transpose<T>(y, x, rows, cols);                                                          \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        add_bias_channels_##sfx(T* y, const T* bias, long long batch, int channels,             \
                                long long hw) {                                                  \
        add_bias_channels<T>(y, bias, batch, channels, hw);                                      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        pad_bottom_right_##sfx(T* y, const T* x, long long planes, int h, int w) {              \
        pad_bottom_right<T>(y, x, planes, h, w);                                                 \
    }
HDB_FOR_EACH_DTYPE(HDB_CONV_KERNELS)
