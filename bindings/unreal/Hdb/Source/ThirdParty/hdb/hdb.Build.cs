// The prebuilt libhdb as an external module. Put an installed hdb (scripts/install.sh PREFIX)
// here: include/ (hdb.h, hdb.hpp) and lib/Linux/x86_64-unknown-linux-gnu/libhdb.so.1, or
// lib/Win64/hdb.dll + hdb.lib.
using System.IO;
using UnrealBuildTool;

public class hdb : ModuleRules
{
    public hdb(ReadOnlyTargetRules Target) : base(Target)
    {
        Type = ModuleType.External;
        PublicSystemIncludePaths.Add(Path.Combine(ModuleDirectory, "include"));
        // Unreal builds modules without exceptions: hdb.hpp then returns hdb::Result<T>.
        PublicDefinitions.Add("HDB_NO_EXCEPTIONS=1");

        if (Target.Platform == UnrealTargetPlatform.Linux)
        {
            string Lib = Path.Combine(ModuleDirectory, "lib", "Linux", "x86_64-unknown-linux-gnu", "libhdb.so.1");
            PublicAdditionalLibraries.Add(Lib);
            // Staged next to the binary; the SONAME is libhdb.so.1.
            RuntimeDependencies.Add("$(BinaryOutputDir)/libhdb.so.1", Lib);
        }
        else if (Target.Platform == UnrealTargetPlatform.Win64)
        {
            string Dir = Path.Combine(ModuleDirectory, "lib", "Win64");
            PublicAdditionalLibraries.Add(Path.Combine(Dir, "hdb.lib"));
            // Loaded on first use (FHdbRuntimeModule::StartupModule loads it from the plugin).
            PublicDelayLoadDLLs.Add("hdb.dll");
            RuntimeDependencies.Add("$(BinaryOutputDir)/hdb.dll", Path.Combine(Dir, "hdb.dll"));
        }
    }
}
