package hdb

// #include "shims.h"
import "C"

import (
	"runtime"
	"unsafe"
)

// Session holds one goroutine's adapters on a model and generates images.
type Session struct{ p *C.hdb_session }

// NewSession creates a session on m.
func NewSession(m *Model) (*Session, error) {
	var p C.hdb_session_params
	C.hdb_session_params_init(&p, C.sizeof_hdb_session_params)
	var e C.hdbgo_err
	var out *C.hdb_session
	err := check(C.hdbgo_session_new(m.p, &p, &out, &e), &e)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	s := &Session{out}
	runtime.SetFinalizer(s, (*Session).Close)
	return s, nil
}

// ApplyMode is hdb_apply_mode.
type ApplyMode uint32

// How a session applies its adapters.
const (
	ApplyMerge   ApplyMode = C.HDB_APPLY_MERGE
	ApplyRuntime ApplyMode = C.HDB_APPLY_RUNTIME
)

// SetAdapters makes adapters (scales nil: 1.0 each) the active set; none removes them.
func (s *Session) SetAdapters(adapters []*Adapter, scales []float32, mode ApplyMode) error {
	if scales != nil && len(scales) != len(adapters) {
		return &Error{StatusInvalidArgument, "scales: must be nil or one per adapter"}
	}
	n := len(adapters)
	// C arrays: Go memory holding C pointers may not be passed to C.
	ptrs := (**C.hdb_adapter)(C.calloc(C.size_t(n+1), C.size_t(unsafe.Sizeof(uintptr(0)))))
	defer C.free(unsafe.Pointer(ptrs))
	ps := unsafe.Slice(ptrs, n+1)
	for i, a := range adapters {
		if a != nil {
			ps[i] = a.p
		}
	}
	var sc *C.float
	if scales != nil {
		sc = (*C.float)(C.CBytes(unsafe.Slice((*byte)(unsafe.Pointer(&scales[0])), 4*n)))
		defer C.free(unsafe.Pointer(sc))
	}
	var e C.hdbgo_err
	err := check(C.hdbgo_session_set_adapters(s.p, (**C.hdb_adapter)(unsafe.Pointer(ptrs)), sc, C.size_t(n),
		C.hdb_apply_mode(mode), &e), &e)
	runtime.KeepAlive(s)
	runtime.KeepAlive(adapters)
	return err
}

// SetSampleAdapters gives each sample its own adapter (index into the set, -1 none);
// nil returns to one set for all.
func (s *Session) SetSampleAdapters(indices []int32) error {
	var idx *C.int32_t
	if len(indices) > 0 {
		idx = (*C.int32_t)(C.CBytes(unsafe.Slice((*byte)(unsafe.Pointer(&indices[0])), 4*len(indices))))
		defer C.free(unsafe.Pointer(idx))
	}
	var e C.hdbgo_err
	err := check(C.hdbgo_session_set_sample_adapters(s.p, idx, C.size_t(len(indices)), &e), &e)
	runtime.KeepAlive(s)
	return err
}

// GenerateOptions are hdb_generate_params' fields; zero values take the defaults
// (25 steps, guidance 7.5, Euler ancestral, 512x512, batch 1).
type GenerateOptions struct {
	Prompt         string
	NegativePrompt string
	Steps          uint32
	Guidance       *float32 // nil: 7.5
	Sampler        *uint32  // HDB_SAMPLER_*; nil: Euler ancestral
	Seed           uint64
	Width, Height  uint32
	Batch          uint32
	Latents        []float32 // optional [batch, 4, height/8, width/8]
	Progress       ProgressFunc
	// ProgressStages: Progress hears every phase ("build", "text", "denoise", "decode"),
	// each when it starts (done 0) and after each unit; false: the denoising steps only.
	ProgressStages bool
}

// Generate renders the images (packed RGB8).
func (s *Session) Generate(o GenerateOptions) ([]Image, error) {
	var p C.hdb_generate_params
	C.hdb_generate_params_init(&p, C.sizeof_hdb_generate_params)
	if o.Steps != 0 {
		p.steps = C.uint32_t(o.Steps)
	}
	if o.Guidance != nil {
		p.guidance = C.float(*o.Guidance)
	}
	if o.Sampler != nil {
		p.sampler = C.hdb_sampler(*o.Sampler)
	}
	p.seed = C.uint64_t(o.Seed)
	if o.Width != 0 {
		p.width = C.uint32_t(o.Width)
	}
	if o.Height != 0 {
		p.height = C.uint32_t(o.Height)
	}
	if o.Batch != 0 {
		p.batch = C.uint32_t(o.Batch)
	}
	p.reserved = 0
	if o.ProgressStages {
		p.progress_stages = 1
	}
	prompt := C.CString(o.Prompt)
	defer C.free(unsafe.Pointer(prompt))
	neg := C.CString(o.NegativePrompt)
	defer C.free(unsafe.Pointer(neg))
	p.prompt, p.negative_prompt = prompt, neg
	if len(o.Latents) > 0 {
		l := C.CBytes(unsafe.Slice((*byte)(unsafe.Pointer(&o.Latents[0])), 4*len(o.Latents)))
		defer C.free(l)
		p.latents = (*C.float)(l)
		p.latents_len = C.size_t(len(o.Latents))
	}
	ph, del := handleOf(o.Progress, o.Progress == nil)
	defer del()

	n := int(p.batch)
	w, h := int(p.width), int(p.height)
	size := w * h * 3
	imgs := (*C.hdb_image)(C.calloc(C.size_t(n), C.size_t(unsafe.Sizeof(C.hdb_image{}))))
	defer C.free(unsafe.Pointer(imgs))
	im := unsafe.Slice(imgs, n)
	for i := range im {
		im[i].data = (*C.uint8_t)(C.malloc(C.size_t(size + 1)))
		im[i].data_len = C.size_t(size)
		defer C.free(unsafe.Pointer(im[i].data))
	}
	var e C.hdbgo_err
	err := check(C.hdbgo_generate(s.p, &p, ph, imgs, C.size_t(n), &e), &e)
	runtime.KeepAlive(s)
	if err != nil {
		return nil, err
	}
	out := make([]Image, n)
	for i := range im {
		out[i] = Image{int(im[i].width), int(im[i].height), C.GoBytes(unsafe.Pointer(im[i].data), C.int(size))}
	}
	return out, nil
}

// UNet runs one UNet evaluation (hdb_session_unet): sample [batch, 4, height, width],
// timesteps [batch], context [batch, tokens, 768] -> out [batch, 4, height, width].
func (s *Session) UNet(sample, timesteps, context []float32, batch, height, width, tokens uint32, out []float32) error {
	cp := func(v []float32) (*C.float, func()) {
		if len(v) == 0 {
			return nil, func() {}
		}
		m := C.CBytes(unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v)))
		return (*C.float)(m), func() { C.free(m) }
	}
	sp, f1 := cp(sample)
	defer f1()
	tp, f2 := cp(timesteps)
	defer f2()
	xp, f3 := cp(context)
	defer f3()
	op := (*C.float)(C.malloc(C.size_t(4*len(out) + 4)))
	defer C.free(unsafe.Pointer(op))
	var e C.hdbgo_err
	err := check(C.hdbgo_session_unet(s.p, sp, C.size_t(len(sample)), tp, C.size_t(len(timesteps)), xp,
		C.size_t(len(context)), C.uint32_t(batch), C.uint32_t(height), C.uint32_t(width), C.uint32_t(tokens), op,
		C.size_t(len(out)), &e), &e)
	runtime.KeepAlive(s)
	if err == nil {
		copy(out, unsafe.Slice((*float32)(unsafe.Pointer(op)), len(out)))
	}
	return err
}

// Cancel stops the call running on the session (in another goroutine, or from its progress
// function) at its next check: it returns StatusCancelled. Safe from any goroutine.
func (s *Session) Cancel() {
	C.hdb_session_cancel(s.p)
	runtime.KeepAlive(s)
}

// Close frees the session.
func (s *Session) Close() {
	C.hdb_session_free(s.p)
	s.p = nil
	runtime.SetFinalizer(s, nil)
}
