#include "HdbSession.h"

namespace
{
FString ErrorText(const hdb::Error& Error)
{
	return FString(UTF8_TO_TCHAR(hdb::status_name(Error.status()))) + TEXT(": ") +
		FString(UTF8_TO_TCHAR(Error.what()));
}
}

FHdbSession::FHdbSession(hdb::Runtime&& InRuntime, hdb::Model&& InModel, hdb::Session&& InSession)
	: Runtime(std::move(InRuntime)), Model(std::move(InModel)), Session(std::move(InSession))
{
}

TSharedPtr<FHdbSession> FHdbSession::Create(const FString& ModelPath, const FString& Device, FString& OutError)
{
	FTCHARToUTF8 DeviceUtf8(*Device);
	hdb::Result<hdb::Runtime> Rt = hdb::Runtime::create(DeviceUtf8.Get());
	if (!Rt)
	{
		OutError = ErrorText(Rt.error());
		return nullptr;
	}
	FTCHARToUTF8 PathUtf8(*ModelPath);
	hdb::Result<hdb::Model> Loaded = hdb::Model::load(*Rt, PathUtf8.Get());
	if (!Loaded)
	{
		OutError = ErrorText(Loaded.error());
		return nullptr;
	}
	hdb::Result<hdb::Session> S = hdb::Session::create(*Loaded);
	if (!S)
	{
		OutError = ErrorText(S.error());
		return nullptr;
	}
	return MakeShareable(new FHdbSession(std::move(*Rt), std::move(*Loaded), std::move(*S)));
}

bool FHdbSession::SetAdapter(const FString& AdapterPath, float Scale, FString& OutError)
{
	if (AdapterPath.IsEmpty())
	{
		hdb::Result<void> R = Session.set_adapters({}, {}, hdb::ApplyMode::Merge);
		if (!R) OutError = ErrorText(R.error());
		return R.ok();
	}
	FTCHARToUTF8 PathUtf8(*AdapterPath);
	hdb::Result<hdb::Adapter> A = hdb::Adapter::load(Model, PathUtf8.Get());
	if (!A)
	{
		OutError = ErrorText(A.error());
		return false;
	}
	const hdb::Adapter* Set[1] = {&*A};
	const float Scales[1] = {Scale};
	// The session keeps its own reference: the adapter may go when this returns.
	hdb::Result<void> R = Session.set_adapters(Set, Scales, hdb::ApplyMode::Merge);
	if (!R) OutError = ErrorText(R.error());
	return R.ok();
}

bool FHdbSession::Generate(const FHdbGenerateRequest& Request, TArray<uint8>& OutRgb, FString& OutError)
{
	if (Request.Width <= 0 || Request.Height <= 0 || Request.Steps <= 0)
	{
		OutError = TEXT("Width, Height and Steps must be positive");
		return false;
	}
	FTCHARToUTF8 Prompt(*Request.Prompt);
	FTCHARToUTF8 Negative(*Request.NegativePrompt);
	hdb::GenerateParams P = hdb::generate_params();
	P.prompt = Prompt.Get();
	P.negative_prompt = Negative.Get();
	P.steps = static_cast<uint32_t>(Request.Steps);
	P.guidance = Request.Guidance;
	P.width = static_cast<uint32_t>(Request.Width);
	P.height = static_cast<uint32_t>(Request.Height);
	P.seed = static_cast<uint64_t>(Request.Seed);
	P.sampler = static_cast<uint32_t>(Request.Sampler);
	OutRgb.SetNumUninitialized(Request.Width * Request.Height * 3);
	hdb_image Image = {};
	Image.data = OutRgb.GetData();
	Image.data_len = static_cast<size_t>(OutRgb.Num());
	hdb::Result<void> R = Session.generate(P, hdb::Span<hdb_image>(&Image, 1));
	if (!R)
	{
		OutError = ErrorText(R.error());
		OutRgb.Reset();
	}
	return R.ok();
}

void FHdbSession::Cancel()
{
	Session.cancel();
}
