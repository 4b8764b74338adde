"""hdb: HyperDreamBooth for Stable Diffusion 1.x, from Python (ctypes over include/hdb.h).

    import hdb
    with hdb.Runtime(device="cpu") as rt, hdb.Model(rt, "tests/fixtures/tiny-sd") as model, \\
            hdb.Session(model) as session:
        images = session.generate(prompt="a photo of sks person", num_inference_steps=20)
        images[0].save("out.png")

Objects are context managers (and are freed when garbage-collected). A failing call raises
hdb.HdbError with the status and hdb's message, read on the calling thread right after the
call (hdb.h's rule). Callbacks may raise: the call is cancelled and the exception re-raised
from it. A Session belongs to one thread at a time; Session.cancel() works from any thread.
"""

import ctypes
import enum
import json
import os
import threading

import numpy as np

from . import _capi
from ._capi import lib

__all__ = [
    "HdbError", "Status", "Runtime", "Model", "Adapter", "Hypernet", "Session", "finetune",
    "set_log_callback", "version", "abi_version",
]


class Status(enum.IntEnum):
    """hdb_status."""

    OK = 0
    NULL_ARGUMENT = 1
    INVALID_ARGUMENT = 2
    FILE_NOT_FOUND = 3
    IO_ERROR = 4
    INVALID_FILE = 5
    NOT_A_MODEL = 6
    UNSUPPORTED_DTYPE = 7
    INVALID_MODEL = 8
    UNSUPPORTED = 9
    ADAPTER_MISMATCH = 10
    NO_DEVICE = 11
    DEVICE_ERROR = 12
    OUT_OF_MEMORY = 13
    CANCELLED = 14
    BUFFER_TOO_SMALL = 15
    PANIC = 16
    INTERNAL = 17
    BUSY = 18
    DIVERGED = 19


class HdbError(Exception):
    """A failed hdb call: .status (a Status, or the raw int for one this binding predates)
    and .message."""

    def __init__(self, status, message):
        try:
            status = Status(status)
        except ValueError:
            pass
        self.status = status
        self.message = message
        super().__init__(f"{lib.hdb_status_name(int(status)).decode()}: {message}")


def _last_error():
    buf = ctypes.create_string_buffer(512)
    n = lib.hdb_last_error_copy(buf, len(buf))
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        n = lib.hdb_last_error_copy(buf, len(buf))
    return buf.raw[:n].decode("utf-8", "replace")


def _check(status, callback=None):
    """Raises for a failed call: the callback's own exception first (it caused the cancel)."""
    if callback is not None and callback.error is not None:
        raise callback.error
    if status != 0:
        raise HdbError(status, _last_error())


def version():
    return lib.hdb_version_string().decode()


def abi_version():
    return lib.hdb_abi_version()


def _path(p):
    """A str, bytes or os.PathLike as the bytes hdb takes (any bytes on Unix)."""
    return os.fsencode(p)


class _Progress:
    """A ctypes trampoline for a Python progress callable; remembers what it raised."""

    def __init__(self, fn, train=False):
        self.fn = fn
        self.error = None

        def tramp(_ud, a, b, c):
            try:
                r = fn(a, b, c.decode() if isinstance(c, bytes) else c)
                return r is None or bool(r)  # None (no return) goes on
            except BaseException as e:  # noqa: BLE001 - re-raised after the call
                self.error = e
                return False

        self.c = (_capi.TRAIN_PROGRESS_FN if train else _capi.PROGRESS_FN)(tramp)


class _Handle:
    _free = None

    def __init__(self, ptr):
        self._ptr = ptr

    @property
    def _as_parameter_(self):
        # A closed handle passes NULL: hdb answers HDB_STATUS_NULL_ARGUMENT naming it.
        return self._ptr

    def close(self):
        p, self._ptr = getattr(self, "_ptr", None), None
        if p:
            type(self)._free(p)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _new(fn, *args, callback=None):
    out = ctypes.c_void_p()
    _check(fn(*args, ctypes.byref(out)), callback)
    return out


class Runtime(_Handle):
    """A device ("auto", "cpu", "cuda", "cuda:N") and CPU threads (0: one per core)."""

    _free = lib.hdb_runtime_free

    def __init__(self, device="auto", num_threads=0):
        p = _capi.RuntimeParams()
        lib.hdb_runtime_params_init(ctypes.byref(p), ctypes.sizeof(p))
        p.device = device.encode()
        p.num_threads = num_threads
        super().__init__(_new(lib.hdb_runtime_new, ctypes.byref(p)))

    def info(self):
        i = _capi.RuntimeInfo(struct_size=ctypes.sizeof(_capi.RuntimeInfo))
        _check(lib.hdb_runtime_get_info(self, ctypes.byref(i)))
        return {"device": "cuda" if i.device_kind == 1 else "cpu", "device_index": i.device_index,
                "num_threads": i.num_threads}


class Model(_Handle):
    """A Stable Diffusion 1.x model (diffusers folder or single-file checkpoint)."""

    _free = lib.hdb_model_free

    def __init__(self, runtime, path, weights_variant=0, storage=0, callback=None, tokenizer=None):
        """tokenizer: a tokenizer folder (or a diffusers folder with tokenizer/) used instead of
        the model's own; None: the model's, else the built-in CLIP tokenizer for SD 1.x."""
        p = _capi.ModelParams()
        lib.hdb_model_params_init(ctypes.byref(p), ctypes.sizeof(p))
        p.weights_variant = weights_variant
        p.storage = storage
        p.tokenizer = _path(tokenizer) if tokenizer is not None else None
        cb = _Progress(callback) if callback else None
        if cb:
            p.progress = cb.c
        super().__init__(_new(lib.hdb_model_load, runtime, _path(path), ctypes.byref(p), callback=cb))
        self.runtime = runtime

    @classmethod
    def from_bytes(cls, runtime, data, name=None, callback=None, tokenizer=None):
        """An LDM single-file checkpoint from its bytes (copied); `name` stands for its path in
        messages. callback(done, total, stage) and tokenizer as for loading from a path."""
        p = _capi.ModelParams()
        lib.hdb_model_params_init(ctypes.byref(p), ctypes.sizeof(p))
        p.tokenizer = _path(tokenizer) if tokenizer is not None else None
        cb = _Progress(callback) if callback else None
        if cb:
            p.progress = cb.c
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        self = cls.__new__(cls)
        _Handle.__init__(self, _new(lib.hdb_model_load_from_memory, runtime, buf, len(data),
                                    name.encode() if name else None, ctypes.byref(p), callback=cb))
        self.runtime = runtime
        return self

    def info(self):
        i = _capi.ModelInfo(struct_size=ctypes.sizeof(_capi.ModelInfo))
        _check(lib.hdb_model_get_info(self, ctypes.byref(i)))
        comp = lambda c: {"present": bool(c.present), "dtype": c.dtype,  # noqa: E731
                          "tensor_count": c.tensor_count, "parameter_count": c.parameter_count}
        return {"architecture": i.architecture, "source_format": i.source_format,
                "cross_attention_dim": i.cross_attention_dim, "has_tokenizer": bool(i.has_tokenizer),
                "unet": comp(i.unet), "text_encoder": comp(i.text_encoder), "vae": comp(i.vae)}

    def describe(self):
        """The model's description as a dict."""
        needed = ctypes.c_size_t()
        s = lib.hdb_model_describe(self, None, 0, ctypes.byref(needed))
        if s not in (0, Status.BUFFER_TOO_SMALL):
            _check(s)
        buf = ctypes.create_string_buffer(needed.value)
        _check(lib.hdb_model_describe(self, buf, len(buf), ctypes.byref(needed)))
        return json.loads(buf.value.decode())


class Adapter(_Handle):
    """An identity: LiDB, kohya or PEFT LoRA."""

    _free = lib.hdb_adapter_free

    @classmethod
    def load(cls, model, path, allow_unmatched=False):
        """allow_unmatched: skip the keys of a LoRA file that match no layer of the model
        (logged as warnings) instead of refusing the file."""
        if not allow_unmatched:
            return cls(_new(lib.hdb_adapter_load, model, _path(path)))
        p = _capi.AdapterLoadParams()
        lib.hdb_adapter_load_params_init(ctypes.byref(p), ctypes.sizeof(p))
        p.allow_unmatched = 1
        return cls(_new(lib.hdb_adapter_load_ex, model, _path(path), ctypes.byref(p)))

    @classmethod
    def from_bytes(cls, model, data):
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return cls(_new(lib.hdb_adapter_load_from_memory, model, buf, len(data)))

    def save(self, path):
        _check(lib.hdb_adapter_save(self, _path(path)))


def _face(image):
    """An RGB8 hdb_image over a contiguous uint8 [h, w, 3] array (PIL images converted)."""
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    a = np.ascontiguousarray(image, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"face: expected an RGB image [h, w, 3], got shape {a.shape}")
    img = _capi.Image(data=a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), data_len=a.nbytes,
                      width=a.shape[1], height=a.shape[0], stride=a.shape[1] * 3, format=0)
    return img, a  # keep `a` alive while hdb reads it


def _predict_params(iterations, callback):
    p = _capi.PredictParams()
    lib.hdb_predict_params_init(ctypes.byref(p), ctypes.sizeof(p))
    p.iterations = iterations
    cb = _Progress(callback) if callback else None
    if cb:
        p.progress = cb.c
    return p, cb


_LR = {"constant": 0, "constant_with_warmup": 1, "cosine": 2}


def _finetune_params(steps=0, rank=0, learning_rate=0.0, weight_decay=None, max_grad_norm=None,
                     lr_scheduler="constant", lr_warmup_steps=0, resolution=0,
                     gradient_checkpointing=True, seed=0, prompt=None, token=None, mode=0,
                     callback=None):
    p = _capi.FinetuneParams()
    lib.hdb_finetune_params_init(ctypes.byref(p), ctypes.sizeof(p))
    p.mode, p.steps, p.rank, p.lr = mode, steps, rank, learning_rate
    if weight_decay is not None:
        p.weight_decay = weight_decay
    if max_grad_norm is not None:
        p.max_grad_norm = max_grad_norm
    p.lr_schedule = _LR[lr_scheduler]
    p.warmup_steps, p.resolution = lr_warmup_steps, resolution
    p.checkpointing = 1 if gradient_checkpointing else 0
    p.seed = seed
    p.prompt = prompt.encode() if prompt else None
    p.token = token.encode() if token else None
    cb = _Progress(callback, train=True) if callback else None
    if cb:
        p.progress = cb.c
    return p, cb


def finetune(model, face, start=None, **kw):
    """Trains an identity on a face (hdb_finetune): rank-relaxed from `start`, or LiDB from zero.
    Keywords: steps, rank, learning_rate, weight_decay, max_grad_norm, lr_scheduler
    ("constant", "constant_with_warmup", "cosine"), lr_warmup_steps, resolution,
    gradient_checkpointing, seed, prompt, token, mode, callback(step, steps, loss)."""
    img, keep = _face(face)
    p, cb = _finetune_params(**kw)
    out = _new(lib.hdb_finetune, model, ctypes.byref(img), start, ctypes.byref(p), callback=cb)
    del keep
    return Adapter(out)


class Hypernet(_Handle):
    """Predicts an identity from one face crop."""

    _free = lib.hdb_hypernet_free

    def __init__(self, runtime, path):
        super().__init__(_new(lib.hdb_hypernet_load, runtime, _path(path)))

    def predict(self, model, face, iterations=0, callback=None):
        img, keep = _face(face)
        p, cb = _predict_params(iterations, callback)
        out = _new(lib.hdb_hypernet_predict, self, model, ctypes.byref(img), ctypes.byref(p), callback=cb)
        del keep
        return Adapter(out)

    def personalize(self, model, face, iterations=0, **finetune_kw):
        """Predict, then rank-relaxed finetuning (hdb_personalize); keywords as finetune()."""
        img, keep = _face(face)
        pp, _ = _predict_params(iterations, None)
        fp, cb = _finetune_params(**finetune_kw)
        out = _new(lib.hdb_personalize, self, model, ctypes.byref(img), ctypes.byref(pp),
                   ctypes.byref(fp), callback=cb)
        del keep
        return Adapter(out)


_SAMPLERS = {"ddim": 0, "euler": 1, "euler_a": 2, "dpmpp_2m": 3, "dpmpp_2m_karras": 4}
_MODES = {"merge": 0, "runtime": 1}


class Session(_Handle):
    """One thread's adapters on a model; generates images."""

    _free = lib.hdb_session_free

    def __init__(self, model):
        p = _capi.SessionParams()
        lib.hdb_session_params_init(ctypes.byref(p), ctypes.sizeof(p))
        super().__init__(_new(lib.hdb_session_new, model, ctypes.byref(p)))
        self.model = model

    def set_adapters(self, adapters, scales=None, mode="merge"):
        """Makes `adapters` the active set ([] removes them); mode "merge" or "runtime"."""
        n = len(adapters)
        arr = (ctypes.c_void_p * max(n, 1))(*[a._as_parameter_ for a in adapters])
        sc = None
        if scales is not None:
            if len(scales) != n:
                raise ValueError("scales: must be None or one per adapter")
            sc = (ctypes.c_float * n)(*scales)
        _check(lib.hdb_session_set_adapters(self, arr, sc, n, _MODES[mode]))

    def set_sample_adapters(self, indices):
        """Runtime mode: one index into the active set per image (-1: none); None: all share."""
        idx = (ctypes.c_int32 * len(indices))(*indices) if indices else None
        _check(lib.hdb_session_set_sample_adapters(self, idx, len(indices) if indices else 0))

    def generate(self, prompt="", negative_prompt="", num_inference_steps=25, guidance_scale=7.5,
                 width=512, height=512, num_images_per_prompt=1, seed=0, sampler="euler_a",
                 latents=None, callback=None, output_type="pil", progress_stages=False):
        """Renders images; names follow diffusers' pipeline call. output_type "pil" gives a
        list of PIL images, "np" a uint8 array [n, height, width, 3]. callback(step, steps,
        stage) returning False cancels (HdbError CANCELLED); with progress_stages=True it hears
        every phase ("build", "text", "denoise", "decode"), each at its start (done 0) and
        after each unit, not only the denoising steps."""
        p = _capi.GenerateParams()
        lib.hdb_generate_params_init(ctypes.byref(p), ctypes.sizeof(p))
        p.prompt, p.negative_prompt = prompt.encode(), negative_prompt.encode()
        p.steps, p.guidance, p.sampler = num_inference_steps, guidance_scale, _SAMPLERS[sampler]
        p.seed, p.width, p.height, p.batch = seed, width, height, num_images_per_prompt
        p.progress_stages = 1 if progress_stages else 0
        if latents is not None:
            lat = np.ascontiguousarray(latents, dtype=np.float32)
            p.latents = lat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            p.latents_len = lat.size
        cb = _Progress(callback) if callback else None
        if cb:
            p.progress = cb.c
        n = num_images_per_prompt
        out = np.zeros((n, height, width, 3), dtype=np.uint8)
        imgs = (_capi.Image * n)()
        for i in range(n):
            imgs[i].data = out[i].ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
            imgs[i].data_len = out[i].nbytes
        _check(lib.hdb_generate(self, ctypes.byref(p), imgs, n), cb)
        if output_type == "np":
            return out
        from PIL import Image

        return [Image.fromarray(a) for a in out]

    def unet(self, sample, timesteps, encoder_hidden_states):
        """One UNet evaluation: sample [b, 4, h, w], timesteps [b], encoder_hidden_states
        [b, tokens, 768] (float32) -> [b, 4, h, w]."""
        s = np.ascontiguousarray(sample, dtype=np.float32)
        t = np.ascontiguousarray(timesteps, dtype=np.float32)
        c = np.ascontiguousarray(encoder_hidden_states, dtype=np.float32)
        if s.ndim != 4 or c.ndim != 3:
            raise ValueError(f"unet: sample must be 4-D and context 3-D, got {s.shape}, {c.shape}")
        out = np.empty_like(s)
        f = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # noqa: E731
        _check(lib.hdb_session_unet(self, f(s), s.size, f(t), t.size, f(c), c.size, s.shape[0], s.shape[2],
                                    s.shape[3], c.shape[1], f(out), out.size))
        return out

    def cancel(self):
        """Cancels the call running on this session (from any thread)."""
        if self._ptr:
            lib.hdb_session_cancel(self._ptr)


# The log callback hdb holds, by id; hdb's destructor (_free_log) drops it once no thread is
# inside it, so the ctypes trampoline is never collected while hdb can call it.
_log_lock = threading.Lock()
_log_callbacks = {}
_log_next = [1]


@_capi.FREE_FN
def _free_log(ud):
    with _log_lock:
        _log_callbacks.pop(ud, None)


LOG_LEVELS = {"off": 0, "error": 1, "warn": 2, "info": 3, "debug": 4, "trace": 5}


def set_log_callback(fn, max_level="info"):
    """Sends hdb's log records up to max_level to fn(level: str, target, message), called from
    any thread. None stops logging. An exception raised by fn is dropped (a record is lost)."""
    if fn is None or max_level == "off":
        _check(lib.hdb_set_log_callback_ex(_capi.LOG_FN(), None, _capi.FREE_FN(), 0))
        return
    names = {v: k for k, v in LOG_LEVELS.items()}

    def tramp(_ud, level, target, message):
        try:
            fn(names.get(level, str(level)), target.decode("utf-8", "replace"),
               message.decode("utf-8", "replace"))
        except BaseException:  # noqa: BLE001 - must not unwind into hdb
            pass

    c = _capi.LOG_FN(tramp)
    with _log_lock:
        key = _log_next[0]
        _log_next[0] += 1
        _log_callbacks[key] = c
    s = lib.hdb_set_log_callback_ex(c, key, _free_log, LOG_LEVELS[max_level])
    if s != 0:
        with _log_lock:
            _log_callbacks.pop(key, None)  # not stored: still ours
        _check(s)


def _live_log_callbacks():
    with _log_lock:
        return len(_log_callbacks)


def _unset_log_at_exit():
    # hdb's worker threads must not call into a finalizing interpreter.
    if _live_log_callbacks():
        lib.hdb_set_log_callback_ex(_capi.LOG_FN(), None, _capi.FREE_FN(), 0)


import atexit  # noqa: E402

atexit.register(_unset_log_at_exit)
