"""ctypes declarations of include/hdb.h (layouts checked against the library's struct_size
values by tests/test_hdb.py) and the loading of libhdb."""

import ctypes
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_float,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

# hdb_progress_fn, hdb_train_progress_fn, hdb_log_fn, hdb_free_fn.
PROGRESS_FN = CFUNCTYPE(c_bool, c_void_p, c_uint64, c_uint64, c_char_p)
TRAIN_PROGRESS_FN = CFUNCTYPE(c_bool, c_void_p, c_uint64, c_uint64, c_float)
LOG_FN = CFUNCTYPE(None, c_void_p, c_uint32, c_char_p, c_char_p)
FREE_FN = CFUNCTYPE(None, c_void_p)


class RuntimeParams(Structure):
    _fields_ = [("struct_size", c_uint32), ("num_threads", c_uint32), ("device", c_char_p)]


class ModelParams(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("weights_variant", c_uint32),
        ("progress", PROGRESS_FN),
        ("progress_user_data", c_void_p),
        ("storage", c_uint32),
        ("reserved", c_uint32),
        ("tokenizer", c_char_p),
    ]


class AdapterLoadParams(Structure):
    _fields_ = [("struct_size", c_uint32), ("allow_unmatched", c_uint32)]


class SessionParams(Structure):
    _fields_ = [("struct_size", c_uint32), ("reserved", c_uint32)]


class GenerateParams(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("steps", c_uint32),
        ("guidance", c_float),
        ("sampler", c_uint32),
        ("seed", c_uint64),
        ("width", c_uint32),
        ("height", c_uint32),
        ("batch", c_uint32),
        ("reserved", c_uint32),
        ("prompt", c_char_p),
        ("negative_prompt", c_char_p),
        ("latents", POINTER(c_float)),
        ("latents_len", c_size_t),
        ("progress", PROGRESS_FN),
        ("progress_user_data", c_void_p),
        ("progress_stages", c_uint32),
    ]


class PredictParams(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("iterations", c_uint32),
        ("progress", PROGRESS_FN),
        ("progress_user_data", c_void_p),
    ]


class FinetuneParams(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("mode", c_uint32),
        ("steps", c_uint32),
        ("rank", c_uint32),
        ("lr", c_float),
        ("weight_decay", c_float),
        ("max_grad_norm", c_float),
        ("lr_schedule", c_uint32),
        ("warmup_steps", c_uint32),
        ("resolution", c_uint32),
        ("checkpointing", c_uint32),
        ("seed", c_uint64),
        ("prompt", c_char_p),
        ("token", c_char_p),
        ("progress", TRAIN_PROGRESS_FN),
        ("progress_user_data", c_void_p),
    ]


class Image(Structure):
    _fields_ = [
        ("data", POINTER(c_uint8)),
        ("data_len", c_size_t),
        ("width", c_uint32),
        ("height", c_uint32),
        ("stride", c_uint32),
        ("format", c_uint32),
    ]


class ComponentInfo(Structure):
    _fields_ = [
        ("present", c_uint32),
        ("dtype", c_uint32),
        ("tensor_count", c_uint64),
        ("parameter_count", c_uint64),
    ]


class ModelInfo(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("architecture", c_uint32),
        ("source_format", c_uint32),
        ("cross_attention_dim", c_uint32),
        ("has_tokenizer", c_uint32),
        ("reserved0", c_uint32),
        ("unet", ComponentInfo),
        ("text_encoder", ComponentInfo),
        ("vae", ComponentInfo),
    ]


class RuntimeInfo(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("device_kind", c_uint32),
        ("device_index", c_uint32),
        ("num_threads", c_uint32),
    ]


def _find_library():
    """HDB_LIBRARY, else the copy bundled by `pip install`, else the system's libhdb.so.1."""
    env = os.environ.get("HDB_LIBRARY")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("libhdb.so.1", "libhdb.so"):
        p = os.path.join(here, name)
        if os.path.exists(p):
            return p
    return "libhdb.so.1"


lib = ctypes.CDLL(_find_library())

P = POINTER
_status = c_uint32
_opaque = c_void_p  # every handle is an opaque pointer
_protos = {
    "hdb_runtime_params_init": (_status, [P(RuntimeParams), c_size_t]),
    "hdb_runtime_params_default": (RuntimeParams, []),
    "hdb_runtime_new": (_status, [P(RuntimeParams), P(_opaque)]),
    "hdb_runtime_get_info": (_status, [_opaque, P(RuntimeInfo)]),
    "hdb_runtime_free": (None, [_opaque]),
    "hdb_model_params_init": (_status, [P(ModelParams), c_size_t]),
    "hdb_model_params_default": (ModelParams, []),
    "hdb_model_load": (_status, [_opaque, c_char_p, P(ModelParams), P(_opaque)]),
    "hdb_model_load_from_memory": (
        _status,
        [_opaque, P(c_uint8), c_size_t, c_char_p, P(ModelParams), P(_opaque)],
    ),
    "hdb_model_get_info": (_status, [_opaque, P(ModelInfo)]),
    "hdb_model_describe": (_status, [_opaque, P(c_char), c_size_t, P(c_size_t)]),
    "hdb_model_free": (None, [_opaque]),
    "hdb_adapter_load": (_status, [_opaque, c_char_p, P(_opaque)]),
    "hdb_adapter_load_params_init": (_status, [P(AdapterLoadParams), c_size_t]),
    "hdb_adapter_load_params_default": (AdapterLoadParams, []),
    "hdb_adapter_load_ex": (_status, [_opaque, c_char_p, P(AdapterLoadParams), P(_opaque)]),
    "hdb_adapter_load_from_memory": (_status, [_opaque, P(c_uint8), c_size_t, P(_opaque)]),
    "hdb_adapter_save": (_status, [_opaque, c_char_p]),
    "hdb_adapter_free": (None, [_opaque]),
    "hdb_hypernet_load": (_status, [_opaque, c_char_p, P(_opaque)]),
    "hdb_predict_params_init": (_status, [P(PredictParams), c_size_t]),
    "hdb_predict_params_default": (PredictParams, []),
    "hdb_hypernet_predict": (_status, [_opaque, _opaque, P(Image), P(PredictParams), P(_opaque)]),
    "hdb_hypernet_free": (None, [_opaque]),
    "hdb_finetune_params_init": (_status, [P(FinetuneParams), c_size_t]),
    "hdb_finetune_params_default": (FinetuneParams, []),
    "hdb_finetune": (_status, [_opaque, P(Image), _opaque, P(FinetuneParams), P(_opaque)]),
    "hdb_personalize": (
        _status,
        [_opaque, _opaque, P(Image), P(PredictParams), P(FinetuneParams), P(_opaque)],
    ),
    "hdb_session_params_init": (_status, [P(SessionParams), c_size_t]),
    "hdb_session_params_default": (SessionParams, []),
    "hdb_session_new": (_status, [_opaque, P(SessionParams), P(_opaque)]),
    "hdb_session_set_adapters": (_status, [_opaque, P(_opaque), P(c_float), c_size_t, c_uint32]),
    "hdb_session_set_sample_adapters": (_status, [_opaque, P(c_int32), c_size_t]),
    "hdb_generate_params_init": (_status, [P(GenerateParams), c_size_t]),
    "hdb_generate_params_default": (GenerateParams, []),
    "hdb_generate": (_status, [_opaque, P(GenerateParams), P(Image), c_size_t]),
    "hdb_session_unet": (
        _status,
        [_opaque, P(c_float), c_size_t, P(c_float), c_size_t, P(c_float), c_size_t]
        + [c_uint32] * 4
        + [P(c_float), c_size_t],
    ),
    "hdb_session_cancel": (_status, [_opaque]),
    "hdb_session_free": (None, [_opaque]),
    "hdb_last_error_copy": (c_size_t, [P(c_char), c_size_t]),
    "hdb_set_log_callback_ex": (_status, [LOG_FN, c_void_p, FREE_FN, c_uint32]),
    "hdb_status_name": (c_char_p, [c_uint32]),
    "hdb_version_string": (c_char_p, []),
    "hdb_abi_version": (c_uint32, []),
}
# The header this binding was written against (a newer library may only add to it).
HDB_ABI_VERSION = 1

for _name, (_res, _args) in _protos.items():
    _f = getattr(lib, _name)
    _f.restype = _res
    _f.argtypes = _args
