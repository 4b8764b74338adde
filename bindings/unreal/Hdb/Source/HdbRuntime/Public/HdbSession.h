// FHdbSession: a model and one session on it, in engine types, for Unreal code (no
// exceptions: hdb.hpp's hdb::Result mode, HDB_NO_EXCEPTIONS from hdb.Build.cs). Failures
// return false with the message in OutError. A session belongs to one thread at a time: run
// Generate on a worker (it blocks for seconds) and copy the pixels to a texture on the game
// thread. Cancel may be called from any thread.
#pragma once

#include "CoreMinimal.h"
#include "hdb.hpp"

struct HDBRUNTIME_API FHdbGenerateRequest
{
	FString Prompt;
	FString NegativePrompt;
	int32 Steps = 25;
	float Guidance = 7.5f;
	int32 Width = 512;
	int32 Height = 512;
	int64 Seed = 0;
	/** HDB_SAMPLER_*. */
	int32 Sampler = HDB_SAMPLER_EULER_A;
};

class HDBRUNTIME_API FHdbSession
{
public:
	/** Device: "auto", "cpu", "cuda" or "cuda:N". Null on failure (OutError says why). */
	static TSharedPtr<FHdbSession> Create(const FString& ModelPath, const FString& Device, FString& OutError);

	/** Applies one identity adapter file at Scale (an empty path removes it). */
	bool SetAdapter(const FString& AdapterPath, float Scale, FString& OutError);

	/** Renders one image into OutRgb (Width * Height * 3 bytes, RGB8, top row first). */
	bool Generate(const FHdbGenerateRequest& Request, TArray<uint8>& OutRgb, FString& OutError);

	/** Stops a Generate running on another thread (it then returns false, "cancelled"). */
	void Cancel();

private:
	FHdbSession(hdb::Runtime&& InRuntime, hdb::Model&& InModel, hdb::Session&& InSession);

	hdb::Runtime Runtime;
	hdb::Model Model;
	hdb::Session Session;
};
