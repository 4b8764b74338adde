// A MonoBehaviour that generates an image with hdb and shows it on this object's renderer.
// The generation runs on a worker thread (hdb blocks for seconds); Unity objects are touched
// on the main thread only. Set modelPath to a Stable Diffusion 1.x diffusers folder.
using System.Threading.Tasks;
using UnityEngine;

public class HdbExample : MonoBehaviour
{
    public string modelPath = "Assets/StreamingAssets/sd15";
    public string prompt = "a photo of a person, studio light";
    public int steps = 20;

    Hdb.Runtime runtime;
    Hdb.Model model;
    Task<Hdb.Image[]> job;

    void Start()
    {
        runtime = new Hdb.Runtime("auto");
        model = new Hdb.Model(runtime, modelPath);
        var opts = new Hdb.GenerateOptions { Prompt = prompt, Steps = (uint)steps, Width = 512, Height = 512 };
        var m = model;
        // The session lives on the worker thread that uses it (a session belongs to one thread).
        job = Task.Run(() => { using (var s = new Hdb.Session(m)) return s.Generate(opts); });
    }

    void Update()
    {
        if (job == null || !job.IsCompleted) return;
        if (job.IsFaulted) Debug.LogError(job.Exception);
        else Show(job.Result[0]);
        job = null;
    }

    void Show(Hdb.Image im)
    {
        var tex = new Texture2D(im.Width, im.Height, TextureFormat.RGB24, false);
        // hdb's rows go top to bottom, Unity's textures bottom to top.
        var flipped = new byte[im.Rgb.Length];
        int row = im.Width * 3;
        for (int y = 0; y < im.Height; y++)
            System.Array.Copy(im.Rgb, y * row, flipped, (im.Height - 1 - y) * row, row);
        tex.LoadRawTextureData(flipped);
        tex.Apply();
        GetComponent<Renderer>().material.mainTexture = tex;
    }

    void OnDestroy()
    {
        if (model != null) model.Dispose();
        if (runtime != null) runtime.Dispose();
    }
}
