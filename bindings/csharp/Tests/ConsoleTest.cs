// The C# binding on the tiny SD fixture, as a mono console program (scripts/test-bindings.sh
// compiles it with mcs and runs it). Usage: ConsoleTest.exe <tests/fixtures>.
using System;
using System.IO;
using System.Linq;
using System.Runtime.InteropServices;
using System.Threading;
using System.Threading.Tasks;
using Hdb;

static class ConsoleTest
{
    static int checks;

    static void Check(bool cond, string what, string detail = "")
    {
        if (!cond)
        {
            Console.Error.WriteLine("FAIL: " + what + " " + detail);
            Environment.Exit(1);
        }
        Console.WriteLine("ok " + (++checks) + ": " + what);
    }

    static HdbException Throws(Action a)
    {
        try { a(); } catch (HdbException e) { return e; }
        return null;
    }

    static GenerateOptions Small(ulong seed)
    {
        return new GenerateOptions { Prompt = "a photo of sks person", Steps = 2, Width = 64, Height = 64, Seed = seed, Sampler = 0 };
    }

    static int Main(string[] args)
    {
        string fixtures = args[0];
        Check(Library.AbiVersion == Library.HeaderAbiVersion, "ABI version matches");
        foreach (Status s in Enum.GetValues(typeof(Status)))
        {
            string want = "HDB_STATUS_" + string.Concat(s.ToString().Select((c, i) => i > 0 && char.IsUpper(c) ? "_" + c : c.ToString())).ToUpperInvariant();
            if (Library.StatusName(s) != want) Check(false, "status name of " + s, Library.StatusName(s) + " != " + want);
        }
        Check(true, "status names match the library");

        // Layouts: hdb writes struct_size = sizeof in C.
        Check(Native_SizeOk(), "struct layouts match the library's struct_size");

        int records = 0;
        Library.SetLogCallback((level, target, msg) => { Interlocked.Increment(ref records); if (level == 5) throw new Exception("dropped"); }, 5);

        using (var rt = new Runtime("cpu", 2))
        using (var model = new Model(rt, Path.Combine(fixtures, "tiny-sd")))
        using (var session = new Session(model))
        {
            Check(rt.Info().NumThreads == 2, "runtime info");
            Check(model.Info().Architecture == 1 && model.Info().Unet.ParameterCount > 0, "model info");
            Check(model.Describe().StartsWith("{"), "describe gives JSON");

            int steps = 0;
            var o = Small(7);
            o.Progress = (d, t, stage) => { steps++; return stage.Length > 0; };
            var a = session.Generate(o);
            Check(a.Length == 1 && a[0].Rgb.Length == 64 * 64 * 3 && steps >= 2, "generate with progress");
            var b = session.Generate(Small(7));
            Check(a[0].Rgb.SequenceEqual(b[0].Rgb), "same seed, same image");
            var stages = new System.Collections.Generic.List<string>();
            o.Progress = (d, t, stage) => { stages.Add(stage + " " + d + "/" + t); return true; };
            o.ProgressStages = true;
            session.Generate(o);
            Check(stages.Count > 4 && stages[0] == "build 0/3" && stages[stages.Count - 1] == "decode 1/1",
                "progress for every stage: " + string.Join(",", stages));

            using (var ad = Adapter.Load(model, Path.Combine(fixtures, "adapter", "id1.lidb.safetensors")))
                session.SetAdapters(new[] { ad }, new[] { 1.0f }, 0);
            var c = session.Generate(Small(7));
            Check(!a[0].Rgb.SequenceEqual(c[0].Rgb), "the identity changes the image");
            session.SetAdapters(new Adapter[0]);

            var e = Throws(() => new Model(rt, "/nonexistent/hdb-cs-model"));
            Check(e != null && e.Status == Status.FileNotFound && e.HdbMessage.Contains("hdb-cs-model"), "missing model names its path", e == null ? "" : e.Message);
            var bad = Small(1);
            bad.Width = 63;
            e = Throws(() => session.Generate(bad));
            Check(e != null && e.Status == Status.InvalidArgument && e.HdbMessage.Contains("width"), "bad width named", e == null ? "" : e.Message);

            // Tasks that await between calls hop threads; each error must be its own.
            int wrong = 0;
            var tasks = Enumerable.Range(0, 8).Select(t => Task.Run(async () =>
            {
                for (int i = 0; i < 20; i++)
                {
                    string path = "/nonexistent/hdb-cs-" + t + "-" + i;
                    var err = Throws(() => new Model(rt, path));
                    if (err == null || !err.HdbMessage.Contains(path)) Interlocked.Increment(ref wrong);
                    await Task.Yield();
                }
            })).ToArray();
            Task.WaitAll(tasks);
            Check(wrong == 0, "160 errors from 8 tasks each carry their own message", wrong + " wrong");

            var cancel = Small(3);
            cancel.Steps = 20;
            cancel.Progress = (d, t, s) => { session.Cancel(); return true; };
            e = Throws(() => session.Generate(cancel));
            Check(e != null && e.Status == Status.Cancelled, "Cancel from the progress callback");
            cancel.Progress = (d, t, s) => { throw new InvalidOperationException("from the callback"); };
            e = Throws(() => session.Generate(cancel));
            Check(e != null && e.Status == Status.Cancelled && e.InnerException is InvalidOperationException, "a throwing callback cancels and is rethrown inside");
            Check(session.Generate(Small(3)).Length == 1, "the session is still usable");

            // Per-image identities from a file's bytes, and one UNet evaluation.
            using (var ad = Adapter.FromBytes(model, File.ReadAllBytes(Path.Combine(fixtures, "adapter", "id1.lidb.safetensors"))))
                session.SetAdapters(new[] { ad }, null, 1);
            session.SetSampleAdapters(new[] { -1, 0 });
            var pair = Small(4);
            pair.Batch = 2;
            var two = session.Generate(pair);
            Check(two.Length == 2 && !two[0].Rgb.SequenceEqual(two[1].Rgb), "one identity per image");
            session.SetSampleAdapters(null);
            var sample = Enumerable.Range(0, 4 * 8 * 8).Select(i => (i % 7) / 7f).ToArray();
            var ctx = new float[77 * model.Info().CrossAttentionDim];
            var eps = session.Unet(sample, new[] { 10f }, ctx, 1, 8, 8, 77);
            Check(eps.All(v => !float.IsNaN(v)) && !eps.SequenceEqual(sample), "UNet evaluation");
            int loads = 0;
            using (var again = new Model(rt, Path.Combine(fixtures, "tiny-sd"), 0, 1, (d, t, s) => { loads++; return s == "load"; }))
                Check(loads > 0, "model load progress, stage \"load\"", loads.ToString());

            // A single-file checkpoint from its bytes is the model loaded from its path.
            string ldm = Path.Combine(fixtures, "tiny-sd-ldm.safetensors");
            using (var disk = new Model(rt, ldm))
            using (var mem = Model.FromBytes(rt, File.ReadAllBytes(ldm), "tiny.safetensors"))
            {
                var di = disk.Info();
                var mi = mem.Info();
                Check(mi.SourceFormat == 2 && mi.Unet.ParameterCount == di.Unet.ParameterCount &&
                      mi.Vae.TensorCount == di.Vae.TensorCount && mi.TextEncoder.Dtype == di.TextEncoder.Dtype,
                      "a model from memory is the model from its path");
                Check(mem.Describe().Contains("tiny.safetensors"), "named as given");
            }
            // A tokenizer given at load is the model's (the field after Reserved: layout checked).
            using (var withTok = new Model(rt, ldm, tokenizer: Path.Combine(fixtures, "tiny-sd")))
                Check(withTok.Info().HasTokenizer == 1, "the given tokenizer is the model's");
            using (var ad = Adapter.Load(model, Path.Combine(fixtures, "adapter", "id1.lidb.safetensors"), true))
                Check(ad != null, "hdb_adapter_load_ex with allow_unmatched");
            e = Throws(() => Model.FromBytes(rt, File.ReadAllBytes(ldm).Take(1000).ToArray(), "cut.safetensors"));
            Check(e != null && e.Status == Status.InvalidFile && e.HdbMessage.Contains("cut.safetensors"), "a truncated buffer is refused by name");

            // Predict, finetune, personalize: the params layouts are right when hdb runs
            // exactly the steps asked for.
            var face = new Image { Width = 32, Height = 32, Rgb = new byte[32 * 32 * 3] };
            for (int i = 0; i < face.Rgb.Length; i++) face.Rgb[i] = (byte)(i * 7);
            using (var net = new Hypernet(rt, Path.Combine(fixtures, "hypernet", "tiny.hypernet.safetensors")))
            using (var pred = net.Predict(model, face, 2))
            {
                int trainSteps = 0;
                var opts = new FinetuneOptions { Steps = 2, Resolution = 64, Seed = 1, Progress = (st, n, loss) => { trainSteps++; return n == 2 && !float.IsNaN(loss); } };
                using (var zero = Training.Finetune(model, face, null, opts))
                    Check(trainSteps == 2, "LiDB from zero ran 2 steps", trainSteps.ToString());
                trainSteps = 0;
                using (var relaxed = Training.Finetune(model, face, pred, opts))
                    Check(trainSteps == 2, "rank-relaxed from the prediction ran 2 steps", trainSteps.ToString());
                trainSteps = 0;
                using (var tuned = net.Personalize(model, face, 2, opts))
                {
                    Check(trainSteps == 2, "personalize ran 2 steps", trainSteps.ToString());
                    string path = Path.Combine(Path.GetTempPath(), "hdb-cs-" + Guid.NewGuid() + ".safetensors");
                    tuned.Save(path);
                    Check(new FileInfo(path).Length > 0, "personalized adapter saved");
                    File.Delete(path);
                }
            }
        }
        Library.SetLogCallback(null, 0);
        Check(records > 0, "log records arrived");
        Check(Library.LiveLogCallbacks == 0, "hdb released the log callback");
        Console.WriteLine("all " + checks + " checks passed");
        return 0;
    }

    static bool Native_SizeOk()
    {
        // Reflection over the internal structs would need InternalsVisibleTo; the test is
        // compiled with the sources, so it sees them directly.
        return Hdb.LayoutCheck.AllMatch(Console.Error);
    }
}
