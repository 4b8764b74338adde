// selftest.cuh: kernels that break CUDA's rules on purpose, built into the driver only with
// -DHDB_EMU_SELFTEST (tests/kernel_emulation/selftest.rs), to show that each of cuda_emu.h's and
// driver.cpp's checks fails such a kernel. One thread block of 32 threads each; `out` holds 32
// floats.
#pragma once

// Thread 0 writes the byte at `offset` of the dynamic shared memory, which the launch sizes.
extern "C" __global__ void selftest_smem_write(float* out, int offset) {
    extern __shared__ __align__(16) unsigned short smem[];
    if (threadIdx.x == 0) ((unsigned char*)smem)[offset] = 1;
    out[threadIdx.x] = 0.0f;
}

// Thread i writes out[i + shift]: past the buffer for shift > 0.
extern "C" __global__ void selftest_global_write(float* out, int shift) {
    out[threadIdx.x + shift] = 1.0f;
}

// Reads another thread's shared value without a barrier: a race the two schedules expose.
extern "C" __global__ void selftest_race(float* out) {
    __shared__ float s[32];
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[31 - threadIdx.x];
}

// The same with the barrier: race-free.
extern "C" __global__ void selftest_no_race(float* out) {
    __shared__ float s[32];
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[31 - threadIdx.x];
}

// A full-mask shuffle after lane 0 returned: undefined on a GPU.
extern "C" __global__ void selftest_shuffle_after_exit(float* out) {
    if (threadIdx.x == 0) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
}

#define HDB_EMU_SELFTEST_KERNELS                                                                   \
    HDB_EMU_KERNEL(selftest_smem_write)                                                            \
    HDB_EMU_KERNEL(selftest_global_write)                                                          \
    HDB_EMU_KERNEL(selftest_race)                                                                  \
    HDB_EMU_KERNEL(selftest_no_race)                                                               \
    HDB_EMU_KERNEL(selftest_shuffle_after_exit)
