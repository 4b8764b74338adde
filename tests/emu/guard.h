// guard.h: the guard bands around every emulated device allocation, shared by the kernel
// emulation's driver (driver.cpp) and the emulated GPU (gpu.cpp). Each allocation is laid out
// as [kGuard bytes of kGuardByte][the data][kGuard bytes of kGuardByte]; after a launch, a
// changed guard byte means a kernel wrote outside its buffer.
#pragma once

#include <array>
#include <cstddef>
#include <cstring>

namespace hdb_emu_guard {

constexpr std::size_t kGuard = 256;
constexpr unsigned char kGuardByte = 0x5a;

// Whether both guard bands of an allocation of `bytes` whose block starts at `base` still
// hold kGuardByte: two memcmp calls against a constant band, since checking every allocation
// after every launch byte by byte was 9% of the emulated GPU tests' time (perf). Callers look
// for the changed byte only when this is false.
inline bool intact(const unsigned char* base, std::size_t bytes) {
    static const auto band = [] {
        std::array<unsigned char, kGuard> b;
        b.fill(kGuardByte);
        return b;
    }();
    return std::memcmp(base, band.data(), kGuard) == 0 &&
           std::memcmp(base + kGuard + bytes, band.data(), kGuard) == 0;
}

} // namespace hdb_emu_guard
