// Package hdb is the Go binding of hdb, the HyperDreamBooth runtime for Stable Diffusion 1.x
// (its C API: include/hdb.h, whose rules apply).
//
// Objects (Runtime, Model, Adapter, Hypernet, Session) are freed by Close, or by a finalizer
// when forgotten; every method keeps its object alive until the C call returns
// (runtime.KeepAlive), so a finalizer never frees an object in use. Close must not race with
// other calls on the same object. A Session belongs to one goroutine at a time (a concurrent
// call fails with StatusBusy); Session.Cancel may be called from any goroutine.
//
// Errors are *Error values holding the status and hdb's message, copied inside the failing
// C call (a goroutine may move to another OS thread between two cgo calls). Callbacks are Go
// functions reached through cgo.Handle; a panic inside one is recovered (a progress function
// that panics cancels the call). Buffers passed to hdb are C memory (cgo's pointer rules).
//
// Build: cgo finds hdb through pkg-config (scripts/install.sh PREFIX, then
// PKG_CONFIG_PATH=PREFIX/lib/pkgconfig).
package hdb

// #cgo pkg-config: hdb
// #include "shims.h"
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Status is hdb_status.
type Status uint32

// The statuses of hdb.h.
const (
	StatusOK               Status = C.HDB_STATUS_OK
	StatusNullArgument     Status = C.HDB_STATUS_NULL_ARGUMENT
	StatusInvalidArgument  Status = C.HDB_STATUS_INVALID_ARGUMENT
	StatusFileNotFound     Status = C.HDB_STATUS_FILE_NOT_FOUND
	StatusIOError          Status = C.HDB_STATUS_IO_ERROR
	StatusInvalidFile      Status = C.HDB_STATUS_INVALID_FILE
	StatusNotAModel        Status = C.HDB_STATUS_NOT_A_MODEL
	StatusUnsupportedDtype Status = C.HDB_STATUS_UNSUPPORTED_DTYPE
	StatusInvalidModel     Status = C.HDB_STATUS_INVALID_MODEL
	StatusUnsupported      Status = C.HDB_STATUS_UNSUPPORTED
	StatusAdapterMismatch  Status = C.HDB_STATUS_ADAPTER_MISMATCH
	StatusNoDevice         Status = C.HDB_STATUS_NO_DEVICE
	StatusDeviceError      Status = C.HDB_STATUS_DEVICE_ERROR
	StatusOutOfMemory      Status = C.HDB_STATUS_OUT_OF_MEMORY
	StatusCancelled        Status = C.HDB_STATUS_CANCELLED
	StatusBufferTooSmall   Status = C.HDB_STATUS_BUFFER_TOO_SMALL
	StatusPanic            Status = C.HDB_STATUS_PANIC
	StatusInternal         Status = C.HDB_STATUS_INTERNAL
	StatusBusy             Status = C.HDB_STATUS_BUSY
	StatusDiverged         Status = C.HDB_STATUS_DIVERGED
)

// String is the status's C name ("HDB_STATUS_OK", ...).
func (s Status) String() string { return C.GoString(C.hdb_status_name(C.uint32_t(s))) }

// Error is a failed call: its status and hdb's message (naming the file, key or argument).
type Error struct {
	Status  Status
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Status, e.Message) }

// check turns a shim's status and copied message into an error.
func check(s C.hdb_status, e *C.hdbgo_err) error {
	if s == C.HDB_STATUS_OK {
		return nil
	}
	n := int(e.len)
	if n > len(e.msg)-1 {
		n = len(e.msg) - 1 // truncated by the shim's buffer
	}
	return &Error{Status: Status(s), Message: C.GoStringN(&e.msg[0], C.int(n))}
}

// Version is the library's "MAJOR.MINOR.PATCH".
func Version() string { return C.GoString(C.hdb_version_string()) }

// ABIVersion is the library's ABI version (the SONAME's number).
func ABIVersion() uint32 { return uint32(C.hdb_abi_version()) }

// HeaderABIVersion is the ABI version this binding was compiled against.
const HeaderABIVersion = C.HDB_ABI_VERSION

// ProgressFunc gets done of total units of stage; returning false cancels the call.
type ProgressFunc func(done, total uint64, stage string) bool

// TrainProgressFunc gets the training step (1-based), the total and the step's loss;
// returning false cancels.
type TrainProgressFunc func(step, steps uint64, loss float32) bool

// LogLevel is hdb_log_level.
type LogLevel uint32

// Log levels, most severe first.
const (
	LogOff   LogLevel = C.HDB_LOG_LEVEL_OFF
	LogError LogLevel = C.HDB_LOG_LEVEL_ERROR
	LogWarn  LogLevel = C.HDB_LOG_LEVEL_WARN
	LogInfo  LogLevel = C.HDB_LOG_LEVEL_INFO
	LogDebug LogLevel = C.HDB_LOG_LEVEL_DEBUG
	LogTrace LogLevel = C.HDB_LOG_LEVEL_TRACE
)

// LogFunc receives log records, from any goroutine or hdb thread, several at once.
type LogFunc func(level LogLevel, target, message string)

// SetLogCallback sends hdb's records up to maxLevel to f (nil stops logging). The previous
// function is released once no thread is inside it.
func SetLogCallback(f LogFunc, maxLevel LogLevel) error {
	var e C.hdbgo_err
	if f == nil || maxLevel == LogOff {
		return check(C.hdbgo_set_log_callback(0, C.HDB_LOG_LEVEL_OFF, &e), &e)
	}
	h, del := handleOf(f, false)
	logHandles.Add(1)
	if err := check(C.hdbgo_set_log_callback(h, C.hdb_log_level(maxLevel), &e), &e); err != nil {
		del() // not stored: still ours
		logHandles.Add(-1)
		return err
	}
	return nil
}

// Runtime is where models run: a device and CPU threads.
type Runtime struct{ p *C.hdb_runtime }

// RuntimeOptions are hdb_runtime_params' fields (zero values: the defaults).
type RuntimeOptions struct {
	Device     string // "auto" (""), "cpu", "cuda", "cuda:N"
	NumThreads uint32 // 0: one per core
}

// NewRuntime creates a runtime.
func NewRuntime(opts RuntimeOptions) (*Runtime, error) {
	var p C.hdb_runtime_params
	C.hdb_runtime_params_init(&p, C.sizeof_hdb_runtime_params)
	p.num_threads = C.uint32_t(opts.NumThreads)
	if opts.Device != "" {
		d := C.CString(opts.Device)
		defer C.free(unsafe.Pointer(d))
		p.device = d
	}
	var e C.hdbgo_err
	var out *C.hdb_runtime
	if err := check(C.hdbgo_runtime_new(&p, &out, &e), &e); err != nil {
		return nil, err
	}
	r := &Runtime{out}
	runtime.SetFinalizer(r, (*Runtime).Close)
	return r, nil
}

// RuntimeInfo is hdb_runtime_info.
type RuntimeInfo struct {
	DeviceKind  uint32 // HDB_DEVICE_CPU (0) or HDB_DEVICE_CUDA (1)
	DeviceIndex uint32
	NumThreads  uint32
}

// Info reports the runtime's device and threads.
func (r *Runtime) Info() (RuntimeInfo, error) {
	var i C.hdb_runtime_info
	i.struct_size = C.uint32_t(unsafe.Sizeof(i))
	var e C.hdbgo_err
	err := check(C.hdbgo_runtime_get_info(r.p, &i, &e), &e)
	runtime.KeepAlive(r)
	return RuntimeInfo{uint32(i.device_kind), uint32(i.device_index), uint32(i.num_threads)}, err
}

// Close frees the runtime (models keep it alive as long as they need it).
func (r *Runtime) Close() {
	C.hdb_runtime_free(r.p)
	r.p = nil
	runtime.SetFinalizer(r, nil)
}

// Model is a loaded Stable Diffusion model; safe for many goroutines at once.
type Model struct{ p *C.hdb_model }

// ModelOptions are hdb_model_params' fields.
type ModelOptions struct {
	WeightsVariant uint32       // HDB_WEIGHTS_*: 0 auto, 1 full, 2 fp16
	Storage        uint32       // HDB_STORAGE_*: 0 mmap, 1 copy
	Progress       ProgressFunc // after each weight file (stage "load"); may be nil
	// Tokenizer: a tokenizer folder (or a diffusers folder with tokenizer/) used instead of
	// the model's own; "": the model's, else the built-in CLIP tokenizer for SD 1.x.
	Tokenizer string
}

// setTokenizer points p.tokenizer at a C copy of opts' tokenizer; free it after the call.
func setTokenizer(p *C.hdb_model_params, opts *ModelOptions) unsafe.Pointer {
	if opts == nil || opts.Tokenizer == "" {
		return nil
	}
	t := C.CString(opts.Tokenizer)
	p.tokenizer = t
	return unsafe.Pointer(t)
}

// LoadModel loads a diffusers folder or an LDM single-file checkpoint.
func LoadModel(rt *Runtime, path string, opts *ModelOptions) (*Model, error) {
	var p C.hdb_model_params
	C.hdb_model_params_init(&p, C.sizeof_hdb_model_params)
	var progress ProgressFunc
	if opts != nil {
		p.weights_variant = C.hdb_weights_variant(opts.WeightsVariant)
		p.storage = C.hdb_weights_storage(opts.Storage)
		progress = opts.Progress
	}
	h, del := handleOf(progress, progress == nil)
	defer del()
	defer C.free(setTokenizer(&p, opts))
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var e C.hdbgo_err
	var out *C.hdb_model
	err := check(C.hdbgo_model_load(rt.p, cpath, &p, h, &out, &e), &e)
	runtime.KeepAlive(rt)
	if err != nil {
		return nil, err
	}
	m := &Model{out}
	runtime.SetFinalizer(m, (*Model).Close)
	return m, nil
}

// LoadModelFromMemory loads an LDM single-file checkpoint from its bytes (copied: data may be
// reused at once). name stands for its path in messages; of opts Progress and Tokenizer apply.
func LoadModelFromMemory(rt *Runtime, data []byte, name string, opts *ModelOptions) (*Model, error) {
	var p C.hdb_model_params
	C.hdb_model_params_init(&p, C.sizeof_hdb_model_params)
	var progress ProgressFunc
	if opts != nil {
		progress = opts.Progress
	}
	h, del := handleOf(progress, progress == nil)
	defer del()
	defer C.free(setTokenizer(&p, opts))
	// cgo's rules: hdb reads C memory, not the Go slice.
	buf := C.CBytes(data)
	defer C.free(buf)
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var e C.hdbgo_err
	var out *C.hdb_model
	err := check(C.hdbgo_model_load_from_memory(rt.p, (*C.uint8_t)(buf), C.size_t(len(data)), cname, &p, h, &out, &e), &e)
	runtime.KeepAlive(rt)
	if err != nil {
		return nil, err
	}
	m := &Model{out}
	runtime.SetFinalizer(m, (*Model).Close)
	return m, nil
}

// ModelInfo is part of hdb_model_info.
type ModelInfo struct {
	Architecture      uint32 // HDB_ARCH_*
	SourceFormat      uint32 // HDB_FORMAT_*
	CrossAttentionDim uint32
	HasTokenizer      bool
	UNetParameters    uint64
}

// Info reports what the model holds.
func (m *Model) Info() (ModelInfo, error) {
	var i C.hdb_model_info
	i.struct_size = C.uint32_t(unsafe.Sizeof(i))
	var e C.hdbgo_err
	err := check(C.hdbgo_model_get_info(m.p, &i, &e), &e)
	runtime.KeepAlive(m)
	return ModelInfo{uint32(i.architecture), uint32(i.source_format), uint32(i.cross_attention_dim),
		i.has_tokenizer != 0, uint64(i.unet.parameter_count)}, err
}

// Describe returns the model's JSON description.
func (m *Model) Describe() (string, error) {
	defer runtime.KeepAlive(m)
	var e C.hdbgo_err
	var needed C.size_t
	s := C.hdbgo_model_describe(m.p, nil, 0, &needed, &e)
	if s != C.HDB_STATUS_BUFFER_TOO_SMALL && s != C.HDB_STATUS_OK {
		return "", check(s, &e)
	}
	buf := (*C.char)(C.malloc(needed))
	defer C.free(unsafe.Pointer(buf))
	if err := check(C.hdbgo_model_describe(m.p, buf, needed, &needed, &e), &e); err != nil {
		return "", err
	}
	return C.GoString(buf), nil
}

// Close frees the model (sessions and adapters keep what they need).
func (m *Model) Close() {
	C.hdb_model_free(m.p)
	m.p = nil
	runtime.SetFinalizer(m, nil)
}
