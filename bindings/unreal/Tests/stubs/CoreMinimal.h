// Stand-ins for the few Unreal Engine types and macros the plugin's C++ uses, so CI can
// compile and run it with -fno-exceptions -fno-rtti where no engine is installed. They mimic
// the engine's signatures only as far as the plugin needs; they are not the engine.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#define PLATFORM_WINDOWS 0
#ifndef HDBRUNTIME_API
#define HDBRUNTIME_API
#endif

typedef int32_t int32;
typedef int64_t int64;
typedef uint8_t uint8;
typedef uint32_t uint32;
typedef char TCHAR; // the engine's is wchar_t / char16_t; UTF-8 here keeps the stubs small
#define TEXT(s) s

class FString
{
public:
	FString() = default;
	FString(const TCHAR* s) : S(s ? s : "") {}
	const TCHAR* operator*() const { return S.c_str(); }
	bool IsEmpty() const { return S.empty(); }
	FString operator+(const FString& o) const { return FString((S + o.S).c_str()); }
	int32 Len() const { return static_cast<int32>(S.size()); }

private:
	std::string S;
};

class FTCHARToUTF8
{
public:
	explicit FTCHARToUTF8(const TCHAR* s) : S(s) {}
	const char* Get() const { return S.c_str(); }

private:
	std::string S;
};
#define UTF8_TO_TCHAR(s) (s)

template <class T> class TArray
{
public:
	void SetNumUninitialized(int32 n) { V.resize(static_cast<size_t>(n)); }
	T* GetData() { return V.data(); }
	int32 Num() const { return static_cast<int32>(V.size()); }
	void Reset() { V.clear(); }
	T& operator[](int32 i) { return V[static_cast<size_t>(i)]; }

private:
	std::vector<T> V;
};

template <class T> using TSharedPtr = std::shared_ptr<T>;
template <class T> TSharedPtr<T> MakeShareable(T* p) { return TSharedPtr<T>(p); }

// UE_LOG(Category, Verbosity, TEXT(fmt), ...) prints to stderr here.
struct FLogCategoryStub
{
	const char* Name;
};
#define DECLARE_LOG_CATEGORY_EXTERN(Name, Default, Compile) extern FLogCategoryStub Name
#define DEFINE_LOG_CATEGORY(Name) FLogCategoryStub Name = {#Name}
#define UE_LOG(Category, Verbosity, Fmt, ...) \
	(std::fprintf(stderr, "[%s %s] ", (Category).Name, #Verbosity), std::fprintf(stderr, Fmt, ##__VA_ARGS__), \
	 std::fputc('\n', stderr))
