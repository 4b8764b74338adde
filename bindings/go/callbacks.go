package hdb

// #include "shims.h"
import "C"

import (
	"runtime/cgo"
	"sync/atomic"
)

// logHandles counts log callbacks hdb still holds (tests check they are released).
var logHandles atomic.Int64

// The trampolines' Go halves. hdb may call them on its own worker threads; a panic in the
// user's function is recovered here (hdb.h: a callback must not unwind): a progress function
// that panics cancels the call, a log function that panics loses its record.

//export hdbgoProgress
func hdbgoProgress(h C.uintptr_t, done, total C.uint64_t, stage *C.char) (ok C.int) {
	defer func() {
		if recover() != nil {
			ok = 0
		}
	}()
	f := cgo.Handle(h).Value().(ProgressFunc)
	if f(uint64(done), uint64(total), C.GoString(stage)) {
		return 1
	}
	return 0
}

//export hdbgoTrainProgress
func hdbgoTrainProgress(h C.uintptr_t, step, steps C.uint64_t, loss C.float) (ok C.int) {
	defer func() {
		if recover() != nil {
			ok = 0
		}
	}()
	f := cgo.Handle(h).Value().(TrainProgressFunc)
	if f(uint64(step), uint64(steps), float32(loss)) {
		return 1
	}
	return 0
}

//export hdbgoLog
func hdbgoLog(h C.uintptr_t, level C.hdb_log_level, target, msg *C.char) {
	defer func() { _ = recover() }()
	f := cgo.Handle(h).Value().(LogFunc)
	f(LogLevel(level), C.GoString(target), C.GoString(msg))
}

// hdbgoDeleteHandle is the log callback's user-data destructor: hdb calls it once no thread
// can be inside the old callback any more.
//
//export hdbgoDeleteHandle
func hdbgoDeleteHandle(h C.uintptr_t) {
	cgo.Handle(h).Delete()
	logHandles.Add(-1)
}

// handleOf makes a handle for a callback that lives for one call (0 for nil).
func handleOf(f interface{}, isNil bool) (C.uintptr_t, func()) {
	if isNil {
		return 0, func() {}
	}
	h := cgo.NewHandle(f)
	return C.uintptr_t(h), h.Delete
}
