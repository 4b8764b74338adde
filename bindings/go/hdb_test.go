package hdb

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

var fixtures = filepath.Join("..", "..", "tests", "fixtures")

func setup(t *testing.T) (*Runtime, *Model) {
	t.Helper()
	rt, err := NewRuntime(RuntimeOptions{Device: "cpu", NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(rt, filepath.Join(fixtures, "tiny-sd"), nil)
	if err != nil {
		t.Fatal(err)
	}
	return rt, m
}

func small(seed uint64) GenerateOptions {
	ddim := uint32(0) // HDB_SAMPLER_DDIM
	return GenerateOptions{Prompt: "a photo of sks person", Steps: 2, Width: 64, Height: 64, Seed: seed, Sampler: &ddim}
}

func TestVersionAndStatuses(t *testing.T) {
	if ABIVersion() != HeaderABIVersion {
		t.Fatalf("library ABI %d, header %d", ABIVersion(), HeaderABIVersion)
	}
	if StatusBusy.String() != "HDB_STATUS_BUSY" || StatusOK.String() != "HDB_STATUS_OK" {
		t.Fatalf("status names: %s %s", StatusBusy, StatusOK)
	}
}

func TestGenerate(t *testing.T) {
	rt, m := setup(t)
	defer rt.Close()
	defer m.Close()
	info, err := m.Info()
	if err != nil || info.Architecture != 1 || info.UNetParameters == 0 {
		t.Fatalf("info %+v, %v", info, err)
	}
	s, err := NewSession(m)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	steps := 0
	o := small(7)
	o.Progress = func(done, total uint64, stage string) bool { steps++; return stage != "" }
	a, err := s.Generate(o)
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != 1 || a[0].Width != 64 || len(a[0].Pix) != 64*64*3 || steps < 2 {
		t.Fatalf("got %d images, %dx%d, %d progress calls", len(a), a[0].Width, a[0].Height, steps)
	}
	b, err := s.Generate(small(7))
	if err != nil || !bytes.Equal(a[0].Pix, b[0].Pix) {
		t.Fatalf("same seed, different image (%v)", err)
	}
	// Every phase, each when it starts and after each unit.
	var seen []string
	o.Progress = func(done, total uint64, stage string) bool {
		seen = append(seen, fmt.Sprintf("%s %d/%d", stage, done, total))
		return true
	}
	o.ProgressStages = true
	if _, err := s.Generate(o); err != nil {
		t.Fatal(err)
	}
	if len(seen) < 4 || seen[0] != "build 0/3" || seen[len(seen)-1] != "decode 1/1" {
		t.Fatalf("stages %v", seen)
	}
	ad, err := LoadAdapter(m, filepath.Join(fixtures, "adapter", "id1.lidb.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetAdapters([]*Adapter{ad}, []float32{1}, ApplyMerge); err != nil {
		t.Fatal(err)
	}
	ad.Close() // the session keeps its own reference
	c, err := s.Generate(small(7))
	if err != nil || bytes.Equal(a[0].Pix, c[0].Pix) {
		t.Fatalf("the identity did not change the image (%v)", err)
	}
	if c[0].ToRGBA().Bounds().Dx() != 64 {
		t.Fatal("ToRGBA size")
	}
}

func TestErrorsCarryTheirMessage(t *testing.T) {
	rt, m := setup(t)
	defer rt.Close()
	defer m.Close()
	s, _ := NewSession(m)
	defer s.Close()
	o := small(1)
	o.Width = 63
	_, err := s.Generate(o)
	var he *Error
	if !errors.As(err, &he) || he.Status != StatusInvalidArgument || !strings.Contains(he.Message, "width") {
		t.Fatalf("want InvalidArgument naming width, got %v", err)
	}
}

// Many goroutines fail at once, each with its own path in the message, yielding between
// calls so they hop OS threads: every error must name its own goroutine's path.
func TestErrorsFromManyGoroutines(t *testing.T) {
	rt, err := NewRuntime(RuntimeOptions{Device: "cpu", NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	const goroutines, rounds = 32, 50
	var wrong sync.Map
	var wg sync.WaitGroup
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				path := fmt.Sprintf("/nonexistent/hdb-go-%d-%d", g, i)
				_, err := LoadModel(rt, path, nil)
				runtime.Gosched()
				var he *Error
				if !errors.As(err, &he) || he.Status != StatusFileNotFound || !strings.Contains(he.Message, path) {
					wrong.Store(path, fmt.Sprint(err))
				}
			}
		}(g)
	}
	wg.Wait()
	n := 0
	wrong.Range(func(k, v interface{}) bool {
		if n < 3 {
			t.Errorf("%s got %s", k, v)
		}
		n++
		return true
	})
	if n > 0 {
		t.Fatalf("%d of %d errors carried another call's message", n, goroutines*rounds)
	}
}

func TestCancelAndPanickingCallbacks(t *testing.T) {
	rt, m := setup(t)
	defer rt.Close()
	defer m.Close()
	s, _ := NewSession(m)
	defer s.Close()
	o := small(3)
	o.Steps = 20
	o.Progress = func(done, total uint64, stage string) bool { s.Cancel(); return true }
	_, err := s.Generate(o)
	var he *Error
	if !errors.As(err, &he) || he.Status != StatusCancelled {
		t.Fatalf("Cancel from the progress function: want Cancelled, got %v", err)
	}
	o.Progress = func(done, total uint64, stage string) bool { panic("from the callback") }
	_, err = s.Generate(o)
	if !errors.As(err, &he) || he.Status != StatusCancelled {
		t.Fatalf("a panicking progress function: want Cancelled, got %v", err)
	}
	// The session is still usable.
	if _, err := s.Generate(small(3)); err != nil {
		t.Fatal(err)
	}
}

func TestLogCallbackIsReleased(t *testing.T) {
	var mu sync.Mutex
	records := 0
	err := SetLogCallback(func(level LogLevel, target, message string) {
		mu.Lock()
		records++
		mu.Unlock()
		if level == LogTrace {
			panic("a panic here must not reach hdb")
		}
	}, LogTrace)
	if err != nil {
		t.Fatal(err)
	}
	rt, m := setup(t)
	m.Close()
	rt.Close()
	if err := SetLogCallback(nil, LogOff); err != nil {
		t.Fatal(err)
	}
	if logHandles.Load() != 0 {
		t.Fatalf("%d log handles still held after removing the callback", logHandles.Load())
	}
	mu.Lock()
	defer mu.Unlock()
	if records == 0 {
		t.Fatal("no log records")
	}
}

// Objects left to the garbage collector are freed by finalizers without harm.
func TestFinalizers(t *testing.T) {
	for i := 0; i < 3; i++ {
		rt, m := setup(t)
		s, err := NewSession(m)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Generate(small(1)); err != nil {
			t.Fatal(err)
		}
		_ = rt
	}
	runtime.GC()
	runtime.GC()
}

// The crash: a session whose last reference is the receiver of a running Generate,
// with the collector running meanwhile. KeepAlive in every method keeps the finalizer from
// freeing it mid-call (and hdb_session_free would leak, not free, a session still in a call,
// so this checks the outcome, not which of the two guards acted).
func TestNoFinalizerDuringACall(t *testing.T) {
	rt, m := setup(t)
	defer rt.Close()
	defer m.Close()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
				runtime.GC()
			}
		}
	}()
	var want []byte
	for i := 0; i < 4; i++ {
		s, err := NewSession(m)
		if err != nil {
			t.Fatal(err)
		}
		o := small(9)
		o.Steps = 4
		imgs, err := s.Generate(o) // s is unreachable after this call starts
		if err != nil {
			t.Fatal(err)
		}
		if want == nil {
			want = imgs[0].Pix
		} else if !bytes.Equal(want, imgs[0].Pix) {
			t.Fatal("an image changed while the collector ran")
		}
	}
	close(stop)
	<-done
}

// Predict, finetune and personalize on the tiny fixtures: the params structs' layouts are
// right when hdb runs exactly the steps asked for and reports finite losses.
func TestIdentityFromAFace(t *testing.T) {
	rt, m := setup(t)
	defer rt.Close()
	defer m.Close()
	face := &Image{Width: 32, Height: 32, Pix: make([]byte, 32*32*3)}
	for i := range face.Pix {
		face.Pix[i] = byte(i * 7)
	}
	net, err := LoadHypernet(rt, filepath.Join(fixtures, "hypernet", "tiny.hypernet.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer net.Close()
	iters := 0
	pred, err := net.Predict(m, face, &PredictOptions{Iterations: 2, Progress: func(d, n uint64, s string) bool { iters++; return true }})
	if err != nil || iters != 2 {
		t.Fatalf("predict: %v, %d iterations reported", err, iters)
	}
	defer pred.Close()
	steps := 0
	opts := &FinetuneOptions{Steps: 2, Resolution: 64, Seed: 1, Progress: func(step, n uint64, loss float32) bool {
		steps++
		return n == 2 && loss == loss // false on NaN
	}}
	zero, err := Finetune(m, face, nil, opts)
	if err != nil || steps != 2 {
		t.Fatalf("finetune from zero: %v, %d steps", err, steps)
	}
	zero.Close()
	steps = 0
	tuned, err := net.Personalize(m, face, nil, opts)
	if err != nil || steps != 2 {
		t.Fatalf("personalize: %v, %d steps", err, steps)
	}
	if err := tuned.Save(filepath.Join(t.TempDir(), "me.safetensors")); err != nil {
		t.Fatal(err)
	}
	tuned.Close()
}

// The remaining calls: per-image adapters from a file's bytes, one UNet evaluation, the
// model's description and the runtime's info.
func TestSampleAdaptersAndUNet(t *testing.T) {
	rt, m := setup(t)
	defer rt.Close()
	defer m.Close()
	if info, err := rt.Info(); err != nil || info.NumThreads != 2 || info.DeviceKind != 0 {
		t.Fatalf("runtime info %+v, %v", info, err)
	}
	if d, err := m.Describe(); err != nil || !strings.HasPrefix(d, "{") {
		t.Fatalf("describe %q, %v", d, err)
	}
	data, err := os.ReadFile(filepath.Join(fixtures, "adapter", "id1.lidb.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	ad, err := LoadAdapterFromMemory(m, data)
	if err != nil {
		t.Fatal(err)
	}
	defer ad.Close()
	s, _ := NewSession(m)
	defer s.Close()
	if err := s.SetAdapters([]*Adapter{ad}, nil, ApplyRuntime); err != nil {
		t.Fatal(err)
	}
	if err := s.SetSampleAdapters([]int32{-1, 0}); err != nil {
		t.Fatal(err)
	}
	o := small(4)
	o.Batch = 2
	two, err := s.Generate(o)
	if err != nil || len(two) != 2 || bytes.Equal(two[0].Pix, two[1].Pix) {
		t.Fatalf("two identities in one batch: %v", err)
	}
	info, _ := m.Info()
	sample := make([]float32, 4*8*8)
	for i := range sample {
		sample[i] = float32(i%7) / 7
	}
	ctx := make([]float32, 77*int(info.CrossAttentionDim))
	out := make([]float32, len(sample))
	if err := s.SetSampleAdapters(nil); err != nil {
		t.Fatal(err)
	}
	if err := s.UNet(sample, []float32{10}, ctx, 1, 8, 8, 77, out); err != nil {
		t.Fatal(err)
	}
	changed := false
	for i, v := range out {
		if v != v {
			t.Fatalf("NaN at %d", i)
		}
		changed = changed || v != sample[i]
	}
	if !changed {
		t.Fatal("the UNet returned its input")
	}
}

// A single-file checkpoint from its bytes is the model loaded from its path.
func TestModelFromMemory(t *testing.T) {
	rt, err := NewRuntime(RuntimeOptions{Device: "cpu", NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	path := filepath.Join(fixtures, "tiny-sd-ldm.safetensors")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	disk, err := LoadModel(rt, path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	loads := 0
	mem, err := LoadModelFromMemory(rt, data, "tiny.safetensors", &ModelOptions{Progress: func(d, n uint64, s string) bool { loads++; return s == "load" }})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	a, _ := disk.Info()
	b, _ := mem.Info()
	if a != b || b.SourceFormat != 2 || loads == 0 {
		t.Fatalf("from disk %+v, from memory %+v, %d progress calls", a, b, loads)
	}
	_, err = LoadModelFromMemory(rt, data[:1000], "cut.safetensors", nil)
	var he *Error
	if !errors.As(err, &he) || he.Status != StatusInvalidFile || !strings.Contains(he.Message, "cut.safetensors") {
		t.Fatalf("a truncated buffer: %v", err)
	}
}

func TestTokenizerAndAllowUnmatched(t *testing.T) {
	rt, err := NewRuntime(RuntimeOptions{Device: "cpu", NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	m, err := LoadModel(rt, filepath.Join(fixtures, "tiny-sd-ldm.safetensors"),
		&ModelOptions{Tokenizer: filepath.Join(fixtures, "tiny-sd")})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if info, err := m.Info(); err != nil || !info.HasTokenizer {
		t.Fatalf("the given tokenizer is not the model's: %+v, %v", info, err)
	}
	if _, err := LoadModel(rt, filepath.Join(fixtures, "tiny-sd-ldm.safetensors"),
		&ModelOptions{Tokenizer: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "tokenizer") {
		t.Fatalf("a folder without a tokenizer: %v", err)
	}
	ad, err := LoadAdapterWith(m, filepath.Join(fixtures, "adapter", "id1.lidb.safetensors"), AdapterOptions{AllowUnmatched: true})
	if err != nil {
		t.Fatal(err)
	}
	ad.Close()
}
