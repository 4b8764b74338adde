// Swift classes over hdb's C API (include/hdb.h, whose rules apply). Not compiled on the CI
// machines (no Swift toolchain there); the module map it imports is checked with clang.
//
// Objects free their handle in deinit. Errors are thrown as HdbError with the message copied
// by hdb_last_error_copy right after the failing call, on the same thread (Swift code in an
// async context may hop threads between calls, so never read it in a later call).
// hdb.h's #define constants import as Int32 and its hdb_status typedef as UInt32: the enums
// below carry the values as UInt32 instead.
import CHdb

/// hdb_status.
public enum Status: UInt32 {
    case ok = 0
    case nullArgument = 1
    case invalidArgument = 2
    case fileNotFound = 3
    case ioError = 4
    case invalidFile = 5
    case notAModel = 6
    case unsupportedDtype = 7
    case invalidModel = 8
    case unsupported = 9
    case adapterMismatch = 10
    case noDevice = 11
    case deviceError = 12
    case outOfMemory = 13
    case cancelled = 14
    case bufferTooSmall = 15
    case panic = 16
    case `internal` = 17
    case busy = 18
    case diverged = 19
}

/// A failed call: its status (raw, for values newer than this binding) and hdb's message.
public struct HdbError: Error, CustomStringConvertible {
    public let rawStatus: UInt32
    public let message: String
    public var status: Status? { Status(rawValue: rawStatus) }
    public var description: String { "\(String(cString: hdb_status_name(rawStatus))): \(message)" }
}

/// Throws for a failed status; call right after the C call, on its thread.
@inline(__always)
func check(_ s: UInt32) throws {
    if s == 0 { return }
    var buf = [CChar](repeating: 0, count: 512)
    var n = hdb_last_error_copy(&buf, buf.count)
    if n >= buf.count {
        buf = [CChar](repeating: 0, count: n + 1)
        n = hdb_last_error_copy(&buf, buf.count)
    }
    throw HdbError(rawStatus: s, message: String(cString: buf))
}

public let version = String(cString: hdb_version_string())
public let abiVersion = hdb_abi_version()

public enum Sampler: UInt32 { case ddim = 0, euler = 1, eulerAncestral = 2, dpmpp2m = 3, dpmpp2mKarras = 4 }
public enum ApplyMode: UInt32 { case merge = 0, runtime = 1 }
public enum LogLevel: UInt32 { case off = 0, error = 1, warn = 2, info = 3, debug = 4, trace = 5 }

/// Runs body with a C string valid during it, or NULL for nil.
func withOptionalCString<T>(_ s: String?, _ body: (UnsafePointer<CChar>?) throws -> T) rethrows -> T {
    if let s = s { return try s.withCString { try body($0) } }
    return try body(nil)
}

/// A progress closure (done, total, stage) -> go on; boxed for the C user data.
final class ProgressBox {
    let fn: (UInt64, UInt64, String) -> Bool
    init(_ fn: @escaping (UInt64, UInt64, String) -> Bool) { self.fn = fn }
}

// Swift closures cannot unwind into C (Swift errors are values), so only the Bool crosses.
let progressTrampoline: hdb_progress_fn = { ud, done, total, stage in
    let box = Unmanaged<ProgressBox>.fromOpaque(ud!).takeUnretainedValue()
    return box.fn(done, total, stage.map { String(cString: $0) } ?? "")
}

public final class Runtime {
    let handle: OpaquePointer

    /// device: "auto", "cpu", "cuda" or "cuda:N"; numThreads 0: one per core.
    public init(device: String = "auto", numThreads: UInt32 = 0) throws {
        var p = hdb_runtime_params()
        _ = hdb_runtime_params_init(&p, MemoryLayout<hdb_runtime_params>.size)
        p.num_threads = numThreads
        var out: OpaquePointer?
        try device.withCString { d in
            p.device = d
            try check(hdb_runtime_new(&p, &out))
        }
        handle = out!
    }

    public func info() throws -> hdb_runtime_info {
        var i = hdb_runtime_info()
        i.struct_size = UInt32(MemoryLayout<hdb_runtime_info>.size)
        try check(hdb_runtime_get_info(handle, &i))
        return i
    }

    deinit { hdb_runtime_free(handle) }
}

public final class Model {
    let handle: OpaquePointer

    /// tokenizer: a tokenizer folder (or a diffusers folder with tokenizer/) used instead of
    /// the model's own; nil: the model's, else the built-in CLIP tokenizer for SD 1.x.
    public init(runtime: Runtime, path: String, weightsVariant: UInt32 = 0, storage: UInt32 = 0,
                tokenizer: String? = nil) throws {
        var p = hdb_model_params()
        _ = hdb_model_params_init(&p, MemoryLayout<hdb_model_params>.size)
        p.weights_variant = weightsVariant
        p.storage = storage
        p.progress = nil
        p.progress_user_data = nil
        var out: OpaquePointer?
        try withOptionalCString(tokenizer) { tok in
            p.tokenizer = tok
            try check(hdb_model_load(runtime.handle, path, &p, &out))
        }
        handle = out!
    }

    /// An LDM single-file checkpoint from its bytes (copied); name stands for its path in messages.
    public init(runtime: Runtime, bytes: [UInt8], name: String? = nil) throws {
        var p = hdb_model_params()
        _ = hdb_model_params_init(&p, MemoryLayout<hdb_model_params>.size)
        var out: OpaquePointer?
        try withOptionalCString(name) { cName in
            try check(hdb_model_load_from_memory(runtime.handle, bytes, bytes.count, cName, &p, &out))
        }
        handle = out!
    }

    public func info() throws -> hdb_model_info {
        var i = hdb_model_info()
        i.struct_size = UInt32(MemoryLayout<hdb_model_info>.size)
        try check(hdb_model_get_info(handle, &i))
        return i
    }

    /// The model's JSON description.
    public func describe() throws -> String {
        var needed = 0
        let s = hdb_model_describe(handle, nil, 0, &needed)
        if s != Status.bufferTooSmall.rawValue { try check(s) }
        var buf = [CChar](repeating: 0, count: needed)
        try check(hdb_model_describe(handle, &buf, buf.count, &needed))
        return String(cString: buf)
    }

    deinit { hdb_model_free(handle) }
}

public final class Adapter {
    let handle: OpaquePointer
    init(_ h: OpaquePointer) { handle = h }

    public convenience init(model: Model, path: String) throws {
        var out: OpaquePointer?
        try check(hdb_adapter_load(model.handle, path, &out))
        self.init(out!)
    }

    /// allowUnmatched: skip the keys of a LoRA file that match no layer of the model (logged
    /// as warnings) instead of refusing the file (hdb_adapter_load_ex).
    public convenience init(model: Model, path: String, allowUnmatched: Bool) throws {
        var p = hdb_adapter_load_params()
        _ = hdb_adapter_load_params_init(&p, MemoryLayout<hdb_adapter_load_params>.size)
        p.allow_unmatched = allowUnmatched ? 1 : 0
        var out: OpaquePointer?
        try check(hdb_adapter_load_ex(model.handle, path, &p, &out))
        self.init(out!)
    }

    public convenience init(model: Model, bytes: [UInt8]) throws {
        var out: OpaquePointer?
        try check(hdb_adapter_load_from_memory(model.handle, bytes, bytes.count, &out))
        self.init(out!)
    }

    public func save(path: String) throws { try check(hdb_adapter_save(handle, path)) }

    deinit { hdb_adapter_free(handle) }
}

/// A packed RGB8 image, top row first.
public struct Image {
    public var width: Int
    public var height: Int
    public var rgb: [UInt8]
    public init(width: Int, height: Int, rgb: [UInt8]) { self.width = width; self.height = height; self.rgb = rgb }

    /// Runs body with an hdb_image over the pixels (hdb only reads a face).
    func withNative<T>(_ body: (inout hdb_image) throws -> T) rethrows -> T {
        var copy = rgb
        return try copy.withUnsafeMutableBufferPointer { buf in
            var im = hdb_image()
            im.data = buf.baseAddress
            im.data_len = buf.count
            im.width = UInt32(width)
            im.height = UInt32(height)
            im.stride = UInt32(width * 3)
            im.format = 0 // HDB_PIXEL_RGB8
            return try body(&im)
        }
    }
}

public struct FinetuneOptions {
    public var mode: UInt32 = 0, steps: UInt32 = 0, rank: UInt32 = 0
    public var lr: Float = 0
    public var weightDecay: Float? = nil, maxGradNorm: Float? = nil
    public var lrSchedule: UInt32 = 0, warmupSteps: UInt32 = 0, resolution: UInt32 = 0
    public var checkpointing = true
    public var seed: UInt64 = 0
    public var prompt: String? = nil, token: String? = nil
    public init() {}

    /// Runs body with the C params (strings valid during body).
    func withNative<T>(_ body: (inout hdb_finetune_params) throws -> T) rethrows -> T {
        var p = hdb_finetune_params()
        _ = hdb_finetune_params_init(&p, MemoryLayout<hdb_finetune_params>.size)
        p.mode = mode; p.steps = steps; p.rank = rank; p.lr = lr
        if let w = weightDecay { p.weight_decay = w }
        if let g = maxGradNorm { p.max_grad_norm = g }
        p.lr_schedule = lrSchedule; p.warmup_steps = warmupSteps; p.resolution = resolution
        p.checkpointing = checkpointing ? 1 : 0
        p.seed = seed
        p.progress = nil
        p.progress_user_data = nil
        return try withOptionalCString(prompt) { cPrompt in
            try withOptionalCString(token) { cToken in
                p.prompt = cPrompt
                p.token = cToken
                return try body(&p)
            }
        }
    }
}

/// Trains an identity on a face: rank-relaxed from start, or LiDB from zero (nil).
public func finetune(model: Model, face: Image, start: Adapter? = nil, options: FinetuneOptions = FinetuneOptions()) throws -> Adapter {
    var out: OpaquePointer?
    try face.withNative { im in
        try options.withNative { p in
            try check(hdb_finetune(model.handle, &im, start?.handle, &p, &out))
        }
    }
    withExtendedLifetime(start) {}
    return Adapter(out!)
}

public final class Hypernet {
    let handle: OpaquePointer

    public init(runtime: Runtime, path: String) throws {
        var out: OpaquePointer?
        try check(hdb_hypernet_load(runtime.handle, path, &out))
        handle = out!
    }

    public func predict(model: Model, face: Image, iterations: UInt32 = 0) throws -> Adapter {
        var p = hdb_predict_params()
        _ = hdb_predict_params_init(&p, MemoryLayout<hdb_predict_params>.size)
        p.iterations = iterations
        var out: OpaquePointer?
        try face.withNative { im in try check(hdb_hypernet_predict(handle, model.handle, &im, &p, &out)) }
        return Adapter(out!)
    }

    public func personalize(model: Model, face: Image, iterations: UInt32 = 0, options: FinetuneOptions = FinetuneOptions()) throws -> Adapter {
        var pp = hdb_predict_params()
        _ = hdb_predict_params_init(&pp, MemoryLayout<hdb_predict_params>.size)
        pp.iterations = iterations
        var out: OpaquePointer?
        try face.withNative { im in
            try options.withNative { fp in
                try check(hdb_personalize(handle, model.handle, &im, &pp, &fp, &out))
            }
        }
        return Adapter(out!)
    }

    deinit { hdb_hypernet_free(handle) }
}

public struct GenerateOptions {
    public var prompt = "", negativePrompt = ""
    public var steps: UInt32 = 25
    public var guidance: Float = 7.5
    public var sampler = Sampler.eulerAncestral
    public var seed: UInt64 = 0
    public var width: UInt32 = 512, height: UInt32 = 512, batch: UInt32 = 1
    public var latents: [Float]? = nil
    public var progress: ((UInt64, UInt64, String) -> Bool)? = nil
    /// `progress` hears every phase ("build", "text", "denoise", "decode"), each when it
    /// starts (done 0) and after each unit; false: the denoising steps only.
    public var progressStages: Bool = false
    public init() {}
}

/// One thread's adapters on a model. cancel() may be called from any thread.
public final class Session {
    let handle: OpaquePointer
    let model: Model

    public init(model: Model) throws {
        var p = hdb_session_params()
        _ = hdb_session_params_init(&p, MemoryLayout<hdb_session_params>.size)
        p.reserved = 0
        var out: OpaquePointer?
        try check(hdb_session_new(model.handle, &p, &out))
        handle = out!
        self.model = model
    }

    /// Makes adapters (scales nil: 1.0 each) the active set; [] removes them.
    public func setAdapters(_ adapters: [Adapter], scales: [Float]? = nil, mode: ApplyMode = .merge) throws {
        let raw: [OpaquePointer?] = adapters.map { $0.handle }
        try withExtendedLifetime(adapters) {
            if let scales = scales {
                precondition(scales.count == adapters.count, "scales: one per adapter")
                try check(hdb_session_set_adapters(handle, raw, scales, adapters.count, mode.rawValue))
            } else {
                try check(hdb_session_set_adapters(handle, raw, nil, adapters.count, mode.rawValue))
            }
        }
    }

    /// Runtime mode: one index into the active set per image (-1: none); [] for all the same.
    public func setSampleAdapters(_ indices: [Int32]) throws {
        if indices.isEmpty {
            try check(hdb_session_set_sample_adapters(handle, nil, 0))
        } else {
            try check(hdb_session_set_sample_adapters(handle, indices, indices.count))
        }
    }

    public func generate(_ o: GenerateOptions) throws -> [Image] {
        var p = hdb_generate_params()
        _ = hdb_generate_params_init(&p, MemoryLayout<hdb_generate_params>.size)
        p.steps = o.steps; p.guidance = o.guidance; p.sampler = o.sampler.rawValue; p.seed = o.seed
        p.width = o.width; p.height = o.height; p.batch = o.batch; p.reserved = 0
        p.progress_stages = o.progressStages ? 1 : 0
        let n = Int(o.batch), size = Int(o.width) * Int(o.height) * 3
        var pixels = [[UInt8]](repeating: [UInt8](repeating: 0, count: size), count: n)
        let box = o.progress.map { ProgressBox($0) }
        try o.prompt.withCString { prompt in
            try o.negativePrompt.withCString { negative in
                p.prompt = prompt
                p.negative_prompt = negative
                if let box = box {
                    p.progress = progressTrampoline
                    p.progress_user_data = Unmanaged.passUnretained(box).toOpaque()
                }
                let latents = o.latents ?? []
                try latents.withUnsafeBufferPointer { l in
                    p.latents = o.latents == nil ? nil : l.baseAddress
                    p.latents_len = o.latents == nil ? 0 : l.count
                    // One C buffer per image, copied out afterwards.
                    let buffers = (0..<n).map { _ in UnsafeMutablePointer<UInt8>.allocate(capacity: size) }
                    defer { buffers.forEach { $0.deallocate() } }
                    var images = buffers.map { b -> hdb_image in
                        var im = hdb_image()
                        im.data = b
                        im.data_len = size
                        return im
                    }
                    try check(hdb_generate(handle, &p, &images, n))
                    for i in 0..<n { pixels[i] = Array(UnsafeBufferPointer(start: buffers[i], count: size)) }
                }
            }
        }
        withExtendedLifetime(box) {}
        return pixels.map { Image(width: Int(o.width), height: Int(o.height), rgb: $0) }
    }

    /// One UNet evaluation (hdb_session_unet); shapes as there.
    public func unet(sample: [Float], timesteps: [Float], context: [Float], batch: UInt32, height: UInt32, width: UInt32, contextTokens: UInt32) throws -> [Float] {
        var out = [Float](repeating: 0, count: sample.count)
        try check(hdb_session_unet(handle, sample, sample.count, timesteps, timesteps.count, context, context.count,
                                   batch, height, width, contextTokens, &out, out.count))
        return out
    }

    public func cancel() { _ = hdb_session_cancel(handle) }

    deinit { hdb_session_free(handle) }
}

/// The log closure hdb holds; hdb's destructor releases it once no thread is inside it.
final class LogBox {
    let fn: (LogLevel, String, String) -> Void
    init(_ fn: @escaping (LogLevel, String, String) -> Void) { self.fn = fn }
}

/// Sends hdb's log records up to maxLevel to fn (from any thread); nil stops logging.
public func setLogCallback(_ fn: ((LogLevel, String, String) -> Void)?, maxLevel: LogLevel = .info) throws {
    guard let fn = fn, maxLevel != .off else {
        try check(hdb_set_log_callback_ex(nil, nil, nil, LogLevel.off.rawValue))
        return
    }
    let ud = Unmanaged.passRetained(LogBox(fn)).toOpaque()
    let s = hdb_set_log_callback_ex({ ud, level, target, message in
        let box = Unmanaged<LogBox>.fromOpaque(ud!).takeUnretainedValue()
        box.fn(LogLevel(rawValue: level) ?? .trace, target.map { String(cString: $0) } ?? "",
               message.map { String(cString: $0) } ?? "")
    }, ud, { ud in
        Unmanaged<LogBox>.fromOpaque(ud!).release()
    }, maxLevel.rawValue)
    if s != 0 { Unmanaged<LogBox>.fromOpaque(ud).release() } // not stored: still ours
    try check(s)
}
