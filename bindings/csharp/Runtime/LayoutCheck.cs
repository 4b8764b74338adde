using System.IO;
using System.Runtime.InteropServices;

namespace Hdb
{
    /// <summary>Compares each params struct's managed size with the struct_size the library
    /// writes (sizeof in C); a mismatch means this binding's layout is out of date.</summary>
    public static class LayoutCheck
    {
        public static bool AllMatch(TextWriter log)
        {
            bool ok = true;
            ok &= Same("runtime", Native.hdb_runtime_params_default().StructSize, Marshal.SizeOf(typeof(RuntimeParams)), log);
            ok &= Same("model", Native.hdb_model_params_default().StructSize, Marshal.SizeOf(typeof(ModelParams)), log);
            ok &= Same("session", Native.hdb_session_params_default().StructSize, Marshal.SizeOf(typeof(SessionParams)), log);
            ok &= Same("generate", Native.hdb_generate_params_default().StructSize, Marshal.SizeOf(typeof(GenerateParams)), log);
            ok &= Same("predict", Native.hdb_predict_params_default().StructSize, Marshal.SizeOf(typeof(PredictParams)), log);
            ok &= Same("finetune", Native.hdb_finetune_params_default().StructSize, Marshal.SizeOf(typeof(FinetuneParams)), log);
            return ok;
        }

        static bool Same(string name, uint native, int managed, TextWriter log)
        {
            if (native == managed) return true;
            log.WriteLine("hdb_" + name + "_params: library " + native + " bytes, C# " + managed);
            return false;
        }
    }
}
