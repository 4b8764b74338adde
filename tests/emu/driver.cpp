// driver.cpp: runs hdb's CUDA kernels on the host under cuda_emu.h, for
// tests/backend_ops/ (its emu:: tests). Built with
//
//   c++ -O2 -std=c++20 -fno-extern-tls-init -DHDB_EMULATE -I kernels -I tests/emu -I <dir of hdb_emu_kernels.inc>
//       tests/emu/driver.cpp -o driver
//
// where hdb_emu_kernels.inc (written by the test from backend::cuda::KERNEL_FILES) includes
// every kernel file and lists every kernel as HDB_EMU_KERNEL(name).
//
// The job comes on stdin, one command a line, executed in order:
//   buffer <id> <bytes> <path>|fill   a device buffer: the file's bytes, or 0xFF (NaN) bytes
//   launch <kernel> <gx> <gy> <gz> <bx> <by> <bz> <smem> <nargs> <arg>...
//          each arg `<kind>:<value>`: u64:<hex> (an address, below), i32:<dec>, i64:<dec>,
//          f32:<hex bits>; the kinds must match the kernel's parameter types, in order.
//   relocate <id> <byte offset>       the u64 at that offset of buffer id is an address (as
//                                     below) stored in device memory: make it a real pointer
//   save <id> <path>                  writes the buffer's bytes to path
//   schedule forward|reverse          the order fibers run in between barriers (default
//                                     forward); a race-free kernel's output does not change
// An address argument is 0 (null) or ((id + 1) << 40) + byte offset into buffer id: what
// the test's launch plans pass where the real op passes device pointers.
// Every buffer lies between 256-byte guard zones; a launch that writes one is an error.
// Errors go to stderr with exit status 2 (job) or 3 (emulated kernel).
#include "cuda_emu.h"
#include "guard.h"

#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <utility>

#include "hdb_emu_kernels.inc"
#ifdef HDB_EMU_SELFTEST
#include "selftest.cuh"
#endif

namespace {

[[noreturn]] void job_fail(const std::string& msg) {
    std::fprintf(stderr, "driver: %s\n", msg.c_str());
    std::exit(2);
}

using hdb_emu_guard::kGuard;
using hdb_emu_guard::kGuardByte;

struct Buffer {
    unsigned char* base = nullptr; // guard, data, guard
    size_t bytes = 0;
    unsigned char* data() const { return base + kGuard; }
};

std::map<unsigned long long, Buffer> g_buffers;

struct Arg {
    std::string kind;
    unsigned long long bits = 0;
    long long sval = 0;
};

void* address(unsigned long long v, size_t idx) {
    if (v == 0) return nullptr;
    const unsigned long long id = (v >> 40) - 1, off = v & ((1ull << 40) - 1);
    auto it = g_buffers.find(id);
    if ((v >> 40) == 0 || it == g_buffers.end())
        job_fail("argument " + std::to_string(idx) + ": " + std::to_string(v) +
                 " is not a buffer address");
    if (off > it->second.bytes)
        job_fail("argument " + std::to_string(idx) + ": offset " + std::to_string(off) +
                 " past buffer " + std::to_string(id) + " of " +
                 std::to_string(it->second.bytes) + " bytes");
    return it->second.data() + off;
}

template <typename T> T convert(const Arg& a, size_t idx, const std::string& kernel) {
    auto want = [&](const char* k) {
        if (a.kind != k)
            job_fail(kernel + ": argument " + std::to_string(idx) + " is " + k +
                     " in the kernel but the launch passes " + a.kind);
    };
    if constexpr (std::is_pointer_v<T>) {
        want("u64");
        return (T)address(a.bits, idx);
    } else if constexpr (std::is_same_v<T, int>) {
        want("i32");
        return (int)a.sval;
    } else if constexpr (std::is_same_v<T, long long>) {
        want("i64");
        return a.sval;
    } else if constexpr (std::is_same_v<T, float>) {
        want("f32");
        return __uint_as_float((unsigned)a.bits);
    } else {
        static_assert(sizeof(T) == 0, "a kernel parameter type the driver does not know");
    }
}

using Launcher = std::function<void(const std::string&, dim3, dim3, unsigned,
                                    const std::vector<Arg>&)>;

template <typename... P, size_t... I>
std::tuple<P...> convert_all(const std::vector<Arg>& args, const std::string& kernel,
                             std::index_sequence<I...>) {
    return std::tuple<P...>{convert<P>(args[I], I, kernel)...};
}

template <typename... P> Launcher make_launcher(void (*k)(P...)) {
    return [k](const std::string& name, dim3 grid, dim3 block, unsigned smem_bytes,
               const std::vector<Arg>& args) {
        if (args.size() != sizeof...(P))
            job_fail(name + " takes " + std::to_string(sizeof...(P)) + " arguments, the launch passes " +
                     std::to_string(args.size()));
        auto tup = convert_all<P...>(args, name, std::index_sequence_for<P...>{});
        std::function<void()> body = [&] { std::apply(k, tup); };
        hdb_emu::launch(name, grid, block, smem_bytes, body);
    };
}

const std::map<std::string, Launcher>& kernels() {
    static const std::map<std::string, Launcher> m = {
#define HDB_EMU_KERNEL(name) {#name, make_launcher(name)},
        HDB_EMU_KERNELS
#ifdef HDB_EMU_SELFTEST
        HDB_EMU_SELFTEST_KERNELS
#endif
#undef HDB_EMU_KERNEL
    };
    return m;
}

void check_guards(const std::string& kernel) {
    for (auto& [id, b] : g_buffers) {
        if (hdb_emu_guard::intact(b.base, b.bytes)) continue; // the usual case, fast
        for (size_t i = 0; i < kGuard; ++i)
            if (b.base[i] != kGuardByte || b.base[kGuard + b.bytes + i] != kGuardByte)
                job_fail(kernel + " wrote outside buffer " + std::to_string(id) + " (" +
                         std::to_string(b.bytes) + " bytes): guard byte " +
                         (b.base[i] != kGuardByte ? "-" + std::to_string(kGuard - i)
                                                  : "+" + std::to_string(i)));
    }
}

} // namespace

int main() {
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string cmd;
        if (!(in >> cmd)) continue;
        if (cmd == "buffer") {
            unsigned long long id;
            size_t bytes;
            std::string src;
            if (!(in >> id >> bytes >> src)) job_fail("bad buffer line: " + line);
            Buffer b;
            b.bytes = bytes;
            // 256-byte aligned data, as cudaMalloc's.
            b.base = (unsigned char*)std::aligned_alloc(256, (bytes + 2 * kGuard + 255) / 256 * 256);
            if (!b.base) job_fail("out of memory");
            std::memset(b.base, kGuardByte, kGuard);
            std::memset(b.base + kGuard + bytes, kGuardByte, kGuard);
            if (src == "fill") {
                std::memset(b.data(), 0xff, bytes);
            } else {
                std::ifstream f(src, std::ios::binary);
                f.read((char*)b.data(), (std::streamsize)bytes);
                if (!f || f.gcount() != (std::streamsize)bytes)
                    job_fail("cannot read " + std::to_string(bytes) + " bytes from " + src);
            }
            if (g_buffers.count(id)) job_fail("buffer " + std::to_string(id) + " defined twice");
            g_buffers[id] = b;
        } else if (cmd == "launch") {
            std::string name;
            dim3 grid, block;
            unsigned smem_bytes;
            size_t nargs;
            if (!(in >> name >> grid.x >> grid.y >> grid.z >> block.x >> block.y >> block.z >>
                  smem_bytes >> nargs))
                job_fail("bad launch line: " + line);
            std::vector<Arg> args(nargs);
            for (size_t i = 0; i < nargs; ++i) {
                std::string tok;
                if (!(in >> tok)) job_fail("missing argument " + std::to_string(i) + ": " + line);
                const size_t colon = tok.find(':');
                if (colon == std::string::npos) job_fail("bad argument " + tok);
                args[i].kind = tok.substr(0, colon);
                const std::string v = tok.substr(colon + 1);
                if (args[i].kind == "u64" || args[i].kind == "f32")
                    args[i].bits = std::stoull(v, nullptr, 16);
                else if (args[i].kind == "i32" || args[i].kind == "i64")
                    args[i].sval = std::stoll(v);
                else
                    job_fail("bad argument kind " + tok);
            }
            auto it = kernels().find(name);
            if (it == kernels().end()) job_fail("no kernel " + name);
            it->second(name, grid, block, smem_bytes, args);
            check_guards(name);
        } else if (cmd == "relocate") {
            // A device address stored inside a buffer (a table of pointers): translate it.
            unsigned long long id;
            size_t off;
            if (!(in >> id >> off)) job_fail("bad relocate line: " + line);
            auto b = g_buffers.find(id);
            if (b == g_buffers.end() || off + 8 > b->second.bytes)
                job_fail("relocate outside buffer " + std::to_string(id));
            unsigned long long v;
            std::memcpy(&v, b->second.data() + off, 8);
            const unsigned long long real = (unsigned long long)(uintptr_t)address(v, 0);
            std::memcpy(b->second.data() + off, &real, 8);
        } else if (cmd == "schedule") {
            std::string order;
            in >> order;
            if (order != "forward" && order != "reverse") job_fail("bad schedule line: " + line);
            hdb_emu::rt().reverse = order == "reverse";
        } else if (cmd == "save") {
            unsigned long long id;
            std::string path;
            if (!(in >> id >> path)) job_fail("bad save line: " + line);
            auto b = g_buffers.find(id);
            if (b == g_buffers.end()) job_fail("no buffer " + std::to_string(id));
            std::ofstream f(path, std::ios::binary);
            f.write((const char*)b->second.data(), (std::streamsize)b->second.bytes);
            if (!f) job_fail("cannot write " + path);
        } else {
            job_fail("unknown command: " + line);
        }
    }
    return 0;
}
