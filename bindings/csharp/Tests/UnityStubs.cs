// Just enough of UnityEngine's API for Samples~/Example/HdbExample.cs to compile here (no
// Unity installation on CI machines); the signatures follow Unity's, the bodies do nothing.
namespace UnityEngine
{
    public class Object { }
    public class Component : Object { public T GetComponent<T>() { return default(T); } }
    public class Behaviour : Component { }
    public class MonoBehaviour : Behaviour { }
    public enum TextureFormat { RGB24 = 3 }
    public class Texture : Object { }
    public class Texture2D : Texture
    {
        public Texture2D(int width, int height, TextureFormat format, bool mipChain) { }
        public void LoadRawTextureData(byte[] data) { }
        public void Apply() { }
    }
    public class Material : Object { public Texture mainTexture { get; set; } }
    public class Renderer : Component { public Material material { get; set; } }
    public static class Debug { public static void LogError(object message) { } }
}
