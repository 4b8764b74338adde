package hdb

// #include "shims.h"
import "C"

import (
	"image"
	"image/color"
	"runtime"
	"unsafe"
)

// Image is a packed RGB8 image: Height rows of Width*3 bytes.
type Image struct {
	Width, Height int
	Pix           []byte
}

// ToRGBA converts the image for Go's image packages (png.Encode, ...).
func (im *Image) ToRGBA() *image.RGBA {
	out := image.NewRGBA(image.Rect(0, 0, im.Width, im.Height))
	for y := 0; y < im.Height; y++ {
		for x := 0; x < im.Width; x++ {
			o := (y*im.Width + x) * 3
			out.SetRGBA(x, y, color.RGBA{im.Pix[o], im.Pix[o+1], im.Pix[o+2], 255})
		}
	}
	return out
}

// cImage copies a face into C memory (hdb reads it during the call); free with the func.
func cImage(face *Image) (*C.hdb_image, func()) {
	n := len(face.Pix)
	img := (*C.hdb_image)(C.calloc(1, C.size_t(unsafe.Sizeof(C.hdb_image{}))))
	data := C.malloc(C.size_t(n + 1))
	if n > 0 {
		copy(unsafe.Slice((*byte)(data), n), face.Pix)
	}
	img.data = (*C.uint8_t)(data)
	img.data_len = C.size_t(n)
	img.width = C.uint32_t(face.Width)
	img.height = C.uint32_t(face.Height)
	img.stride = C.uint32_t(face.Width * 3)
	img.format = C.HDB_PIXEL_RGB8
	return img, func() { C.free(data); C.free(unsafe.Pointer(img)) }
}

// Adapter is an identity (LiDB or LoRA); immutable, shared by any number of sessions.
type Adapter struct{ p *C.hdb_adapter }

func newAdapter(p *C.hdb_adapter) *Adapter {
	a := &Adapter{p}
	runtime.SetFinalizer(a, (*Adapter).Close)
	return a
}

// LoadAdapter loads a LiDB, kohya or PEFT adapter file for model.
func LoadAdapter(m *Model, path string) (*Adapter, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var e C.hdbgo_err
	var out *C.hdb_adapter
	err := check(C.hdbgo_adapter_load(m.p, cpath, &out, &e), &e)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	return newAdapter(out), nil
}

// AdapterOptions are hdb_adapter_load_params' fields.
type AdapterOptions struct {
	// AllowUnmatched skips the keys of a LoRA file that match no adaptable layer of the model
	// (logged as warnings) instead of refusing the file.
	AllowUnmatched bool
}

// LoadAdapterWith loads an adapter file with options (hdb_adapter_load_ex).
func LoadAdapterWith(m *Model, path string, opts AdapterOptions) (*Adapter, error) {
	var p C.hdb_adapter_load_params
	C.hdb_adapter_load_params_init(&p, C.sizeof_hdb_adapter_load_params)
	if opts.AllowUnmatched {
		p.allow_unmatched = 1
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var e C.hdbgo_err
	var out *C.hdb_adapter
	err := check(C.hdbgo_adapter_load_ex(m.p, cpath, &p, &out, &e), &e)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	return newAdapter(out), nil
}

// LoadAdapterFromMemory loads an adapter from a file's bytes.
func LoadAdapterFromMemory(m *Model, data []byte) (*Adapter, error) {
	buf := C.CBytes(data)
	defer C.free(buf)
	var e C.hdbgo_err
	var out *C.hdb_adapter
	err := check(C.hdbgo_adapter_load_from_memory(m.p, (*C.uint8_t)(buf), C.size_t(len(data)), &out, &e), &e)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	return newAdapter(out), nil
}

// Save writes the adapter (LiDB v2, or PEFT for an imported LoRA) atomically.
func (a *Adapter) Save(path string) error {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var e C.hdbgo_err
	err := check(C.hdbgo_adapter_save(a.p, cpath, &e), &e)
	runtime.KeepAlive(a)
	return err
}

// Close frees the adapter (sessions using it keep their own reference).
func (a *Adapter) Close() {
	C.hdb_adapter_free(a.p)
	a.p = nil
	runtime.SetFinalizer(a, nil)
}

// Hypernet predicts identities from face photos.
type Hypernet struct{ p *C.hdb_hypernet }

// LoadHypernet loads a hypernetwork v1 file.
func LoadHypernet(rt *Runtime, path string) (*Hypernet, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var e C.hdbgo_err
	var out *C.hdb_hypernet
	err := check(C.hdbgo_hypernet_load(rt.p, cpath, &out, &e), &e)
	runtime.KeepAlive(rt)
	if err != nil {
		return nil, err
	}
	h := &Hypernet{out}
	runtime.SetFinalizer(h, (*Hypernet).Close)
	return h, nil
}

// PredictOptions are hdb_predict_params' fields.
type PredictOptions struct {
	Iterations uint32 // 0: the file's default
	Progress   ProgressFunc
}

func predictParams(o *PredictOptions) (C.hdb_predict_params, ProgressFunc) {
	var p C.hdb_predict_params
	C.hdb_predict_params_init(&p, C.sizeof_hdb_predict_params)
	if o == nil {
		return p, nil
	}
	p.iterations = C.uint32_t(o.Iterations)
	return p, o.Progress
}

// Predict returns the identity adapter of an RGB8 face crop.
func (h *Hypernet) Predict(m *Model, face *Image, opts *PredictOptions) (*Adapter, error) {
	img, free := cImage(face)
	defer free()
	p, progress := predictParams(opts)
	ph, del := handleOf(progress, progress == nil)
	defer del()
	var e C.hdbgo_err
	var out *C.hdb_adapter
	err := check(C.hdbgo_hypernet_predict(h.p, m.p, img, &p, ph, &out, &e), &e)
	runtime.KeepAlive(h)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	return newAdapter(out), nil
}

// Close frees the hypernetwork.
func (h *Hypernet) Close() {
	C.hdb_hypernet_free(h.p)
	h.p = nil
	runtime.SetFinalizer(h, nil)
}

// FinetuneOptions are hdb_finetune_params' fields (zero values: the mode's defaults).
type FinetuneOptions struct {
	Mode          uint32 // HDB_FINETUNE_*
	Steps         uint32
	Rank          uint32
	LR            float32
	WeightDecay   *float32 // nil: 0.01
	MaxGradNorm   *float32 // nil: 1
	LRSchedule    uint32   // HDB_LR_*
	WarmupSteps   uint32
	Resolution    uint32
	Checkpointing *bool // nil: true
	Seed          uint64
	Prompt        string // "": "a [V] face"
	Token         string // "": "sks"
	Progress      TrainProgressFunc
}

// finetuneParams fills the C params; the strings are C memory freed by the func.
func finetuneParams(o *FinetuneOptions) (C.hdb_finetune_params, TrainProgressFunc, func()) {
	var p C.hdb_finetune_params
	C.hdb_finetune_params_init(&p, C.sizeof_hdb_finetune_params)
	if o == nil {
		return p, nil, func() {}
	}
	p.mode = C.hdb_finetune_mode(o.Mode)
	p.steps = C.uint32_t(o.Steps)
	p.rank = C.uint32_t(o.Rank)
	p.lr = C.float(o.LR)
	if o.WeightDecay != nil {
		p.weight_decay = C.float(*o.WeightDecay)
	}
	if o.MaxGradNorm != nil {
		p.max_grad_norm = C.float(*o.MaxGradNorm)
	}
	p.lr_schedule = C.hdb_lr_schedule(o.LRSchedule)
	p.warmup_steps = C.uint32_t(o.WarmupSteps)
	p.resolution = C.uint32_t(o.Resolution)
	if o.Checkpointing != nil && !*o.Checkpointing {
		p.checkpointing = 0
	}
	p.seed = C.uint64_t(o.Seed)
	var frees []unsafe.Pointer
	if o.Prompt != "" {
		p.prompt = C.CString(o.Prompt)
		frees = append(frees, unsafe.Pointer(p.prompt))
	}
	if o.Token != "" {
		p.token = C.CString(o.Token)
		frees = append(frees, unsafe.Pointer(p.token))
	}
	return p, o.Progress, func() {
		for _, f := range frees {
			C.free(f)
		}
	}
}

// Finetune trains an identity adapter on a face: rank-relaxed from start, or LiDB from zero
// (start nil).
func Finetune(m *Model, face *Image, start *Adapter, opts *FinetuneOptions) (*Adapter, error) {
	img, free := cImage(face)
	defer free()
	p, progress, freeP := finetuneParams(opts)
	defer freeP()
	th, del := handleOf(progress, progress == nil)
	defer del()
	var startP *C.hdb_adapter
	if start != nil {
		startP = start.p
	}
	var e C.hdbgo_err
	var out *C.hdb_adapter
	err := check(C.hdbgo_finetune(m.p, img, startP, &p, th, &out, &e), &e)
	runtime.KeepAlive(m)
	runtime.KeepAlive(start)
	if err != nil {
		return nil, err
	}
	return newAdapter(out), nil
}

// Personalize predicts the face's identity and finetunes it in one call.
func (h *Hypernet) Personalize(m *Model, face *Image, predict *PredictOptions, finetune *FinetuneOptions) (*Adapter, error) {
	img, free := cImage(face)
	defer free()
	pp, pprog := predictParams(predict)
	fp, fprog, freeP := finetuneParams(finetune)
	defer freeP()
	ph, del1 := handleOf(pprog, pprog == nil)
	defer del1()
	th, del2 := handleOf(fprog, fprog == nil)
	defer del2()
	var e C.hdbgo_err
	var out *C.hdb_adapter
	err := check(C.hdbgo_personalize(h.p, m.p, img, &pp, ph, &fp, th, &out, &e), &e)
	runtime.KeepAlive(h)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	return newAdapter(out), nil
}
