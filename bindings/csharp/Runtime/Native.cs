// P/Invoke declarations of include/hdb.h. Structs are blittable and start with StructSize,
// filled by the hdb_*_params_init functions; strings in structs are UTF-8 IntPtrs (Utf8.Alloc),
// never LPStr (ANSI on Windows). bool returns of callbacks are C's one-byte _Bool: the
// delegates say [return: MarshalAs(UnmanagedType.I1)].
using System;
using System.Runtime.InteropServices;

namespace Hdb
{
    /// <summary>hdb_status.</summary>
    public enum Status : uint
    {
        Ok = 0,
        NullArgument = 1,
        InvalidArgument = 2,
        FileNotFound = 3,
        IoError = 4,
        InvalidFile = 5,
        NotAModel = 6,
        UnsupportedDtype = 7,
        InvalidModel = 8,
        Unsupported = 9,
        AdapterMismatch = 10,
        NoDevice = 11,
        DeviceError = 12,
        OutOfMemory = 13,
        Cancelled = 14,
        BufferTooSmall = 15,
        Panic = 16,
        Internal = 17,
        Busy = 18,
        Diverged = 19,
    }

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    [return: MarshalAs(UnmanagedType.I1)]
    internal delegate bool ProgressFn(IntPtr userData, ulong done, ulong total, IntPtr stage);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    [return: MarshalAs(UnmanagedType.I1)]
    internal delegate bool TrainProgressFn(IntPtr userData, ulong step, ulong steps, float loss);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void LogFn(IntPtr userData, uint level, IntPtr target, IntPtr message);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void FreeFn(IntPtr userData);

    /// <summary>IL2CPP needs this on static methods called from native code; it is matched by
    /// name, so Unity's AOT.MonoPInvokeCallbackAttribute is not required.</summary>
    [AttributeUsage(AttributeTargets.Method)]
    internal sealed class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type type) { Type = type; }
        public Type Type { get; private set; }
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct RuntimeParams
    {
        public uint StructSize;
        public uint NumThreads;
        public IntPtr Device;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct ModelParams
    {
        public uint StructSize;
        public uint WeightsVariant;
        public IntPtr Progress;
        public IntPtr ProgressUserData;
        public uint Storage;
        public uint Reserved;
        public IntPtr Tokenizer;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct AdapterLoadParams
    {
        public uint StructSize;
        public uint AllowUnmatched;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct SessionParams
    {
        public uint StructSize;
        public uint Reserved;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct GenerateParams
    {
        public uint StructSize;
        public uint Steps;
        public float Guidance;
        public uint Sampler;
        public ulong Seed;
        public uint Width;
        public uint Height;
        public uint Batch;
        public uint Reserved;
        public IntPtr Prompt;
        public IntPtr NegativePrompt;
        public IntPtr Latents;
        public UIntPtr LatentsLen;
        public IntPtr Progress;
        public IntPtr ProgressUserData;
        public uint ProgressStages;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct PredictParams
    {
        public uint StructSize;
        public uint Iterations;
        public IntPtr Progress;
        public IntPtr ProgressUserData;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct FinetuneParams
    {
        public uint StructSize;
        public uint Mode;
        public uint Steps;
        public uint Rank;
        public float Lr;
        public float WeightDecay;
        public float MaxGradNorm;
        public uint LrSchedule;
        public uint WarmupSteps;
        public uint Resolution;
        public uint Checkpointing;
        public ulong Seed;
        public IntPtr Prompt;
        public IntPtr Token;
        public IntPtr Progress;
        public IntPtr ProgressUserData;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeImage
    {
        public IntPtr Data;
        public UIntPtr DataLen;
        public uint Width;
        public uint Height;
        public uint Stride;
        public uint Format;
    }

    /// <summary>hdb_component_info.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct ComponentInfo
    {
        public uint Present;
        public uint Dtype;
        public ulong TensorCount;
        public ulong ParameterCount;
    }

    /// <summary>hdb_model_info.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct ModelInfo
    {
        public uint StructSize;
        public uint Architecture;
        public uint SourceFormat;
        public uint CrossAttentionDim;
        public uint HasTokenizer;
        public uint Reserved0;
        public ComponentInfo Unet;
        public ComponentInfo TextEncoder;
        public ComponentInfo Vae;
    }

    /// <summary>hdb_runtime_info.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct RuntimeInfo
    {
        public uint StructSize;
        public uint DeviceKind;
        public uint DeviceIndex;
        public uint NumThreads;
    }

    internal static class Native
    {
        const string Lib = "hdb";

        /// <summary>The native size of a params struct: the <c>size</c> of hdb_*_params_init.</summary>
        internal static UIntPtr SizeOf<T>(T v) where T : struct { return (UIntPtr)Marshal.SizeOf(typeof(T)); }

        [DllImport(Lib)] internal static extern Status hdb_runtime_params_init(ref RuntimeParams p, UIntPtr size);
        [DllImport(Lib)] internal static extern RuntimeParams hdb_runtime_params_default();
        [DllImport(Lib)] internal static extern Status hdb_runtime_new(ref RuntimeParams p, out RuntimeHandle rt);
        [DllImport(Lib)] internal static extern Status hdb_runtime_get_info(RuntimeHandle rt, ref RuntimeInfo info);
        [DllImport(Lib)] internal static extern void hdb_runtime_free(IntPtr rt);

        [DllImport(Lib)] internal static extern Status hdb_model_params_init(ref ModelParams p, UIntPtr size);
        [DllImport(Lib)] internal static extern ModelParams hdb_model_params_default();
        [DllImport(Lib)] internal static extern Status hdb_model_load(RuntimeHandle rt, byte[] path, ref ModelParams p, out ModelHandle m);
        [DllImport(Lib)] internal static extern Status hdb_model_load_from_memory(RuntimeHandle rt, byte[] bytes, UIntPtr len, byte[] name, ref ModelParams p, out ModelHandle m);
        [DllImport(Lib)] internal static extern Status hdb_model_get_info(ModelHandle m, ref ModelInfo info);
        [DllImport(Lib)] internal static extern Status hdb_model_describe(ModelHandle m, byte[] buf, UIntPtr len, out UIntPtr needed);
        [DllImport(Lib)] internal static extern void hdb_model_free(IntPtr m);

        [DllImport(Lib)] internal static extern Status hdb_adapter_load(ModelHandle m, byte[] path, out AdapterHandle a);
        [DllImport(Lib)] internal static extern Status hdb_adapter_load_params_init(ref AdapterLoadParams p, UIntPtr size);
        [DllImport(Lib)] internal static extern AdapterLoadParams hdb_adapter_load_params_default();
        [DllImport(Lib)] internal static extern Status hdb_adapter_load_ex(ModelHandle m, byte[] path, ref AdapterLoadParams p, out AdapterHandle a);
        [DllImport(Lib)] internal static extern Status hdb_adapter_load_from_memory(ModelHandle m, byte[] bytes, UIntPtr len, out AdapterHandle a);
        [DllImport(Lib)] internal static extern Status hdb_adapter_save(AdapterHandle a, byte[] path);
        [DllImport(Lib)] internal static extern void hdb_adapter_free(IntPtr a);

        [DllImport(Lib)] internal static extern Status hdb_hypernet_load(RuntimeHandle rt, byte[] path, out HypernetHandle h);
        [DllImport(Lib)] internal static extern Status hdb_predict_params_init(ref PredictParams p, UIntPtr size);
        [DllImport(Lib)] internal static extern PredictParams hdb_predict_params_default();
        [DllImport(Lib)] internal static extern Status hdb_hypernet_predict(HypernetHandle h, ModelHandle m, ref NativeImage face, ref PredictParams p, out AdapterHandle a);
        [DllImport(Lib)] internal static extern void hdb_hypernet_free(IntPtr h);

        [DllImport(Lib)] internal static extern Status hdb_finetune_params_init(ref FinetuneParams p, UIntPtr size);
        [DllImport(Lib)] internal static extern FinetuneParams hdb_finetune_params_default();
        [DllImport(Lib)] internal static extern Status hdb_finetune(ModelHandle m, ref NativeImage face, IntPtr start, ref FinetuneParams p, out AdapterHandle a);
        [DllImport(Lib)] internal static extern Status hdb_personalize(HypernetHandle h, ModelHandle m, ref NativeImage face, ref PredictParams pp, ref FinetuneParams fp, out AdapterHandle a);

        [DllImport(Lib)] internal static extern Status hdb_session_params_init(ref SessionParams p, UIntPtr size);
        [DllImport(Lib)] internal static extern SessionParams hdb_session_params_default();
        [DllImport(Lib)] internal static extern Status hdb_session_new(ModelHandle m, ref SessionParams p, out SessionHandle s);
        [DllImport(Lib)] internal static extern Status hdb_session_set_adapters(SessionHandle s, IntPtr[] adapters, float[] scales, UIntPtr n, uint mode);
        [DllImport(Lib)] internal static extern Status hdb_session_set_sample_adapters(SessionHandle s, int[] indices, UIntPtr n);
        [DllImport(Lib)] internal static extern Status hdb_generate_params_init(ref GenerateParams p, UIntPtr size);
        [DllImport(Lib)] internal static extern GenerateParams hdb_generate_params_default();
        [DllImport(Lib)] internal static extern Status hdb_generate(SessionHandle s, ref GenerateParams p, [In, Out] NativeImage[] images, UIntPtr n);
        [DllImport(Lib)] internal static extern Status hdb_session_unet(SessionHandle s, float[] sample, UIntPtr sampleLen, float[] timesteps, UIntPtr timestepsLen, float[] context, UIntPtr contextLen, uint batch, uint height, uint width, uint contextTokens, [Out] float[] output, UIntPtr outLen);
        [DllImport(Lib)] internal static extern Status hdb_session_cancel(SessionHandle s);
        [DllImport(Lib)] internal static extern void hdb_session_free(IntPtr s);

        [DllImport(Lib)] internal static extern UIntPtr hdb_last_error_copy(byte[] buf, UIntPtr len);
        [DllImport(Lib)] internal static extern Status hdb_set_log_callback_ex(LogFn fn, IntPtr userData, FreeFn free, uint maxLevel);
        [DllImport(Lib)] internal static extern IntPtr hdb_status_name(uint status);
        [DllImport(Lib)] internal static extern IntPtr hdb_version_string();
        [DllImport(Lib)] internal static extern uint hdb_abi_version();
    }

    /// <summary>UTF-8 strings in unmanaged memory (Marshal's string helpers are ANSI or
    /// UTF-16 on older runtimes).</summary>
    internal static class Utf8
    {
        internal static byte[] Bytes(string s)
        {
            var b = System.Text.Encoding.UTF8.GetBytes(s);
            Array.Resize(ref b, b.Length + 1); // the NUL
            return b;
        }

        internal static IntPtr Alloc(string s)
        {
            if (s == null) return IntPtr.Zero;
            var b = Bytes(s);
            var p = Marshal.AllocHGlobal(b.Length);
            Marshal.Copy(b, 0, p, b.Length);
            return p;
        }

        internal static string Read(IntPtr p)
        {
            if (p == IntPtr.Zero) return null;
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var b = new byte[n];
            Marshal.Copy(p, b, 0, n);
            return System.Text.Encoding.UTF8.GetString(b);
        }
    }
}
