// include/hdb.hpp on the tiny SD fixture, built twice by scripts/test-bindings.sh under
// ASan/UBSan: with exceptions, and with -fno-exceptions -DHDB_NO_EXCEPTIONS (hdb::Result).
// Usage: hpp_test <tests/fixtures>. Prints "ok N: ..." per check; exits 1 at the first failure.
#include "hdb.hpp"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

static int g_checks = 0;

static void check(bool cond, const char *what, const std::string &detail = "") {
    if (!cond) {
        std::fprintf(stderr, "FAIL: %s %s\n", what, detail.c_str());
        std::exit(1);
    }
    std::printf("ok %d: %s\n", ++g_checks, what);
}

struct Outcome {
    hdb::Status status;
    std::string message;
};

// The status and message of a call, in either error mode.
#ifdef HDB_NO_EXCEPTIONS
template <class T> static T must(hdb::Result<T> r, const char *what) {
    if (!r) check(false, what, r.error().message());
    return std::move(*r);
}
static void must(hdb::Result<void> r, const char *what) {
    if (!r) check(false, what, r.error().message());
}
#define MUST(expr, what) must((expr), what)
template <class F> static Outcome outcome(F f) {
    auto r = f();
    if (r) return {hdb::Status::Ok, ""};
    return {r.error().status(), r.error().message()};
}
#else
// A failure throws hdb::Error, which ends the test with its message.
#define MUST(expr, what) (expr)
template <class F> static Outcome outcome(F f) {
    try {
        (void)f();
        return {hdb::Status::Ok, ""};
    } catch (const hdb::Error &e) {
        return {e.status(), e.message()};
    }
}
#endif

// Counts live copies, to see that hdb destroys the log callable it owns.
static std::atomic<int> g_live{0};
struct LogSink {
    std::atomic<int> *records;
    LogSink(std::atomic<int> *r) : records(r) { g_live++; }
    LogSink(LogSink &&o) noexcept : records(o.records) { g_live++; }
    LogSink(const LogSink &o) : records(o.records) { g_live++; }
    ~LogSink() { g_live--; }
    void operator()(hdb::LogLevel, const char *target, const char *message) const {
        if (target && message) (*records)++;
    }
};

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s FIXTURES\n", argv[0]);
        return 2;
    }
    const std::string fixtures = argv[1];
    check(hdb::abi_version() == HDB_ABI_VERSION, "ABI version matches the header");
    check(std::strcmp(hdb::status_name(hdb::Status::Cancelled), "HDB_STATUS_CANCELLED") == 0, "status names");

    std::atomic<int> records{0};
    MUST(hdb::set_log_callback(LogSink(&records), hdb::LogLevel::Debug), "log callback");
    check(g_live == 1, "hdb holds one copy of the log callable");

    hdb::Runtime rt = MUST(hdb::Runtime::create("cpu", 2), "runtime");
    auto rinfo = MUST(rt.info(), "runtime info");
    check(rinfo.device_kind == HDB_DEVICE_CPU && rinfo.num_threads == 2, "runtime on the CPU, 2 threads");

    Outcome missing = outcome([&] { return hdb::Model::load(rt, fixtures + "/no-such-model"); });
    check(missing.status == hdb::Status::FileNotFound, "a missing model is FileNotFound", missing.message);
    check(missing.message.find("no-such-model") != std::string::npos, "its message names the path", missing.message);

    hdb::Model model = MUST(hdb::Model::load(rt, fixtures + "/tiny-sd"), "model");
    auto info = MUST(model.info(), "model info");
    check(info.architecture == HDB_ARCH_SD1 && info.unet.present == 1, "SD1 model with a UNet");
    std::string json = MUST(model.describe(), "describe");
    check(json.size() > 2 && json.front() == '{' && json.back() == '}', "describe gives JSON", json);

    hdb::Adapter id1 = MUST(hdb::Adapter::load(model, fixtures + "/adapter/id1.lidb.safetensors"), "adapter");
    {
        hdb_adapter_load_params lp = hdb::Adapter::load_params();
        lp.allow_unmatched = 1;
        std::string p = fixtures + "/adapter/id1.lidb.safetensors";
        hdb::Adapter ex = MUST(hdb::Adapter::load(model, p.c_str(), lp), "adapter with options");
        check(ex.get() != nullptr, "hdb_adapter_load_ex through hdb.hpp", p);
    }
    hdb::Session session = MUST(hdb::Session::create(model), "session");
    // Moves keep exactly one owner.
    hdb::Session moved = std::move(session);
    check(!session && moved, "a moved-from session is empty");

    hdb::GenerateParams p = hdb::generate_params();
    p.prompt = "a photo of sks person";
    p.steps = 2;
    p.width = 64;
    p.height = 64;
    p.seed = 7;
    p.sampler = HDB_SAMPLER_DDIM;
    int calls = 0;
    auto count = [&](uint64_t done, uint64_t total, const char *stage) {
        calls++;
        return done <= total && stage != nullptr;
    };
    hdb::with_progress(p, count);
    auto a = MUST(moved.generate(p), "generate");
    check(calls >= 2, "the progress callable ran per step");
    check(a.size() == 1 && a[0].width == 64 && a[0].pixels.size() == 64 * 64 * 3, "one 64x64 RGB8 image");

    const hdb::Adapter *set[] = {&id1};
    const float scales[] = {1.0f};
    MUST(moved.set_adapters(set, scales, hdb::ApplyMode::Merge), "set adapters");
    auto b = MUST(moved.generate(p), "generate with id1");
    check(a[0].pixels != b[0].pixels, "the identity changes the image");
    MUST(moved.set_adapters({}, {}, hdb::ApplyMode::Merge), "remove adapters");
    auto c = MUST(moved.generate(p), "generate again without");
    check(a[0].pixels == c[0].pixels, "same seed, same image");

    // Caller buffers through Span<hdb_image>.
    std::vector<uint8_t> buf(64 * 64 * 3);
    hdb_image out[1] = {};
    out[0].data = buf.data();
    out[0].data_len = buf.size();
    MUST(moved.generate(p, out), "generate into a caller buffer");
    check(buf == a[0].pixels && out[0].stride == 64 * 3, "caller buffer holds the same image");

    auto stop = [](uint64_t, uint64_t, const char *) { return false; };
    hdb::with_progress(p, stop);
    Outcome cancelled = outcome([&] { return moved.generate(p); });
    check(cancelled.status == hdb::Status::Cancelled, "a progress callable returning false cancels",
          cancelled.message);
#ifndef HDB_NO_EXCEPTIONS
    auto thrower = [](uint64_t, uint64_t, const char *) -> bool { throw std::runtime_error("from the callback"); };
    hdb::with_progress(p, thrower);
    Outcome thrown = outcome([&] { return moved.generate(p); });
    check(thrown.status == hdb::Status::Cancelled, "an exception in the callable cancels instead of unwinding",
          thrown.message);
#endif
    p.progress = nullptr;
    p.width = 63;
    Outcome bad = outcome([&] { return moved.generate(p); });
    check(bad.status == hdb::Status::InvalidArgument && bad.message.find("width") != std::string::npos,
          "a bad width is InvalidArgument naming it", bad.message);

    // Per-image identities from a file's bytes, and one UNet evaluation.
    {
        std::FILE *f = std::fopen((fixtures + "/adapter/id1.lidb.safetensors").c_str(), "rb");
        check(f != nullptr, "open the adapter file");
        std::vector<uint8_t> bytes;
        for (int ch; (ch = std::fgetc(f)) != EOF;) bytes.push_back(static_cast<uint8_t>(ch));
        std::fclose(f);
        hdb::Adapter mem = MUST(hdb::Adapter::load_from_memory(model, hdb::Span<const uint8_t>(bytes)), "from memory");
        const hdb::Adapter *one[] = {&mem};
        MUST(moved.set_adapters(one, {}, hdb::ApplyMode::Runtime), "runtime mode");
        const int32_t idx[] = {-1, 0};
        MUST(moved.set_sample_adapters(idx), "per-image indices");
        hdb::GenerateParams p2 = p;
        p2.batch = 2;
        p2.width = 64; // p was left at the refused width above
        auto two = MUST(moved.generate(p2), "a batch of two identities");
        check(two.size() == 2 && two[0].pixels != two[1].pixels, "one identity per image");
        MUST(moved.set_sample_adapters({}), "back to one set");
        std::vector<float> sample(4 * 8 * 8), ctx(77 * info.cross_attention_dim), eps(sample.size());
        for (size_t i = 0; i < sample.size(); i++) sample[i] = float(i % 7) / 7.0f;
        const float t[] = {10.0f};
        MUST(moved.unet(sample, t, ctx, 1, 8, 8, 77, eps), "UNet evaluation");
        bool finite = true;
        for (float v : eps) finite = finite && v == v;
        check(finite && eps != sample, "the UNet's output is finite and not its input");
    }

    // A single-file checkpoint from its bytes is the model loaded from its path.
    {
        const std::string ldm = fixtures + "/tiny-sd-ldm.safetensors";
        std::FILE *f = std::fopen(ldm.c_str(), "rb");
        check(f != nullptr, "open the single-file fixture");
        std::vector<uint8_t> bytes;
        for (int ch; (ch = std::fgetc(f)) != EOF;) bytes.push_back(static_cast<uint8_t>(ch));
        std::fclose(f);
        hdb::Model disk = MUST(hdb::Model::load(rt, ldm), "single file from disk");
        hdb::Model mem = MUST(hdb::Model::load_from_memory(rt, bytes, "tiny.safetensors"), "from memory");
        auto di = MUST(disk.info(), "info");
        auto mi = MUST(mem.info(), "info");
        check(mi.source_format == HDB_FORMAT_LDM_SINGLE_FILE && mi.unet.parameter_count == di.unet.parameter_count &&
                  mi.vae.tensor_count == di.vae.tensor_count,
              "a model from memory is the model from its path");
        bytes.resize(1000);
        Outcome cut = outcome([&] { return hdb::Model::load_from_memory(rt, bytes, "cut.safetensors"); });
        check(cut.status == hdb::Status::InvalidFile && cut.message.find("cut.safetensors") != std::string::npos,
              "a truncated buffer is refused by name", cut.message);
    }

    // Faces: an image view of caller pixels.
    std::vector<uint8_t> face(32 * 32 * 3, 128);
    hdb_image fv = hdb::image_view(face.data(), face.size(), 32, 32);
    check(fv.stride == 96 && fv.format == HDB_PIXEL_RGB8, "image view of a packed face");
    for (size_t i = 0; i < face.size(); i++) face[i] = static_cast<uint8_t>(i * 7);

    // Predict, finetune, personalize: exactly the steps asked for, finite losses.
    hdb::Hypernet net = MUST(hdb::Hypernet::load(rt, (fixtures + "/hypernet/tiny.hypernet.safetensors").c_str()),
                             "hypernetwork");
    hdb::Adapter pred = MUST(net.predict(model, fv), "predict");
    hdb::FinetuneParams fp = hdb::finetune_params();
    fp.steps = 2;
    fp.resolution = 64;
    int steps = 0;
    auto train = [&](uint64_t, uint64_t n, float loss) {
        steps++;
        return n == 2 && loss == loss;
    };
    hdb::with_progress(fp, train);
    hdb::Adapter zero = MUST(hdb::finetune(model, fv, nullptr, fp), "LiDB from zero");
    check(steps == 2, "2 training steps", std::to_string(steps));
    hdb::Adapter relaxed = MUST(hdb::finetune(model, fv, &pred, fp), "rank-relaxed from the prediction");
    hdb::Adapter mine = MUST(net.personalize(model, fv, hdb::predict_params(), fp), "personalize");
    check(steps == 6, "2 steps each", std::to_string(steps));
    check(pred && zero && relaxed && mine, "each call handed back its adapter");

    MUST(hdb::clear_log_callback(), "clear the log callback");
    check(g_live == 0, "hdb destroyed the log callable once cleared");
    check(records > 0, "log records arrived", std::to_string(records.load()));
    std::printf("all %d checks passed\n", g_checks);
    return 0;
}
