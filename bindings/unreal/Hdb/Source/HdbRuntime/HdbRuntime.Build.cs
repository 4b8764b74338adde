using UnrealBuildTool;

public class HdbRuntime : ModuleRules
{
    public HdbRuntime(ReadOnlyTargetRules Target) : base(Target)
    {
        PCHUsage = PCHUsageMode.UseExplicitOrSharedPCHs;
        bEnableExceptions = false;
        PublicDependencyModuleNames.AddRange(new string[] { "Core", "hdb" });
        PrivateDependencyModuleNames.AddRange(new string[] { "Projects" });
    }
}
