/*
 * hdb.hpp: header-only C++17 wrapper of the C API in hdb.h (the rules there apply).
 *
 * - Move-only RAII handles: hdb::Runtime, Model, Adapter, Hypernet, Session. A handle's
 *   destructor calls the C free; objects keep what they depend on alive, so destruction
 *   order does not matter.
 * - Errors: with exceptions (the default) a failing call throws hdb::Error (a
 *   std::runtime_error holding the status and the message). Built with HDB_NO_EXCEPTIONS
 *   defined (Unreal modules, -fno-exceptions) every fallible call returns hdb::Result<T>
 *   instead: `if (!r) use(r.error()); else use(*r);`. The message is copied inside the
 *   failing call's wrapper on the calling thread (hdb.h's rule), so it is always this call's.
 * - Buffers are hdb::Span<T> (pointer + length; from a std::vector, std::array, C array).
 * - Callbacks take any callable without std::function: the progress callable is borrowed for
 *   one call (hdb::with_progress), the log callable is moved into hdb, which destroys it once
 *   no thread uses it (hdb_set_log_callback_ex). The trampolines never let an exception out
 *   (hdb.h: callbacks must not unwind): a throwing progress callable cancels the call, a
 *   throwing log callable loses its record.
 * - Params are hdb.h's structs (hdb::GenerateParams = hdb_generate_params, ...), filled with
 *   the defaults by hdb::generate_params() and friends; their const char * strings must
 *   outlive the call they are passed to.
 */
#ifndef HDB_HPP
#define HDB_HPP

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#ifndef HDB_NO_EXCEPTIONS
#include <stdexcept>
#endif

#include "hdb.h"

namespace hdb {

/** hdb.h's hdb_status values. */
enum class Status : uint32_t {
    Ok = HDB_STATUS_OK,
    NullArgument = HDB_STATUS_NULL_ARGUMENT,
    InvalidArgument = HDB_STATUS_INVALID_ARGUMENT,
    FileNotFound = HDB_STATUS_FILE_NOT_FOUND,
    IoError = HDB_STATUS_IO_ERROR,
    InvalidFile = HDB_STATUS_INVALID_FILE,
    NotAModel = HDB_STATUS_NOT_A_MODEL,
    UnsupportedDtype = HDB_STATUS_UNSUPPORTED_DTYPE,
    InvalidModel = HDB_STATUS_INVALID_MODEL,
    Unsupported = HDB_STATUS_UNSUPPORTED,
    AdapterMismatch = HDB_STATUS_ADAPTER_MISMATCH,
    NoDevice = HDB_STATUS_NO_DEVICE,
    DeviceError = HDB_STATUS_DEVICE_ERROR,
    OutOfMemory = HDB_STATUS_OUT_OF_MEMORY,
    Cancelled = HDB_STATUS_CANCELLED,
    BufferTooSmall = HDB_STATUS_BUFFER_TOO_SMALL,
    Panic = HDB_STATUS_PANIC,
    Internal = HDB_STATUS_INTERNAL,
    Busy = HDB_STATUS_BUSY,
    Diverged = HDB_STATUS_DIVERGED,
};

/** "HDB_STATUS_OK", ... */
inline const char *status_name(Status s) noexcept { return hdb_status_name(static_cast<uint32_t>(s)); }
inline const char *version() noexcept { return hdb_version_string(); }
inline uint32_t abi_version() noexcept { return hdb_abi_version(); }

namespace detail {
/** The calling thread's last message, read right after the failing call. */
inline std::string last_error() {
    char small[256];
    size_t n = hdb_last_error_copy(small, sizeof small);
    if (n < sizeof small) return std::string(small, n);
    std::string s(n + 1, '\0');
    n = hdb_last_error_copy(&s[0], s.size());
    s.resize(n < s.size() ? n : s.size() - 1);
    return s;
}
} // namespace detail

/** A failed call: its status and message. */
#ifdef HDB_NO_EXCEPTIONS
class Error {
  public:
    Error(Status status, std::string message) : status_(status), message_(std::move(message)) {}
    const char *what() const noexcept { return message_.c_str(); }
#else
class Error : public std::runtime_error {
  public:
    Error(Status status, const std::string &message) : std::runtime_error(message), status_(status) {}
#endif
    Status status() const noexcept { return status_; }
    std::string message() const { return what(); }

  private:
    Status status_;
#ifdef HDB_NO_EXCEPTIONS
    std::string message_;
#endif
};

/** A value or the Error of the call that failed to make it. */
template <class T> class [[nodiscard]] Result {
  public:
    Result(T value) : value_(std::move(value)) {}
    Result(Error error) : error_(std::move(error)) {}
    bool ok() const noexcept { return value_.has_value(); }
    explicit operator bool() const noexcept { return ok(); }
    /** Only when ok(). */
    T &operator*() & { return *value_; }
    T &&operator*() && { return std::move(*value_); }
    T *operator->() { return &*value_; }
    /** Only when !ok(). */
    const Error &error() const { return *error_; }

  private:
    std::optional<T> value_;
    std::optional<Error> error_;
};

template <> class [[nodiscard]] Result<void> {
  public:
    Result() = default;
    Result(Error error) : error_(std::move(error)) {}
    bool ok() const noexcept { return !error_.has_value(); }
    explicit operator bool() const noexcept { return ok(); }
    const Error &error() const { return *error_; }

  private:
    std::optional<Error> error_;
};

#ifdef HDB_NO_EXCEPTIONS
template <class T> using Ret = Result<T>;
#else
template <class T> using Ret = T;
#endif

namespace detail {
inline Error error_of(hdb_status s) { return Error(static_cast<Status>(s), last_error()); }
#ifdef HDB_NO_EXCEPTIONS
template <class T> Result<T> finish(Result<T> r) { return r; }
#else
template <class T> T finish(Result<T> r) {
    if (!r) throw r.error();
    return std::move(*r);
}
inline void finish(Result<void> r) {
    if (!r) throw r.error();
}
#endif
inline Result<void> check(hdb_status s) {
    if (s != HDB_STATUS_OK) return error_of(s);
    return {};
}
} // namespace detail

/** A pointer and a length; the caller keeps the memory alive while it is used. */
template <class T> class Span {
  public:
    constexpr Span() noexcept = default;
    constexpr Span(T *data, size_t size) noexcept : data_(data), size_(size) {}
    template <size_t N> constexpr Span(T (&a)[N]) noexcept : data_(a), size_(N) {}
    template <class U, size_t N> constexpr Span(std::array<U, N> &a) noexcept : data_(a.data()), size_(N) {}
    template <class U, size_t N>
    constexpr Span(const std::array<U, N> &a) noexcept : data_(a.data()), size_(N) {}
    template <class U> Span(std::vector<U> &v) noexcept : data_(v.data()), size_(v.size()) {}
    template <class U> Span(const std::vector<U> &v) noexcept : data_(v.data()), size_(v.size()) {}
    constexpr T *data() const noexcept { return data_; }
    constexpr size_t size() const noexcept { return size_; }
    constexpr T &operator[](size_t i) const noexcept { return data_[i]; }

  private:
    T *data_ = nullptr;
    size_t size_ = 0;
};

using RuntimeParams = hdb_runtime_params;
using ModelParams = hdb_model_params;
using SessionParams = hdb_session_params;
using GenerateParams = hdb_generate_params;
using PredictParams = hdb_predict_params;
using FinetuneParams = hdb_finetune_params;
using RuntimeInfo = hdb_runtime_info;
using ModelInfo = hdb_model_info;

inline RuntimeParams runtime_params() noexcept { return hdb_runtime_params_default(); }
inline ModelParams model_params() noexcept { return hdb_model_params_default(); }
inline SessionParams session_params() noexcept { return hdb_session_params_default(); }
inline GenerateParams generate_params() noexcept { return hdb_generate_params_default(); }
inline PredictParams predict_params() noexcept { return hdb_predict_params_default(); }
inline FinetuneParams finetune_params() noexcept { return hdb_finetune_params_default(); }

namespace detail {
template <class F> bool progress_trampoline(void *ud, uint64_t done, uint64_t total, const char *stage) noexcept {
#ifdef HDB_NO_EXCEPTIONS
    return static_cast<bool>((*static_cast<F *>(ud))(done, total, stage));
#else
    try {
        return static_cast<bool>((*static_cast<F *>(ud))(done, total, stage));
    } catch (...) {
        return false; // cancels the call: an exception must not cross into hdb
    }
#endif
}
template <class F> bool train_trampoline(void *ud, uint64_t step, uint64_t steps, float loss) noexcept {
#ifdef HDB_NO_EXCEPTIONS
    return static_cast<bool>((*static_cast<F *>(ud))(step, steps, loss));
#else
    try {
        return static_cast<bool>((*static_cast<F *>(ud))(step, steps, loss));
    } catch (...) {
        return false;
    }
#endif
}
} // namespace detail

/**
 * Sets `params.progress` to call `f(done, total, stage)` (returning false cancels). `f` is
 * borrowed: it must outlive the call the params are passed to. Works for the generate,
 * model and predict params.
 */
template <class P, class F> void with_progress(P &params, F &f) noexcept {
    params.progress = &detail::progress_trampoline<F>;
    params.progress_user_data = &f;
}
/** As with_progress for FinetuneParams: `f(step, steps, loss)`. */
template <class F> void with_progress(FinetuneParams &params, F &f) noexcept {
    params.progress = &detail::train_trampoline<F>;
    params.progress_user_data = &f;
}

enum class LogLevel : uint32_t {
    Off = HDB_LOG_LEVEL_OFF,
    Error = HDB_LOG_LEVEL_ERROR,
    Warn = HDB_LOG_LEVEL_WARN,
    Info = HDB_LOG_LEVEL_INFO,
    Debug = HDB_LOG_LEVEL_DEBUG,
    Trace = HDB_LOG_LEVEL_TRACE,
};

namespace detail {
template <class F> void log_trampoline(void *ud, hdb_log_level level, const char *target, const char *msg) noexcept {
#ifdef HDB_NO_EXCEPTIONS
    (*static_cast<F *>(ud))(static_cast<LogLevel>(level), target, msg);
#else
    try {
        (*static_cast<F *>(ud))(static_cast<LogLevel>(level), target, msg);
    } catch (...) {
        // A log record is not worth the process: drop it.
    }
#endif
}
template <class F> void delete_callable(void *ud) noexcept { delete static_cast<F *>(ud); }
} // namespace detail

/**
 * Sends log records up to `max_level` to `f(LogLevel, const char *target, const char *message)`,
 * called from any thread, several at once. hdb owns the moved-in callable and destroys it once
 * it is replaced and no thread is inside it.
 */
template <class F> Ret<void> set_log_callback(F f, LogLevel max_level) {
    F *owned = new F(std::move(f));
    hdb_status s = hdb_set_log_callback_ex(&detail::log_trampoline<F>, owned, &detail::delete_callable<F>,
                                           static_cast<uint32_t>(max_level));
    if (s != HDB_STATUS_OK) delete owned; // not stored: still ours
    return detail::finish(detail::check(s));
}
/** Stops logging; returns once no thread is inside the old callable (then destroyed). */
inline Ret<void> clear_log_callback() {
    return detail::finish(detail::check(hdb_set_log_callback_ex(nullptr, nullptr, nullptr, HDB_LOG_LEVEL_OFF)));
}

namespace detail {
/** A move-only owner of one C handle. */
template <class T, void (*Free)(T *)> class Handle {
  public:
    Handle() noexcept = default;
    explicit Handle(T *raw) noexcept : raw_(raw) {}
    Handle(Handle &&o) noexcept : raw_(std::exchange(o.raw_, nullptr)) {}
    Handle &operator=(Handle &&o) noexcept {
        if (this != &o) {
            Free(raw_);
            raw_ = std::exchange(o.raw_, nullptr);
        }
        return *this;
    }
    Handle(const Handle &) = delete;
    Handle &operator=(const Handle &) = delete;
    ~Handle() { Free(raw_); }
    T *get() const noexcept { return raw_; }
    /** Gives up ownership; the caller frees it with the C function. */
    T *release() noexcept { return std::exchange(raw_, nullptr); }
    explicit operator bool() const noexcept { return raw_ != nullptr; }

  private:
    T *raw_ = nullptr;
};
} // namespace detail

/** An RGB8 image owned by the wrapper (rows packed: stride = width * 3). */
struct Image {
    uint32_t width = 0;
    uint32_t height = 0;
    std::vector<uint8_t> pixels;
};

/** A caller's RGB8 image as hdb_image (read-only use: faces). */
inline hdb_image image_view(const uint8_t *rgb, size_t len, uint32_t width, uint32_t height,
                            uint32_t stride = 0) noexcept {
    hdb_image im{};
    im.data = const_cast<uint8_t *>(rgb); // hdb only reads a face image
    im.data_len = len;
    im.width = width;
    im.height = height;
    im.stride = stride ? stride : width * 3;
    im.format = HDB_PIXEL_RGB8;
    return im;
}
inline hdb_image image_view(const Image &im) noexcept {
    return image_view(im.pixels.data(), im.pixels.size(), im.width, im.height);
}

class Runtime : public detail::Handle<hdb_runtime, hdb_runtime_free> {
  public:
    using Handle::Handle;
    static Ret<Runtime> create(const RuntimeParams &params = runtime_params()) {
        hdb_runtime *rt = nullptr;
        hdb_status s = hdb_runtime_new(&params, &rt);
        if (s != HDB_STATUS_OK) return detail::finish(Result<Runtime>(detail::error_of(s)));
        return detail::finish(Result<Runtime>(Runtime(rt)));
    }
    /** `device`: "auto", "cpu", "cuda" or "cuda:N". */
    static Ret<Runtime> create(const char *device, uint32_t num_threads = 0) {
        RuntimeParams p = runtime_params();
        p.device = device;
        p.num_threads = num_threads;
        return create(p);
    }
    Ret<RuntimeInfo> info() const {
        RuntimeInfo i{};
        i.struct_size = sizeof i;
        hdb_status s = hdb_runtime_get_info(get(), &i);
        if (s != HDB_STATUS_OK) return detail::finish(Result<RuntimeInfo>(detail::error_of(s)));
        return detail::finish(Result<RuntimeInfo>(i));
    }
};

class Model : public detail::Handle<hdb_model, hdb_model_free> {
  public:
    using Handle::Handle;
    static Ret<Model> load(const Runtime &rt, const char *path, const ModelParams &params = model_params()) {
        hdb_model *m = nullptr;
        hdb_status s = hdb_model_load(rt.get(), path, &params, &m);
        if (s != HDB_STATUS_OK) return detail::finish(Result<Model>(detail::error_of(s)));
        return detail::finish(Result<Model>(Model(m)));
    }
    static Ret<Model> load(const Runtime &rt, const std::string &path, const ModelParams &params = model_params()) {
        return load(rt, path.c_str(), params);
    }
    /** An LDM single-file checkpoint's bytes (copied; hdb_model_load_from_memory). `name`
     * stands for its path in messages; only params.progress applies. */
    static Ret<Model> load_from_memory(const Runtime &rt, Span<const uint8_t> bytes, const char *name = nullptr,
                                       const ModelParams &params = model_params()) {
        hdb_model *m = nullptr;
        hdb_status s = hdb_model_load_from_memory(rt.get(), bytes.data(), bytes.size(), name, &params, &m);
        if (s != HDB_STATUS_OK) return detail::finish(Result<Model>(detail::error_of(s)));
        return detail::finish(Result<Model>(Model(m)));
    }
    Ret<ModelInfo> info() const {
        ModelInfo i{};
        i.struct_size = sizeof i;
        hdb_status s = hdb_model_get_info(get(), &i);
        if (s != HDB_STATUS_OK) return detail::finish(Result<ModelInfo>(detail::error_of(s)));
        return detail::finish(Result<ModelInfo>(i));
    }
    /** The model's JSON description. */
    Ret<std::string> describe() const {
        size_t needed = 0;
        hdb_status s = hdb_model_describe(get(), nullptr, 0, &needed);
        if (s != HDB_STATUS_BUFFER_TOO_SMALL && s != HDB_STATUS_OK)
            return detail::finish(Result<std::string>(detail::error_of(s)));
        std::string out(needed, '\0');
        s = hdb_model_describe(get(), &out[0], out.size(), &needed);
        if (s != HDB_STATUS_OK) return detail::finish(Result<std::string>(detail::error_of(s)));
        out.resize(needed ? needed - 1 : 0); // drop the NUL
        return detail::finish(Result<std::string>(std::move(out)));
    }
};

class Adapter : public detail::Handle<hdb_adapter, hdb_adapter_free> {
  public:
    using Handle::Handle;
    static Ret<Adapter> load(const Model &model, const char *path) {
        hdb_adapter *a = nullptr;
        hdb_status s = hdb_adapter_load(model.get(), path, &a);
        if (s != HDB_STATUS_OK) return detail::finish(Result<Adapter>(detail::error_of(s)));
        return detail::finish(Result<Adapter>(Adapter(a)));
    }
    static Ret<Adapter> load(const Model &model, const std::string &path) { return load(model, path.c_str()); }
    /** With options (hdb_adapter_load_ex), e.g. allow_unmatched: skip a LoRA's keys that
     * match no layer of the model instead of refusing the file. */
    static Ret<Adapter> load(const Model &model, const char *path, const hdb_adapter_load_params &params) {
        hdb_adapter *a = nullptr;
        hdb_status s = hdb_adapter_load_ex(model.get(), path, &params, &a);
        if (s != HDB_STATUS_OK) return detail::finish(Result<Adapter>(detail::error_of(s)));
        return detail::finish(Result<Adapter>(Adapter(a)));
    }
    static hdb_adapter_load_params load_params() { return hdb_adapter_load_params_default(); }
    /** From a file's bytes (copied). */
    static Ret<Adapter> load_from_memory(const Model &model, Span<const uint8_t> bytes) {
        hdb_adapter *a = nullptr;
        hdb_status s = hdb_adapter_load_from_memory(model.get(), bytes.data(), bytes.size(), &a);
        if (s != HDB_STATUS_OK) return detail::finish(Result<Adapter>(detail::error_of(s)));
        return detail::finish(Result<Adapter>(Adapter(a)));
    }
    Ret<void> save(const char *path) const { return detail::finish(detail::check(hdb_adapter_save(get(), path))); }
    Ret<void> save(const std::string &path) const { return save(path.c_str()); }
};

namespace detail {
// Takes the status of a call that already returned: never write
// `adapter_result(hdb_x(..., &a), a)`, as the order arguments are evaluated in is unspecified
// (GCC reads `a` before the call writes it).
inline Ret<Adapter> adapter_result(hdb_status s, hdb_adapter *a) {
    if (s != HDB_STATUS_OK) return finish(Result<Adapter>(error_of(s)));
    return finish(Result<Adapter>(Adapter(a)));
}
} // namespace detail

class Hypernet : public detail::Handle<hdb_hypernet, hdb_hypernet_free> {
  public:
    using Handle::Handle;
    static Ret<Hypernet> load(const Runtime &rt, const char *path) {
        hdb_hypernet *h = nullptr;
        hdb_status s = hdb_hypernet_load(rt.get(), path, &h);
        if (s != HDB_STATUS_OK) return detail::finish(Result<Hypernet>(detail::error_of(s)));
        return detail::finish(Result<Hypernet>(Hypernet(h)));
    }
    /** The identity adapter of an RGB8 face crop. */
    Ret<Adapter> predict(const Model &model, const hdb_image &face, const PredictParams &params = predict_params()) const {
        hdb_adapter *a = nullptr;
        hdb_status s = hdb_hypernet_predict(get(), model.get(), &face, &params, &a);
        return detail::adapter_result(s, a);
    }
    /** Predict, then rank-relaxed finetuning (hdb_personalize). */
    Ret<Adapter> personalize(const Model &model, const hdb_image &face, const PredictParams &predict = predict_params(),
                             const FinetuneParams &finetune = finetune_params()) const {
        hdb_adapter *a = nullptr;
        hdb_status s = hdb_personalize(get(), model.get(), &face, &predict, &finetune, &a);
        return detail::adapter_result(s, a);
    }
};

/** Trains an identity adapter (hdb_finetune); `start` null: LiDB from zero. */
inline Ret<Adapter> finetune(const Model &model, const hdb_image &face, const Adapter *start,
                             const FinetuneParams &params = finetune_params()) {
    hdb_adapter *a = nullptr;
    hdb_status s = hdb_finetune(model.get(), &face, start ? start->get() : nullptr, &params, &a);
        return detail::adapter_result(s, a);
}

enum class ApplyMode : uint32_t { Merge = HDB_APPLY_MERGE, Runtime = HDB_APPLY_RUNTIME };

class Session : public detail::Handle<hdb_session, hdb_session_free> {
  public:
    using Handle::Handle;
    static Ret<Session> create(const Model &model, const SessionParams &params = session_params()) {
        hdb_session *s = nullptr;
        hdb_status st = hdb_session_new(model.get(), &params, &s);
        if (st != HDB_STATUS_OK) return detail::finish(Result<Session>(detail::error_of(st)));
        return detail::finish(Result<Session>(Session(s)));
    }
    /** Makes `adapters` (scales: empty = 1.0 each) the active set; empty removes them. */
    Ret<void> set_adapters(Span<const Adapter *const> adapters, Span<const float> scales = {},
                           ApplyMode mode = ApplyMode::Merge) {
        if (scales.size() != 0 && scales.size() != adapters.size())
            return detail::finish(Result<void>(Error(Status::InvalidArgument, "set_adapters: scales must be empty or "
                                                                              "one per adapter")));
        std::vector<const hdb_adapter *> raw(adapters.size());
        for (size_t i = 0; i < adapters.size(); i++) raw[i] = adapters[i] ? adapters[i]->get() : nullptr;
        return detail::finish(detail::check(hdb_session_set_adapters(
            get(), raw.data(), scales.size() ? scales.data() : nullptr, raw.size(), static_cast<uint32_t>(mode))));
    }
    /** Runtime mode: one index into the active set per sample (-1 none); empty: all share it. */
    Ret<void> set_sample_adapters(Span<const int32_t> indices) {
        return detail::finish(detail::check(hdb_session_set_sample_adapters(get(), indices.data(), indices.size())));
    }
    /** Renders params.batch images into caller buffers (hdb_generate). */
    Ret<void> generate(const GenerateParams &params, Span<hdb_image> out) {
        return detail::finish(detail::check(hdb_generate(get(), &params, out.data(), out.size())));
    }
    /** Renders params.batch images into new packed RGB8 Images. */
    Ret<std::vector<Image>> generate(const GenerateParams &params) {
        size_t n = params.batch ? params.batch : 1;
        std::vector<Image> images(n);
        std::vector<hdb_image> raw(n);
        for (size_t i = 0; i < n; i++) {
            images[i].width = params.width;
            images[i].height = params.height;
            images[i].pixels.resize(size_t(params.width) * params.height * 3);
            raw[i] = hdb_image{};
            raw[i].data = images[i].pixels.data();
            raw[i].data_len = images[i].pixels.size();
        }
        hdb_status s = hdb_generate(get(), &params, raw.data(), raw.size());
        if (s != HDB_STATUS_OK) return detail::finish(Result<std::vector<Image>>(detail::error_of(s)));
        return detail::finish(Result<std::vector<Image>>(std::move(images)));
    }
    /** One UNet evaluation (hdb_session_unet); shapes as there. */
    Ret<void> unet(Span<const float> sample, Span<const float> timesteps, Span<const float> context, uint32_t batch,
                   uint32_t height, uint32_t width, uint32_t context_tokens, Span<float> out) {
        return detail::finish(detail::check(hdb_session_unet(get(), sample.data(), sample.size(), timesteps.data(),
                                                             timesteps.size(), context.data(), context.size(), batch,
                                                             height, width, context_tokens, out.data(), out.size())));
    }
    /** Cancels the call running on this session on another thread; any thread may call it. */
    void cancel() const noexcept { (void)hdb_session_cancel(get()); }
};

} // namespace hdb

#endif /* HDB_HPP */
