// Runs the plugin's runtime module against the tiny SD fixture, built like an Unreal module
// (-fno-exceptions -fno-rtti, HDB_NO_EXCEPTIONS) over the engine stubs in stubs/.
// Usage: unreal_driver <tests/fixtures>.
#include "HdbRuntimeModule.h"
#include "HdbSession.h"

#include <cstdlib>
#include <string>

IModuleInterface* CreateModule_HdbRuntime();

static int Checks = 0;
static void Check(bool Cond, const char* What, const FString& Detail = FString())
{
	if (!Cond)
	{
		std::fprintf(stderr, "FAIL: %s %s\n", What, *Detail);
		std::exit(1);
	}
	std::printf("ok %d: %s\n", ++Checks, What);
}

int main(int argc, char** argv)
{
	if (argc < 2) return 2;
	const std::string Fixtures = argv[1];
	IModuleInterface* Module = CreateModule_HdbRuntime();
	Module->StartupModule();

	FString Error;
	TSharedPtr<FHdbSession> Missing = FHdbSession::Create(FString("/nonexistent/hdb-ue"), FString("cpu"), Error);
	Check(!Missing && std::strstr(*Error, "hdb-ue") != nullptr, "a missing model fails, naming it", Error);

	TSharedPtr<FHdbSession> S = FHdbSession::Create(FString((Fixtures + "/tiny-sd").c_str()), FString("cpu"), Error);
	Check(S != nullptr, "session on the tiny model", Error);
	FHdbGenerateRequest Req;
	Req.Prompt = FString("a photo of sks person");
	Req.Steps = 2;
	Req.Width = Req.Height = 64;
	Req.Seed = 5;
	Req.Sampler = HDB_SAMPLER_DDIM;
	TArray<uint8> A, B;
	Check(S->Generate(Req, A, Error) && A.Num() == 64 * 64 * 3, "generate 64x64", Error);
	Check(S->SetAdapter(FString((Fixtures + "/adapter/id1.lidb.safetensors").c_str()), 1.0f, Error), "set adapter", Error);
	Check(S->Generate(Req, B, Error), "generate with the adapter", Error);
	Check(std::memcmp(A.GetData(), B.GetData(), static_cast<size_t>(A.Num())) != 0, "the identity changes the image");
	Check(S->SetAdapter(FString(), 1.0f, Error) && S->Generate(Req, B, Error), "remove it, generate again", Error);
	Check(std::memcmp(A.GetData(), B.GetData(), static_cast<size_t>(A.Num())) == 0, "same seed, same image");
	Req.Width = 63;
	Check(!S->Generate(Req, B, Error) && std::strstr(*Error, "width") != nullptr, "a bad width is refused by name", Error);

	S.reset();
	Module->ShutdownModule();
	delete Module;
	std::printf("all %d checks passed\n", Checks);
	return 0;
}
