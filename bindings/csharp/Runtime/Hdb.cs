// The C# binding of hdb (include/hdb.h's rules apply): SafeHandles, exceptions carrying the
// failing call's message, callbacks through static trampolines safe under IL2CPP.
//
// Error messages: every wrapper reads hdb_last_error_copy in the same synchronous method,
// right after the P/Invoke, with no await between (a .NET task may resume on another thread).
// Callbacks: static delegates (never collected) marked [MonoPInvokeCallback]; the user's
// callback travels as a GCHandle in user_data; an exception inside it is caught in the
// trampoline (a progress callback that throws cancels the call, and the exception is rethrown
// from the call).
using System;
using System.Runtime.InteropServices;
using System.Threading;
using Microsoft.Win32.SafeHandles;

namespace Hdb
{
    public sealed class RuntimeHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public RuntimeHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.hdb_runtime_free(handle); return true; }
    }

    public sealed class ModelHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public ModelHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.hdb_model_free(handle); return true; }
    }

    public sealed class AdapterHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public AdapterHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.hdb_adapter_free(handle); return true; }
    }

    public sealed class HypernetHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public HypernetHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.hdb_hypernet_free(handle); return true; }
    }

    public sealed class SessionHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public SessionHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.hdb_session_free(handle); return true; }
    }

    /// <summary>A failed hdb call: its status and hdb's message.</summary>
    public class HdbException : Exception
    {
        public Status Status { get; private set; }
        public string HdbMessage { get; private set; }

        public HdbException(Status status, string message, Exception inner = null)
            : base(Library.StatusName(status) + ": " + message, inner)
        {
            Status = status;
            HdbMessage = message;
        }

        /// <summary>Throws for a failed status; call right after the P/Invoke, on its thread.</summary>
        internal static void Check(Status s, ProgressState progress = null)
        {
            if (progress != null && progress.Error != null)
                throw new HdbException(Status.Cancelled, "the progress callback threw", progress.Error);
            if (s != Status.Ok) throw new HdbException(s, LastError());
        }

        internal static string LastError()
        {
            var buf = new byte[512];
            ulong n = (ulong)Native.hdb_last_error_copy(buf, (UIntPtr)buf.Length);
            if (n >= (ulong)buf.Length)
            {
                buf = new byte[n + 1];
                n = (ulong)Native.hdb_last_error_copy(buf, (UIntPtr)buf.Length);
            }
            return System.Text.Encoding.UTF8.GetString(buf, 0, (int)Math.Min(n, (ulong)buf.Length - 1));
        }
    }

    public delegate bool Progress(ulong done, ulong total, string stage);
    public delegate bool TrainProgress(ulong step, ulong steps, float loss);
    public delegate void Log(uint level, string target, string message);

    /// <summary>One call's progress callback, pinned by a GCHandle while hdb may call it.</summary>
    internal sealed class ProgressState : IDisposable
    {
        internal readonly Delegate Callback;
        internal Exception Error;
        readonly GCHandle self;

        internal ProgressState(Delegate cb) { Callback = cb; self = GCHandle.Alloc(this); }
        internal IntPtr UserData { get { return GCHandle.ToIntPtr(self); } }
        public void Dispose() { if (self.IsAllocated) self.Free(); }

        // Kept in static fields: the GC never moves or collects them.
        internal static readonly ProgressFn ProgressTrampoline = OnProgress;
        internal static readonly TrainProgressFn TrainTrampoline = OnTrain;
        internal static readonly IntPtr ProgressPtr = Marshal.GetFunctionPointerForDelegate(ProgressTrampoline);
        internal static readonly IntPtr TrainPtr = Marshal.GetFunctionPointerForDelegate(TrainTrampoline);

        [MonoPInvokeCallback(typeof(ProgressFn))]
        static bool OnProgress(IntPtr ud, ulong done, ulong total, IntPtr stage)
        {
            var st = (ProgressState)GCHandle.FromIntPtr(ud).Target;
            try { return ((Progress)st.Callback)(done, total, Utf8.Read(stage)); }
            catch (Exception e) { st.Error = e; return false; } // must not unwind into hdb
        }

        [MonoPInvokeCallback(typeof(TrainProgressFn))]
        static bool OnTrain(IntPtr ud, ulong step, ulong steps, float loss)
        {
            var st = (ProgressState)GCHandle.FromIntPtr(ud).Target;
            try { return ((TrainProgress)st.Callback)(step, steps, loss); }
            catch (Exception e) { st.Error = e; return false; }
        }
    }

    /// <summary>Process-wide functions.</summary>
    public static class Library
    {
        public static string Version { get { return Utf8.Read(Native.hdb_version_string()); } }
        public static uint AbiVersion { get { return Native.hdb_abi_version(); } }
        /// <summary>The ABI this binding was written against.</summary>
        public const uint HeaderAbiVersion = 1;
        public static string StatusName(Status s) { return Utf8.Read(Native.hdb_status_name((uint)s)); }

        static readonly LogFn LogTrampoline = OnLog;
        static readonly FreeFn FreeTrampoline = OnFree;
        static int liveLogCallbacks;
        /// <summary>Log callbacks hdb still holds (released by its user-data destructor).</summary>
        public static int LiveLogCallbacks { get { return Volatile.Read(ref liveLogCallbacks); } }

        [MonoPInvokeCallback(typeof(LogFn))]
        static void OnLog(IntPtr ud, uint level, IntPtr target, IntPtr message)
        {
            try { ((Log)GCHandle.FromIntPtr(ud).Target)(level, Utf8.Read(target), Utf8.Read(message)); }
            catch (Exception) { } // a record is not worth the process: dropped
        }

        [MonoPInvokeCallback(typeof(FreeFn))]
        static void OnFree(IntPtr ud)
        {
            GCHandle.FromIntPtr(ud).Free();
            Interlocked.Decrement(ref liveLogCallbacks);
        }

        /// <summary>Sends log records up to maxLevel (1 error .. 5 trace) to fn, from any thread;
        /// null stops logging.</summary>
        public static void SetLogCallback(Log fn, uint maxLevel)
        {
            if (fn == null || maxLevel == 0)
            {
                HdbException.Check(Native.hdb_set_log_callback_ex(null, IntPtr.Zero, null, 0));
                return;
            }
            var h = GCHandle.Alloc(fn);
            Interlocked.Increment(ref liveLogCallbacks);
            var s = Native.hdb_set_log_callback_ex(LogTrampoline, GCHandle.ToIntPtr(h), FreeTrampoline, maxLevel);
            if (s != Status.Ok)
            {
                h.Free(); // not stored: still ours
                Interlocked.Decrement(ref liveLogCallbacks);
            }
            HdbException.Check(s);
        }
    }

    /// <summary>A device ("auto", "cpu", "cuda", "cuda:N") and CPU threads.</summary>
    public sealed class Runtime : IDisposable
    {
        internal readonly RuntimeHandle Handle;

        public Runtime(string device = "auto", uint numThreads = 0)
        {
            var p = new RuntimeParams();
            Native.hdb_runtime_params_init(ref p, Native.SizeOf(p));
            p.NumThreads = numThreads;
            p.Device = Utf8.Alloc(device);
            try { HdbException.Check(Native.hdb_runtime_new(ref p, out Handle)); }
            finally { Marshal.FreeHGlobal(p.Device); }
        }

        public RuntimeInfo Info()
        {
            var i = new RuntimeInfo { StructSize = (uint)Marshal.SizeOf(typeof(RuntimeInfo)) };
            HdbException.Check(Native.hdb_runtime_get_info(Handle, ref i));
            return i;
        }

        public void Dispose() { Handle.Dispose(); }
    }

    public sealed class Model : IDisposable
    {
        internal readonly ModelHandle Handle;

        /// <summary>tokenizer: a tokenizer folder (or a diffusers folder with tokenizer/) used
        /// instead of the model's own; null: the model's, else the built-in CLIP tokenizer for SD 1.x.</summary>
        public Model(Runtime rt, string path, uint weightsVariant = 0, uint storage = 0, Progress progress = null,
            string tokenizer = null)
        {
            var p = new ModelParams();
            Native.hdb_model_params_init(ref p, Native.SizeOf(p));
            p.WeightsVariant = weightsVariant;
            p.Storage = storage;
            p.Tokenizer = Utf8.Alloc(tokenizer);
            try
            {
                using (var st = progress != null ? new ProgressState(progress) : null)
                {
                    if (st != null) { p.Progress = ProgressState.ProgressPtr; p.ProgressUserData = st.UserData; }
                    var s = Native.hdb_model_load(rt.Handle, Utf8.Bytes(path), ref p, out Handle);
                    HdbException.Check(s, st);
                }
            }
            finally { Marshal.FreeHGlobal(p.Tokenizer); }
        }

        Model(ModelHandle h) { Handle = h; }

        /// <summary>An LDM single-file checkpoint from its bytes (copied); name stands for its
        /// path in messages (null: "&lt;memory&gt;").</summary>
        public static Model FromBytes(Runtime rt, byte[] data, string name = null, Progress progress = null)
        {
            var p = new ModelParams();
            Native.hdb_model_params_init(ref p, Native.SizeOf(p));
            using (var st = progress != null ? new ProgressState(progress) : null)
            {
                if (st != null) { p.Progress = ProgressState.ProgressPtr; p.ProgressUserData = st.UserData; }
                ModelHandle h;
                var s = Native.hdb_model_load_from_memory(rt.Handle, data, (UIntPtr)data.Length,
                    name == null ? null : Utf8.Bytes(name), ref p, out h);
                HdbException.Check(s, st);
                return new Model(h);
            }
        }

        public ModelInfo Info()
        {
            var i = new ModelInfo { StructSize = (uint)Marshal.SizeOf(typeof(ModelInfo)) };
            HdbException.Check(Native.hdb_model_get_info(Handle, ref i));
            return i;
        }

        /// <summary>The model's JSON description.</summary>
        public string Describe()
        {
            UIntPtr needed;
            var s = Native.hdb_model_describe(Handle, null, UIntPtr.Zero, out needed);
            if (s != Status.BufferTooSmall) HdbException.Check(s);
            var buf = new byte[(ulong)needed];
            HdbException.Check(Native.hdb_model_describe(Handle, buf, (UIntPtr)buf.Length, out needed));
            return System.Text.Encoding.UTF8.GetString(buf, 0, Math.Max(0, (int)(ulong)needed - 1));
        }

        public void Dispose() { Handle.Dispose(); }
    }

    public sealed class Adapter : IDisposable
    {
        internal readonly AdapterHandle Handle;
        Adapter(AdapterHandle h) { Handle = h; }

        public static Adapter Load(Model model, string path)
        {
            AdapterHandle h;
            HdbException.Check(Native.hdb_adapter_load(model.Handle, Utf8.Bytes(path), out h));
            return new Adapter(h);
        }

        /// <summary>allowUnmatched: skip the keys of a LoRA file that match no layer of the model
        /// (logged as warnings) instead of refusing the file (hdb_adapter_load_ex).</summary>
        public static Adapter Load(Model model, string path, bool allowUnmatched)
        {
            var p = new AdapterLoadParams();
            Native.hdb_adapter_load_params_init(ref p, Native.SizeOf(p));
            p.AllowUnmatched = allowUnmatched ? 1u : 0u;
            AdapterHandle h;
            HdbException.Check(Native.hdb_adapter_load_ex(model.Handle, Utf8.Bytes(path), ref p, out h));
            return new Adapter(h);
        }

        public static Adapter FromBytes(Model model, byte[] data)
        {
            AdapterHandle h;
            HdbException.Check(Native.hdb_adapter_load_from_memory(model.Handle, data, (UIntPtr)data.Length, out h));
            return new Adapter(h);
        }

        internal static Adapter Wrap(AdapterHandle h) { return new Adapter(h); }

        public void Save(string path) { HdbException.Check(Native.hdb_adapter_save(Handle, Utf8.Bytes(path))); }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>An RGB8 image, rows packed (Width * 3 bytes), top row first.</summary>
    public sealed class Image
    {
        public int Width, Height;
        public byte[] Rgb;

        /// <summary>Runs f with a NativeImage over the pinned pixels.</summary>
        internal T With<T>(Func<NativeImage, T> f)
        {
            var pin = GCHandle.Alloc(Rgb, GCHandleType.Pinned);
            try
            {
                var im = new NativeImage
                {
                    Data = pin.AddrOfPinnedObject(), DataLen = (UIntPtr)Rgb.Length, Width = (uint)Width,
                    Height = (uint)Height, Stride = (uint)(Width * 3), Format = 0,
                };
                return f(im);
            }
            finally { pin.Free(); }
        }
    }

    public sealed class FinetuneOptions
    {
        public uint Mode, Steps, Rank, LrSchedule, WarmupSteps, Resolution;
        public float Lr;
        public float? WeightDecay, MaxGradNorm;
        public bool Checkpointing = true;
        public ulong Seed;
        public string Prompt, Token;
        public TrainProgress Progress;

        internal FinetuneParams ToNative(out IntPtr[] strings)
        {
            var p = new FinetuneParams();
            Native.hdb_finetune_params_init(ref p, Native.SizeOf(p));
            p.Mode = Mode; p.Steps = Steps; p.Rank = Rank; p.Lr = Lr;
            if (WeightDecay.HasValue) p.WeightDecay = WeightDecay.Value;
            if (MaxGradNorm.HasValue) p.MaxGradNorm = MaxGradNorm.Value;
            p.LrSchedule = LrSchedule; p.WarmupSteps = WarmupSteps; p.Resolution = Resolution;
            p.Checkpointing = Checkpointing ? 1u : 0u;
            p.Seed = Seed;
            p.Prompt = Utf8.Alloc(Prompt);
            p.Token = Utf8.Alloc(Token);
            strings = new[] { p.Prompt, p.Token };
            return p;
        }
    }

    public static class Training
    {
        /// <summary>Trains an identity on a face: rank-relaxed from start, or LiDB from zero (null).</summary>
        public static Adapter Finetune(Model model, Image face, Adapter start, FinetuneOptions opts = null)
        {
            opts = opts ?? new FinetuneOptions();
            IntPtr[] strings;
            var p = opts.ToNative(out strings);
            bool added = false;
            // The start adapter's handle is passed raw: keep it alive and counted meanwhile.
            if (start != null) start.Handle.DangerousAddRef(ref added);
            try
            {
                using (var st = opts.Progress != null ? new ProgressState(opts.Progress) : null)
                {
                    if (st != null) { p.Progress = ProgressState.TrainPtr; p.ProgressUserData = st.UserData; }
                    IntPtr raw = start != null ? start.Handle.DangerousGetHandle() : IntPtr.Zero;
                    return face.With(im =>
                    {
                        AdapterHandle h;
                        var s = Native.hdb_finetune(model.Handle, ref im, raw, ref p, out h);
                        HdbException.Check(s, st);
                        return Adapter.Wrap(h);
                    });
                }
            }
            finally
            {
                if (added) start.Handle.DangerousRelease();
                foreach (var s in strings) Marshal.FreeHGlobal(s);
            }
        }
    }

    public sealed class Hypernet : IDisposable
    {
        internal readonly HypernetHandle Handle;

        public Hypernet(Runtime rt, string path)
        {
            HdbException.Check(Native.hdb_hypernet_load(rt.Handle, Utf8.Bytes(path), out Handle));
        }

        public Adapter Predict(Model model, Image face, uint iterations = 0)
        {
            var p = new PredictParams();
            Native.hdb_predict_params_init(ref p, Native.SizeOf(p));
            p.Iterations = iterations;
            return face.With(im =>
            {
                AdapterHandle h;
                HdbException.Check(Native.hdb_hypernet_predict(Handle, model.Handle, ref im, ref p, out h));
                return Adapter.Wrap(h);
            });
        }

        public Adapter Personalize(Model model, Image face, uint iterations = 0, FinetuneOptions opts = null)
        {
            var pp = new PredictParams();
            Native.hdb_predict_params_init(ref pp, Native.SizeOf(pp));
            pp.Iterations = iterations;
            opts = opts ?? new FinetuneOptions();
            IntPtr[] strings;
            var fp = opts.ToNative(out strings);
            try
            {
                using (var st = opts.Progress != null ? new ProgressState(opts.Progress) : null)
                {
                    if (st != null) { fp.Progress = ProgressState.TrainPtr; fp.ProgressUserData = st.UserData; }
                    return face.With(im =>
                    {
                        AdapterHandle h;
                        var s = Native.hdb_personalize(Handle, model.Handle, ref im, ref pp, ref fp, out h);
                        HdbException.Check(s, st);
                        return Adapter.Wrap(h);
                    });
                }
            }
            finally { foreach (var s in strings) Marshal.FreeHGlobal(s); }
        }

        public void Dispose() { Handle.Dispose(); }
    }

    public sealed class GenerateOptions
    {
        public string Prompt = "", NegativePrompt = "";
        public uint Steps = 25, Width = 512, Height = 512, Batch = 1;
        public float Guidance = 7.5f;
        /// <summary>HDB_SAMPLER_*: 0 DDIM, 1 Euler, 2 Euler ancestral, 3 DPM++ 2M, 4 its Karras form.</summary>
        public uint Sampler = 2;
        public ulong Seed;
        public float[] Latents;
        public Progress Progress;
        /// <summary>Progress for every phase ("build", "text", "denoise", "decode"), each when it
        /// starts (done 0) and after each unit; false: the denoising steps only.</summary>
        public bool ProgressStages;
    }

    /// <summary>One thread's adapters on a model. Cancel() may be called from any thread.</summary>
    public sealed class Session : IDisposable
    {
        internal readonly SessionHandle Handle;

        public Session(Model model)
        {
            var p = new SessionParams();
            Native.hdb_session_params_init(ref p, Native.SizeOf(p));
            HdbException.Check(Native.hdb_session_new(model.Handle, ref p, out Handle));
        }

        /// <summary>mode: 0 merge, 1 runtime. An empty array removes the adapters.</summary>
        public void SetAdapters(Adapter[] adapters, float[] scales = null, uint mode = 0)
        {
            if (scales != null && scales.Length != adapters.Length)
                throw new ArgumentException("scales: must be null or one per adapter");
            // An array of SafeHandles is not marshaled: pass raw pointers, each AddRef'd so a
            // concurrent Dispose cannot free one during the call.
            var raw = new IntPtr[Math.Max(adapters.Length, 1)];
            var added = new bool[adapters.Length];
            try
            {
                for (int i = 0; i < adapters.Length; i++)
                {
                    adapters[i].Handle.DangerousAddRef(ref added[i]);
                    raw[i] = adapters[i].Handle.DangerousGetHandle();
                }
                HdbException.Check(Native.hdb_session_set_adapters(Handle, raw, scales, (UIntPtr)adapters.Length, mode));
            }
            finally
            {
                for (int i = 0; i < adapters.Length; i++)
                    if (added[i]) adapters[i].Handle.DangerousRelease();
            }
        }

        public void SetSampleAdapters(int[] indices)
        {
            HdbException.Check(Native.hdb_session_set_sample_adapters(Handle, indices,
                (UIntPtr)(indices == null ? 0 : indices.Length)));
        }

        public Image[] Generate(GenerateOptions o)
        {
            var p = new GenerateParams();
            Native.hdb_generate_params_init(ref p, Native.SizeOf(p));
            p.Steps = o.Steps; p.Guidance = o.Guidance; p.Sampler = o.Sampler; p.Seed = o.Seed;
            p.Width = o.Width; p.Height = o.Height; p.Batch = o.Batch; p.Reserved = 0;
            p.ProgressStages = o.ProgressStages ? 1u : 0u;
            p.Prompt = Utf8.Alloc(o.Prompt);
            p.NegativePrompt = Utf8.Alloc(o.NegativePrompt);
            var images = new Image[o.Batch];
            var pins = new GCHandle[o.Batch + 1];
            var native = new NativeImage[o.Batch];
            try
            {
                if (o.Latents != null)
                {
                    pins[o.Batch] = GCHandle.Alloc(o.Latents, GCHandleType.Pinned);
                    p.Latents = pins[o.Batch].AddrOfPinnedObject();
                    p.LatentsLen = (UIntPtr)o.Latents.Length;
                }
                for (int i = 0; i < o.Batch; i++)
                {
                    images[i] = new Image { Width = (int)o.Width, Height = (int)o.Height, Rgb = new byte[o.Width * o.Height * 3] };
                    pins[i] = GCHandle.Alloc(images[i].Rgb, GCHandleType.Pinned);
                    native[i].Data = pins[i].AddrOfPinnedObject();
                    native[i].DataLen = (UIntPtr)images[i].Rgb.Length;
                }
                using (var st = o.Progress != null ? new ProgressState(o.Progress) : null)
                {
                    if (st != null) { p.Progress = ProgressState.ProgressPtr; p.ProgressUserData = st.UserData; }
                    var s = Native.hdb_generate(Handle, ref p, native, (UIntPtr)native.Length);
                    HdbException.Check(s, st);
                }
                return images;
            }
            finally
            {
                foreach (var pin in pins) if (pin.IsAllocated) pin.Free();
                Marshal.FreeHGlobal(p.Prompt);
                Marshal.FreeHGlobal(p.NegativePrompt);
            }
        }

        /// <summary>One UNet evaluation (hdb_session_unet); shapes as there.</summary>
        public float[] Unet(float[] sample, float[] timesteps, float[] context, uint batch, uint height, uint width, uint contextTokens)
        {
            var output = new float[sample.Length];
            HdbException.Check(Native.hdb_session_unet(Handle, sample, (UIntPtr)sample.Length, timesteps,
                (UIntPtr)timesteps.Length, context, (UIntPtr)context.Length, batch, height, width, contextTokens,
                output, (UIntPtr)output.Length));
            return output;
        }

        /// <summary>Cancels the call running on this session (any thread).</summary>
        public void Cancel() { Native.hdb_session_cancel(Handle); }

        public void Dispose() { Handle.Dispose(); }
    }
}
