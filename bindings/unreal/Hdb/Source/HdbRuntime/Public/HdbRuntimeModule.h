#pragma once

#include "CoreMinimal.h"
#include "Modules/ModuleManager.h"

DECLARE_LOG_CATEGORY_EXTERN(LogHdb, Log, All);

/** Loads libhdb (Windows: from the plugin's binaries) and routes hdb's log to LogHdb. */
class FHdbRuntimeModule : public IModuleInterface
{
public:
	virtual void StartupModule() override;
	virtual void ShutdownModule() override;

private:
	void* DllHandle = nullptr;
};
