// Stand-in for the engine's module interface (see CoreMinimal.h here).
#pragma once

class IModuleInterface
{
public:
	virtual ~IModuleInterface() = default;
	virtual void StartupModule() {}
	virtual void ShutdownModule() {}
};

#define IMPLEMENT_MODULE(Class, Name) \
	IModuleInterface* CreateModule_##Name() { return new Class(); }
