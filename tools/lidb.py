"""LiDB (Lightweight DreamBooth) reference library, numpy only: the v1 random orthonormal basis,
LiDB adapter files, and the export of a LiDB adapter to plain LoRA factors.

A LiDB adapter is a LoRA on attention projections whose two factors each pass through a fixed
random orthonormal basis. For a linear layer W [out, in] (PyTorch layout, y = x W^T):

    dW = alpha * U_aux [out, b] . U_train [b, r] . D_train [r, a] . D_aux [a, in]

Only D_train and U_train are stored per identity; D_aux and U_aux are regenerated from
(basis_seed, layer key, in, out, a, b) by `basis()`. Layer keys are canonical diffusers module
paths with a component prefix, e.g. `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`
or `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`.

Basis v1 (bit-reproducible; written from the format text, independently of hdb's Rust code):
  * splitmix64, all arithmetic mod 2^64: x += 0x9E3779B97F4A7C15; z = x;
    z = (z ^ z>>30) * 0xBF58476D1CE4E5B9; z = (z ^ z>>27) * 0x94D049BB133111EB; return z ^ z>>31.
  * fnv1a64 over the UTF-8 bytes of the key: h = 0xCBF29CE484222325; per byte h ^= byte; h *= 0x100000001B3.
  * seed_K = first output of splitmix64 started at x = basis_seed ^ fnv1a64(K); the layer's stream
    is a fresh splitmix64 started at x = seed_K.
  * uniform u = ((next() >> 11) + 0.5) * 2^-53 (the + 0.5 rounds to nearest-even in f64 for
    next() >> 11 >= 2^52, exactly as an f64 addition does in any IEEE language).
  * Box-Muller on consecutive pairs (u1, u2): r = sqrt(-2 ln u1), t = 2 pi u2 -> r cos t, then r sin t,
    in f64 (Python's math module, i.e. the platform libm: glibc on Linux, as Rust's f64::ln/cos/sin).
  * One sequence of a*in + b*out normals (pairs run across the boundary; an odd total drops the
    last sine): the first a*in fill D_aux [a, in] row-major, the rest Ut [b, out] row-major.
  * Rows of each orthonormalized by modified Gram-Schmidt in f64, the whole procedure run twice:
    for each row v in order, for each earlier row q in order: d = dot(v, q); v[k] -= d * q[k];
    then n = sqrt(dot(v, v)); v[k] /= n. Dots are plain left-to-right sums of rounded products
    (no FMA, no pairwise/BLAS summation): sum = 0; for k: sum += v[k] * q[k].
  * U_aux = Ut^T; both cast to f32 (round to nearest even). Requires a <= in, b <= out.

LiDB adapter v1 file (safetensors): metadata format=hdb-lidb, version=1, rank, a, b, basis_seed
(decimal u64), alpha (decimal float, Python repr), optional base; per adapted layer K:
`K.lidb_down` = D_train [r, a] and `K.lidb_up` = U_train [b, r], f32. This module writes v1
(the fixtures); load_lidb also reads v2, what hdb writes: `lidb_down` [L, r, a], `lidb_up`
[L, b, r] and metadata `layers`, the sorted keys front-coded one per line as "N:suffix" (N
characters shared with the previous key).

Used by tools/make_adapter_fixtures.py. Saving needs torch (the deterministic writer
make_op_fixtures.save_sorted); everything else is numpy + safetensors.
"""

import math
import os
import re
import sys

import numpy as np

MASK64 = (1 << 64) - 1
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
TWO_POW_M53 = 2.0 ** -53

FORMAT = "hdb-lidb"
VERSION = 1

# The projections LiDB adapts: attn1/attn2 of every UNet transformer block, and the CLIP text
# encoder's self-attention.
ADAPTED_RE = re.compile(
    r"^(unet\..*\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|text_encoder\..*\.self_attn\.(q_proj|k_proj|v_proj|out_proj))$")


# ---------------------------------------------------------------- integer parts

class SplitMix64:
    def __init__(self, state):
        self.x = int(state) & MASK64

    def next(self):
        self.x = (self.x + SPLITMIX_GAMMA) & MASK64
        z = self.x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def fnv1a64(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def layer_seed(basis_seed, key):
    """seed_K: the first output of splitmix64 started at basis_seed ^ fnv1a64(key)."""
    if not 0 <= int(basis_seed) <= MASK64:
        raise ValueError(f"basis_seed {basis_seed} is not a u64")
    return SplitMix64(int(basis_seed) ^ fnv1a64(key)).next()


def layer_stream(basis_seed, key):
    return SplitMix64(layer_seed(basis_seed, key))


# ---------------------------------------------------------------- floating-point parts

def uniform(rng):
    return (float(rng.next() >> 11) + 0.5) * TWO_POW_M53


def normals(rng, n):
    """n standard normals (f64) by Box-Muller on consecutive uniform pairs; for odd n the last
    pair's sine is dropped."""
    out = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        u1 = uniform(rng)
        u2 = uniform(rng)
        r = math.sqrt(-2.0 * math.log(u1))
        t = 2.0 * math.pi * u2
        out[i] = r * math.cos(t)
        if i + 1 < n:
            out[i + 1] = r * math.sin(t)
        i += 2
    return out


def seq_dot(x, y):
    """Left-to-right sum of the rounded products: ((x0 y0 + x1 y1) + x2 y2) + ..."""
    p = x * y
    return float(np.cumsum(p)[-1]) if p.size else 0.0


def mgs_rows_(m):
    """One modified Gram-Schmidt pass over the rows of the f64 matrix m, in place."""
    for i in range(m.shape[0]):
        v = m[i]
        for j in range(i):
            q = m[j]
            d = seq_dot(v, q)
            v -= d * q
        n = math.sqrt(seq_dot(v, v))
        if not n > 0.0:
            raise ValueError(f"row {i} is linearly dependent on the earlier rows")
        v /= n
    return m


def orthonormal_rows(m):
    """Rows of m orthonormalized: modified Gram-Schmidt run twice, f64."""
    m = np.array(m, dtype=np.float64, copy=True)
    mgs_rows_(m)
    mgs_rows_(m)
    return m


def basis_f64(key, n_in, n_out, a, b, basis_seed):
    """(D_aux [a, in], Ut [b, out]) in f64, rows orthonormal; U_aux = Ut.T."""
    if not (0 < a <= n_in and 0 < b <= n_out):
        raise ValueError(f"{key}: need 0 < a <= in and 0 < b <= out, got a={a} in={n_in} b={b} out={n_out}")
    z = normals(layer_stream(basis_seed, key), a * n_in + b * n_out)
    d_aux = orthonormal_rows(z[: a * n_in].reshape(a, n_in))
    ut = orthonormal_rows(z[a * n_in:].reshape(b, n_out))
    return d_aux, ut


def basis(key, n_in, n_out, a, b, basis_seed):
    """The v1 basis of layer `key`: (D_aux [a, in] f32, U_aux [out, b] f32)."""
    d_aux, ut = basis_f64(key, n_in, n_out, a, b, basis_seed)
    return d_aux.astype(np.float32), np.ascontiguousarray(ut.T).astype(np.float32)


# ---------------------------------------------------------------- LoRA export

def lora_factors(d_train, u_train, d_aux, u_aux, alpha):
    """Plain LoRA factors of one LiDB layer, alpha folded into up (so the LoRA scale is 1):
    down = D_train . D_aux [r, in], up = alpha * U_aux . U_train [out, r]; computed in f64 from
    the given (f32) factors, returned f32. up . down = dW."""
    d64 = np.asarray(d_train, np.float64) @ np.asarray(d_aux, np.float64)
    u64 = float(alpha) * (np.asarray(u_aux, np.float64) @ np.asarray(u_train, np.float64))
    return d64.astype(np.float32), u64.astype(np.float32)


def delta_weight(d_train, u_train, d_aux, u_aux, alpha):
    """dW [out, in] in f64 from the f32 factors: alpha * U_aux . U_train . D_train . D_aux."""
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    return float(alpha) * (f(u_aux) @ (f(u_train) @ (f(d_train) @ f(d_aux))))


def kohya_name(key):
    """`unet.<path>` -> kohya's `lora_unet_<path with '.' -> '_'>`; `text_encoder.<path>` ->
    `lora_te_<path with '.' -> '_'>` (e.g. lora_te_text_model_encoder_layers_0_self_attn_q_proj)."""
    if key.startswith("unet."):
        return "lora_unet_" + key[len("unet."):].replace(".", "_")
    if key.startswith("text_encoder."):
        return "lora_te_" + key[len("text_encoder."):].replace(".", "_")
    raise ValueError(f"{key}: no kohya name")


def to_kohya(factors):
    """{K: (down [r,in], up [out,r])} -> kohya LoRA state dict (numpy), .alpha = r (scale 1)."""
    sd = {}
    for key, (down, up) in factors.items():
        n = kohya_name(key)
        sd[n + ".lora_down.weight"] = down
        sd[n + ".lora_up.weight"] = up
        sd[n + ".alpha"] = np.array(down.shape[0], dtype=np.float32)
    return sd


def to_peft(factors):
    """{K: (down, up)} -> diffusers/PEFT LoRA state dict (numpy): K.lora_A.weight, K.lora_B.weight;
    no alphas, so lora_alpha = r and the scale is 1."""
    sd = {}
    for key, (down, up) in factors.items():
        sd[key + ".lora_A.weight"] = down
        sd[key + ".lora_B.weight"] = up
    return sd


# ---------------------------------------------------------------- LiDB files

class LidbAdapter:
    """An identity: rank, a, b, basis_seed, alpha, base (or None), layers {K: (D_train [r,a], U_train [b,r])}."""

    def __init__(self, layers, rank, a, b, basis_seed, alpha, base=None):
        self.layers = dict(layers)
        self.rank, self.a, self.b = int(rank), int(a), int(b)
        self.basis_seed, self.alpha, self.base = int(basis_seed), float(alpha), base
        self.validate()

    def validate(self):
        if not 0 <= self.basis_seed <= MASK64:
            raise ValueError(f"basis_seed {self.basis_seed} is not a u64")
        for key, (d, u) in self.layers.items():
            if not ADAPTED_RE.match(key):
                raise ValueError(f"{key} is not an adapted layer key")
            if d.dtype != np.float32 or u.dtype != np.float32:
                raise ValueError(f"{key}: factors must be f32, got {d.dtype}, {u.dtype}")
            if d.shape != (self.rank, self.a) or u.shape != (self.b, self.rank):
                raise ValueError(f"{key}: lidb_down {d.shape} / lidb_up {u.shape}, want "
                                 f"{(self.rank, self.a)} / {(self.b, self.rank)}")

    def metadata(self):
        m = {"format": FORMAT, "version": str(VERSION), "rank": str(self.rank), "a": str(self.a),
             "b": str(self.b), "basis_seed": str(self.basis_seed), "alpha": repr(self.alpha)}
        if self.base is not None:
            m["base"] = str(self.base)
        return m

    def tensors(self):
        out = {}
        for key, (d, u) in self.layers.items():
            out[key + ".lidb_down"] = d
            out[key + ".lidb_up"] = u
        return out

    def subset(self, keep):
        return LidbAdapter({k: v for k, v in self.layers.items() if keep(k)}, self.rank, self.a, self.b,
                           self.basis_seed, self.alpha, self.base)

    def factors(self, shapes):
        """{K: (down [r,in], up [out,r])} plain LoRA factors; shapes = {K: (in, out)}."""
        out = {}
        for key in sorted(self.layers):
            d_train, u_train = self.layers[key]
            n_in, n_out = shapes[key]
            d_aux, u_aux = basis(key, n_in, n_out, self.a, self.b, self.basis_seed)
            out[key] = lora_factors(d_train, u_train, d_aux, u_aux, self.alpha)
        return out


def save_tensors(tensors, path, metadata=None):
    """numpy dict -> safetensors with a deterministic header (make_op_fixtures.save_sorted).
    save_sorted cannot view a 0-d tensor as bytes, so scalars (kohya's `.alpha`) go in as [1] and
    their header shape is then rewritten to [], as real kohya files have it."""
    import json
    import struct

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_op_fixtures import save_sorted

    arrays = {k: np.array(v, order="C", copy=True) for k, v in tensors.items()}
    scalars = sorted(k for k, v in arrays.items() if v.ndim == 0)
    save_sorted({k: torch.from_numpy(v.reshape(1) if v.ndim == 0 else v) for k, v in arrays.items()}, path,
                metadata=metadata)
    if scalars:
        with open(path, "rb") as f:
            raw = f.read()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        for k in scalars:
            assert header[k]["shape"] == [1]
            header[k]["shape"] = []
        h = json.dumps(header, separators=(",", ":")).encode("utf-8")  # same key order as save_sorted wrote
        h += b" " * (-len(h) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def save_lidb(adapter, path):
    adapter.validate()
    save_tensors(adapter.tensors(), path, metadata=adapter.metadata())


def load_lidb(path):
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT or meta.get("version") not in (str(VERSION), "2"):
        raise ValueError(f"{path}: not a LiDB v1/v2 file (format={meta.get('format')!r}, "
                         f"version={meta.get('version')!r})")
    layers = {}
    if meta["version"] == "2":
        # Packed factors; `layers` front-codes the sorted keys as "N:suffix" lines.
        keys, prev = [], ""
        for line in meta["layers"].split("\n"):
            n, suffix = line.split(":", 1)
            prev = prev[: int(n)] + suffix
            keys.append(prev)
        down, up = tensors["lidb_down"], tensors["lidb_up"]
        if set(tensors) != {"lidb_down", "lidb_up"} or len(down) != len(keys) or len(up) != len(keys):
            raise ValueError(f"{path}: v2 tensors {sorted(tensors)} do not match {len(keys)} layers")
        layers = {k: (down[i], up[i]) for i, k in enumerate(keys)}
        tensors = {}
    for name in tensors:
        if name.endswith(".lidb_down"):
            key = name[: -len(".lidb_down")]
            if key + ".lidb_up" not in tensors:
                raise ValueError(f"{path}: {key} has lidb_down but no lidb_up")
            layers[key] = (tensors[name], tensors[key + ".lidb_up"])
        elif not name.endswith(".lidb_up"):
            raise ValueError(f"{path}: unexpected tensor {name}")
        elif name[: -len(".lidb_up")] + ".lidb_down" not in tensors:
            raise ValueError(f"{path}: {name} has no lidb_down")
    return LidbAdapter(layers, int(meta["rank"]), int(meta["a"]), int(meta["b"]), int(meta["basis_seed"]),
                       float(meta["alpha"]), meta.get("base"))
