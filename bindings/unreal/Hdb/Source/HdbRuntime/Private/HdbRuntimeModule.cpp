#include "HdbRuntimeModule.h"

#include "hdb.hpp"

#if PLATFORM_WINDOWS
#include "Interfaces/IPluginManager.h"
#include "Misc/Paths.h"
#endif

DEFINE_LOG_CATEGORY(LogHdb);

namespace
{
// Called from any thread, hdb's workers included; UE_LOG is thread-safe.
void ForwardLog(hdb::LogLevel Level, const char* Target, const char* Message)
{
	FString Text = FString(UTF8_TO_TCHAR(Target)) + TEXT(": ") + FString(UTF8_TO_TCHAR(Message));
	switch (Level)
	{
	case hdb::LogLevel::Error: UE_LOG(LogHdb, Error, TEXT("%s"), *Text); break;
	case hdb::LogLevel::Warn: UE_LOG(LogHdb, Warning, TEXT("%s"), *Text); break;
	default: UE_LOG(LogHdb, Log, TEXT("%s"), *Text); break;
	}
}
}

void FHdbRuntimeModule::StartupModule()
{
#if PLATFORM_WINDOWS
	// hdb.dll is delay-loaded (hdb.Build.cs): load it from the plugin before the first call.
	const FString Dir = FPaths::Combine(IPluginManager::Get().FindPlugin(TEXT("Hdb"))->GetBaseDir(),
		TEXT("Source/ThirdParty/hdb/lib/Win64"));
	DllHandle = FPlatformProcess::GetDllHandle(*FPaths::Combine(Dir, TEXT("hdb.dll")));
#endif
	if (hdb::abi_version() != HDB_ABI_VERSION)
	{
		UE_LOG(LogHdb, Error, TEXT("libhdb ABI %u, plugin built for %u"), hdb::abi_version(), (uint32)HDB_ABI_VERSION);
	}
	hdb::Result<void> R = hdb::set_log_callback(&ForwardLog, hdb::LogLevel::Info);
	if (!R) UE_LOG(LogHdb, Warning, TEXT("no hdb log: %s"), UTF8_TO_TCHAR(R.error().what()));
}

void FHdbRuntimeModule::ShutdownModule()
{
	// Returns once no thread is inside ForwardLog any more.
	(void)hdb::clear_log_callback();
#if PLATFORM_WINDOWS
	if (DllHandle) FPlatformProcess::FreeDllHandle(DllHandle);
#endif
	DllHandle = nullptr;
}

IMPLEMENT_MODULE(FHdbRuntimeModule, HdbRuntime)
