"""The HyperDreamBooth hypernetwork in hypernetwork format v1 (DESIGN.md section 4): hdb's
PyTorch reference, built from the modules users trust, and the maker of its test fixtures.

    encoder       timm.models.vision_transformer.VisionTransformer (CLIP ViT-H/14 shape by default:
                  class token, norm_pre, qkv bias, exact GELU, LayerNorm eps from the config);
                  the image tokens are `forward_features`: every token, class token included,
                  after the final `norm`.
    feature_proj  nn.Linear(width, d_model)
    weight_embed  nn.Linear(a*r + b*r, d_model); layer_pos [L, d_model]
    decoder       nn.TransformerDecoder of `layers` x nn.TransformerDecoderLayer(d_model, heads,
                  4*d_model, dropout=0, activation="gelu", batch_first=True, norm_first=True),
                  with its final norm `decoder.norm` = nn.LayerNorm(d_model)
    heads         heads.weight [L, a*r + b*r, d_model], heads.bias [L, a*r + b*r]: one linear per
                  layer token

Prediction: theta [L, a*r + b*r] starts at 0; each of `iterations` steps adds
    heads(decoder(tgt = weight_embed(theta) + layer_pos, memory = feature_proj(image_tokens)))
(`decoder` includes its final norm). Row l of theta is layer_keys[l]'s LiDB factors:
[D_train [r, a] row-major, U_train [b, r] row-major].

Input: an RGB8 face crop of any size, center-cropped to a square of side min(w, h) at
((w - side) // 2, (h - side) // 2), each channel resized as a float (mode "F") Pillow image with
Image.resize((img_size, img_size), BILINEAR) (an antialiased triangle filter), divided by 255,
normalized with the config's image_mean / image_std.

File: safetensors with every tensor under the names above (`encoder.*` exactly timm's state-dict
names) and the JSON config under the metadata key `config` (see `default_config`). Weights may be
stored f32, f16 or bf16; hdb computes in f32.

Training (not done here; where a training script would start). HyperDreamBooth (Ruiz et al. 2023,
section 4) trains this network on many identities, each with a face photo x_i and LiDB weights
theta_i* pre-optimized for that identity (DreamBooth run on the LiDB factors alone, frozen SD):
  loss = lambda_w * sum_k ||theta_k(x_i) - theta_i*||^2          (weight loss, per iteration k)
       + lambda_d * E_{t, eps} ||eps - eps_SD+LiDB(theta_s(x_i))(z_t(x_i), t, "a [V] face")||^2
with the diffusion loss run through the frozen UNet with the predicted adapter applied (the LiDB
basis of tools/lidb.py turns theta into dW). `Hypernet` below is a plain nn.Module whose
`predict` returns every iteration's theta, so both terms can be written on top of it.

Run from the repository root with the reference venv (/tmp/hdb-ref-venv/bin/python):
  tools/hypernet_ref.py fixtures                 tests/fixtures/hypernet/ (see make_fixtures)
  tools/hypernet_ref.py random --config tiny|default|CONFIG.json -o FILE [--seed N] [--f16]
  tools/hypernet_ref.py predict --hypernet FILE --face IMAGE [--iterations S] -o ADAPTER
  tools/hypernet_ref.py bench [--threads 2] [--repeat 2]   one prediction at the default config
  tools/hypernet_ref.py check-preprocess         hdb's resize algorithm (numpy) against Pillow
"""

import argparse
import json
import statistics
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests/fixtures/hypernet")

FORMAT = "hdb-hypernet"
VERSION = 1
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
ENCODER_FIELDS = ["img_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "pre_norm",
                  "class_token", "layer_norm_eps", "image_mean", "image_std"]
FIELDS = ["format", "version", "encoder", "d_model", "heads", "layers", "rank", "a", "b",
          "basis_seed", "alpha", "iterations", "layer_keys"]


def sd15_layer_keys():
    """SD 1.5's 176 adaptable layers in model order: 128 UNet attention projections (attn1 then
    attn2 of each of the 16 transformer blocks, q, k, v, out) and 48 text-encoder ones."""
    blocks = [f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)]
    blocks += ["mid_block.attentions.0"]
    blocks += [f"up_blocks.{i}.attentions.{j}" for i in range(1, 4) for j in range(3)]
    keys = [f"unet.{b}.transformer_blocks.0.{attn}.{p}" for b in blocks for attn in ("attn1", "attn2")
            for p in ("to_q", "to_k", "to_v", "to_out.0")]
    keys += [f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}" for i in range(12)
             for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    return keys


def default_config():
    """The default: CLIP ViT-H/14 at 224 px, d_model 1024, 8 heads, 4 decoder layers, SD 1.5's 176
    layers, the paper's r = 1, a = 100, b = 50, 4 iterations."""
    return {
        "format": FORMAT, "version": VERSION,
        "encoder": {"img_size": 224, "patch_size": 14, "width": 1280, "depth": 32, "heads": 16,
                    "mlp_ratio": 4.0, "pre_norm": True, "class_token": True, "layer_norm_eps": 1e-5,
                    "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
        "d_model": 1024, "heads": 8, "layers": 4, "rank": 1, "a": 100, "b": 50,
        "basis_seed": 0x48444221, "alpha": 1.0, "iterations": 4, "layer_keys": sd15_layer_keys(),
    }


def tiny_config():
    """The test config: a small ViT, d_model 64, 2 decoder layers, 5 of tiny-sd's layers."""
    keys = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
            "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            "text_encoder.text_model.encoder.layers.1.self_attn.out_proj"]
    return {
        "format": FORMAT, "version": VERSION,
        "encoder": {"img_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2,
                    "mlp_ratio": 4.0, "pre_norm": True, "class_token": True, "layer_norm_eps": 1e-5,
                    "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
        "d_model": 64, "heads": 2, "layers": 2, "rank": 1, "a": 3, "b": 2,
        "basis_seed": 1234567890123456789, "alpha": 0.8, "iterations": 4, "layer_keys": keys,
    }


def check_config(cfg):
    for f in FIELDS:
        if f not in cfg:
            raise ValueError(f"hypernetwork config has no field '{f}'")
    for f in ENCODER_FIELDS:
        if f not in cfg["encoder"]:
            raise ValueError(f"hypernetwork config has no field 'encoder.{f}'")
    if cfg["format"] != FORMAT or cfg["version"] != VERSION:
        raise ValueError(f"not a {FORMAT} v{VERSION} config")
    if len(cfg["layer_keys"]) == 0 or len(set(cfg["layer_keys"])) != len(cfg["layer_keys"]):
        raise ValueError("layer_keys must be a non-empty list of distinct keys")
    return cfg


def token_dim(cfg):
    return (cfg["a"] + cfg["b"]) * cfg["rank"]


# ---------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(rgb, cfg):
    """RGB8 [h, w, 3] -> float32 [3, img_size, img_size] (see the module docstring)."""
    from PIL import Image

    e = cfg["encoder"] if "encoder" in cfg else cfg
    size = e["img_size"]
    h, w, _ = rgb.shape
    side = min(w, h)
    x0, y0 = (w - side) // 2, (h - side) // 2
    crop = rgb[y0:y0 + side, x0:x0 + side]
    out = np.empty((3, size, size), np.float32)
    for c in range(3):
        im = Image.fromarray(np.ascontiguousarray(crop[:, :, c]).astype(np.float32))
        assert im.mode == "F"
        x = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), np.float32) / np.float32(255.0)
        out[c] = (x - np.float32(e["image_mean"][c])) / np.float32(e["image_std"][c])
    return out


def pillow_bilinear_np(plane, size):
    """Pillow's ImagingResample (libImaging/Resample.c) for mode F with the bilinear (triangle)
    filter, written out in numpy: per axis, per output pixel, a window [xmin, xmin + n) and
    normalised weights in f64; horizontal pass first, each pass rounded to f32. hdb's Rust code
    implements this; `check-preprocess` shows it equal to Pillow."""

    def coeffs(in_size, out_size):
        scale = in_size / out_size
        filterscale = max(scale, 1.0)
        support = 1.0 * filterscale
        ss = 1.0 / filterscale
        rows = []
        for xx in range(out_size):
            center = (xx + 0.5) * scale
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size) - xmin
            w = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * ss)) for x in range(xmax)]
            total = 0.0
            for v in w:
                total += v
            rows.append((xmin, [v / total if total != 0.0 else v for v in w]))
        return rows

    def resample(x, cs):  # along axis 1; sums in window order, in f64, rounded to f32
        out = np.empty((x.shape[0], len(cs)), np.float32)
        for xx, (xmin, k) in enumerate(cs):
            acc = np.zeros(x.shape[0], np.float64)
            for j, kj in enumerate(k):
                acc += x[:, xmin + j].astype(np.float64) * kj
            out[:, xx] = acc
        return out

    x = plane.astype(np.float32)
    h, w = x.shape
    if w != size:
        x = resample(x, coeffs(w, size))
    if h != size:
        x = resample(x.T, coeffs(h, size)).T
    return x


# ---------------------------------------------------------------------------------------------
# The module


class Hypernet(nn.Module):
    def __init__(self, cfg):
        from timm.layers import LayerNorm
        from timm.models.vision_transformer import VisionTransformer
        from functools import partial

        super().__init__()
        self.cfg = check_config(cfg)
        e = cfg["encoder"]
        # act_layer: vit_huge_patch14_clip_224 leaves it None, which timm resolves to nn.GELU (exact erf).
        self.encoder = VisionTransformer(
            img_size=e["img_size"], patch_size=e["patch_size"], num_classes=0, global_pool="",
            embed_dim=e["width"], depth=e["depth"], num_heads=e["heads"], mlp_ratio=e["mlp_ratio"],
            qkv_bias=True, class_token=e["class_token"], pre_norm=e["pre_norm"],
            norm_layer=partial(LayerNorm, eps=e["layer_norm_eps"]), act_layer=nn.GELU)
        d, t, n = cfg["d_model"], token_dim(cfg), len(cfg["layer_keys"])
        self.feature_proj = nn.Linear(e["width"], d)
        self.weight_embed = nn.Linear(t, d)
        self.layer_pos = nn.Parameter(torch.randn(n, d) * 0.02)
        layer = nn.TransformerDecoderLayer(d, cfg["heads"], 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg["layers"], norm=nn.LayerNorm(d))
        self.heads = nn.Module()
        self.heads.weight = nn.Parameter(torch.randn(n, t, d) * 0.02)
        self.heads.bias = nn.Parameter(torch.zeros(n, t))
        self.eval()

    def image_tokens(self, image):
        """[B, 3, S, S] -> [B, N, width]: timm's forward_features."""
        return self.encoder.forward_features(image)

    def decode(self, theta, memory):
        """theta [B, L, T], memory [B, N, d_model] -> decoder output after decoder.norm [B, L, d_model]."""
        return self.decoder(self.weight_embed(theta) + self.layer_pos, memory)

    def apply_heads(self, h):
        return torch.einsum("bld,ltd->blt", h, self.heads.weight) + self.heads.bias

    def predict(self, image, iterations=None, trace=None):
        """image [B, 3, S, S] -> [theta_1, ..., theta_s], each [B, L, T]. `trace` (a dict) gets
        the image tokens and each iteration's decoder output."""
        s = self.cfg["iterations"] if iterations is None else iterations
        tokens = self.image_tokens(image)
        memory = self.feature_proj(tokens)
        theta = torch.zeros(image.shape[0], len(self.cfg["layer_keys"]), token_dim(self.cfg),
                            device=image.device, dtype=memory.dtype)
        thetas, decoded = [], []
        for _ in range(s):
            h = self.decode(theta, memory)
            theta = theta + self.apply_heads(h)
            thetas.append(theta)
            decoded.append(h)
        if trace is not None:
            trace["tokens"], trace["decoded"] = tokens, decoded
        return thetas


def expected_shapes(cfg):
    """Every tensor of a v1 file and its shape, in the order hdb reads them."""
    e = cfg["encoder"]
    w, p, g = e["width"], e["patch_size"], e["img_size"] // e["patch_size"]
    hidden = int(w * e["mlp_ratio"])
    n_tok = g * g + (1 if e["class_token"] else 0)
    s = {}
    if e["class_token"]:
        s["encoder.cls_token"] = [1, 1, w]
    s["encoder.pos_embed"] = [1, n_tok, w]
    s["encoder.patch_embed.proj.weight"] = [w, 3, p, p]
    if not e["pre_norm"]:  # timm: patch bias only without norm_pre (CLIP has none)
        s["encoder.patch_embed.proj.bias"] = [w]
    ln = lambda k, n: s.update({f"{k}.weight": [n], f"{k}.bias": [n]})  # noqa: E731
    lin = lambda k, i, o: s.update({f"{k}.weight": [o, i], f"{k}.bias": [o]})  # noqa: E731
    if e["pre_norm"]:
        ln("encoder.norm_pre", w)
    for i in range(e["depth"]):
        b = f"encoder.blocks.{i}"
        ln(f"{b}.norm1", w)
        lin(f"{b}.attn.qkv", w, 3 * w)
        lin(f"{b}.attn.proj", w, w)
        ln(f"{b}.norm2", w)
        lin(f"{b}.mlp.fc1", w, hidden)
        lin(f"{b}.mlp.fc2", hidden, w)
    ln("encoder.norm", w)
    d, t, n = cfg["d_model"], token_dim(cfg), len(cfg["layer_keys"])
    lin("feature_proj", w, d)
    lin("weight_embed", t, d)
    s["layer_pos"] = [n, d]
    for i in range(cfg["layers"]):
        b = f"decoder.layers.{i}"
        for a in ("self_attn", "multihead_attn"):
            s[f"{b}.{a}.in_proj_weight"] = [3 * d, d]
            s[f"{b}.{a}.in_proj_bias"] = [3 * d]
            lin(f"{b}.{a}.out_proj", d, d)
        lin(f"{b}.linear1", d, 4 * d)
        lin(f"{b}.linear2", 4 * d, d)
        for k in ("norm1", "norm2", "norm3"):
            ln(f"{b}.{k}", d)
    ln("decoder.norm", d)
    s["heads.weight"] = [n, t, d]
    s["heads.bias"] = [n, t]
    return s


def state_dict_v1(model):
    sd = {k: v for k, v in model.state_dict().items()}
    want = expected_shapes(model.cfg)
    if set(sd) != set(want):
        raise RuntimeError(f"state dict keys differ from format v1: extra {sorted(set(sd) - set(want))}, "
                           f"missing {sorted(set(want) - set(sd))}")
    for k, shape in want.items():
        if list(sd[k].shape) != shape:
            raise RuntimeError(f"{k}: shape {list(sd[k].shape)}, format v1 says {shape}")
    return sd


def save(model, path, dtype=torch.float32):
    from make_op_fixtures import save_sorted

    sd = {k: v.detach().to(dtype) for k, v in state_dict_v1(model).items()}
    save_sorted(sd, path, metadata={"config": json.dumps(model.cfg)})


def load(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path}: no 'config' in the metadata: not a hypernetwork v1 file")
        cfg = json.loads(meta["config"])
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    model = Hypernet(cfg)
    model.load_state_dict(sd, strict=True)
    return model


def to_lidb(theta, cfg):
    """theta [L, T] -> tools/lidb.py LidbAdapter."""
    import lidb

    r, a, b = cfg["rank"], cfg["a"], cfg["b"]
    theta = np.asarray(theta, np.float32)
    layers = {k: (theta[i, :r * a].reshape(r, a).copy(), theta[i, r * a:].reshape(b, r).copy())
              for i, k in enumerate(cfg["layer_keys"])}
    return lidb.LidbAdapter(layers, r, a, b, cfg["basis_seed"], cfg["alpha"])


# ---------------------------------------------------------------------------------------------
# Random weights


def randomize_(model, seed):
    """Test weights: every tensor random (norm scales near 1, biases, class token and positions
    non-zero), sized so each stage, and theta's feedback into the next iteration, matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            u = torch.rand(p.shape, generator=g) * 2 - 1
            if name in ("encoder.cls_token", "encoder.pos_embed", "layer_pos"):
                p.copy_(0.5 * u)
            elif name == "weight_embed.weight":
                p.copy_(1.5 * u)
            elif p.dim() >= 2:
                fan_in = p[0].numel() if name != "heads.weight" else p.shape[-1]
                p.copy_(u * (1.5 / math.sqrt(fan_in)))
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * u)
            else:
                p.copy_(0.1 * u)
    return model


MASK64 = (1 << 64) - 1


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for byte in s.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def splitmix64_stream(state, n):
    """n outputs of a splitmix64 started at `state` (uint64 array; numpy wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        x = np.uint64(state) + np.uint64(0x9E3779B97F4A7C15) * np.arange(1, n + 1, dtype=np.uint64)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def rust_random_weight(seed, name, shape):
    """hdb's model::random::RandomWeights, value for value: a splitmix64 stream started at
    seed ^ fnv1a64(name); f32 uniforms u = ((next >> 11) * 2^-53); matrices and kernels
    (2+ dims) u' * 1/sqrt(fan_in), 1-D `*.weight` 1 + 0.1 u', other 1-D 0.05 u', u' = 2u - 1."""
    n = int(np.prod(shape))
    fan_in = max(int(np.prod(shape[1:])), 1)
    if len(shape) >= 2:
        center, scale = np.float32(0.0), np.float32(1.0) / np.sqrt(np.float32(fan_in))
    elif name.endswith(".weight"):
        center, scale = np.float32(1.0), np.float32(0.1)
    else:
        center, scale = np.float32(0.0), np.float32(0.05)
    z = splitmix64_stream((seed ^ fnv1a64(name)) & MASK64, n)
    u = ((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53).astype(np.float32)
    v = center + scale * (np.float32(2.0) * u - np.float32(1.0))
    assert v.dtype == np.float32
    return v.reshape(shape)


def rust_random_(model, seed):
    sd = {k: torch.from_numpy(rust_random_weight(seed, k, s)) for k, s in expected_shapes(model.cfg).items()}
    model.load_state_dict(sd, strict=True)
    return model


def test_image(w, h, seed):
    """A noise RGB8 image [h, w, 3]: byte i (row-major y, x, c) is the top byte of output i of a
    splitmix64 started at `seed` (the Rust tests make the same images)."""
    return (splitmix64_stream(seed, h * w * 3) >> np.uint64(56)).astype(np.uint8).reshape(h, w, 3)


# ---------------------------------------------------------------------------------------------
# Fixtures


# Preprocessing cases: (width, height, img_size, seed): non-square both ways, odd sizes, up- and
# down-scaling by integer and fractional factors, the minimum 16x16, and a crop already at size.
PRE_CASES = [(37, 23, 32, 1), (53, 71, 32, 2), (97, 97, 32, 3), (16, 16, 32, 4), (301, 200, 32, 5),
             (32, 40, 32, 6), (640, 480, 61, 7), (45, 50, 61, 8)]


def make_fixtures():
    """tests/fixtures/hypernet/:
      preprocess.safetensors  `pre.{w}x{h}.{img_size}` [3, S, S]: preprocess() of test_image(w, h,
                              seed) for PRE_CASES, CLIP mean/std (Pillow is the reference).
      tiny.hypernet.safetensors  tiny_config() with random weights (randomize_, seed 0) stored f16.
      tiny.ref.safetensors    for the 53x71 image: `image` [3, 32, 32] (preprocessed), `tokens`
                              [17, 32] (encoder), `decoded.{1,2}` [5, 64] (decoder output after
                              decoder.norm at iterations 1, 2), `theta.{1,2,4}` [5, 5]; the model
                              runs in f32 on the f16-rounded weights.
      default-shapes.ref.safetensors  the default config's decoder and token shapes (d_model 1024,
                              8 heads, 4 layers, r 1, a 100, b 50) on 8 of SD 1.5's layers, with a
                              ViT-H/14-wide encoder of depth 1 at 42 px; weights are hdb's
                              RandomWeights (seed in metadata `seed`), config in metadata `config`;
                              tensors `image` [3, 42, 42] (preprocess of test_image(50, 47, 9)),
                              `tokens` [10, 1280], `decoded.1` [8, 1024], `theta.{1,2,4}` [8, 150].
    """
    from make_op_fixtures import save_sorted

    os.makedirs(FIXTURES, exist_ok=True)
    torch.set_num_threads(2)
    pre = {}
    for w, h, size, seed in PRE_CASES:
        cfg = dict(tiny_config()["encoder"], img_size=size)
        pre[f"pre.{w}x{h}.{size}"] = torch.from_numpy(preprocess(test_image(w, h, seed), cfg))
    save_sorted(pre, os.path.join(FIXTURES, "preprocess.safetensors"))

    torch.manual_seed(0)
    cfg = tiny_config()
    model = randomize_(Hypernet(cfg), 0)
    path = os.path.join(FIXTURES, "tiny.hypernet.safetensors")
    save(model, path, torch.float16)
    model = load(path)  # f32 on the f16-rounded weights
    image = torch.from_numpy(preprocess(test_image(53, 71, 2), cfg))[None]
    ref = run_reference(model, image)
    save_sorted(ref, os.path.join(FIXTURES, "tiny.ref.safetensors"))
    report("tiny", ref)

    cfg = default_config()
    keys = cfg["layer_keys"]
    cfg["layer_keys"] = keys[0:2] + keys[61:63] + keys[126:128] + keys[128:129] + keys[175:176]
    cfg["encoder"] = dict(cfg["encoder"], img_size=42, depth=1)
    seed = 20240601
    model = rust_random_(Hypernet(cfg), seed)
    image = torch.from_numpy(preprocess(test_image(50, 47, 9), cfg))[None]
    ref = run_reference(model, image, decoded=(1,))
    save_sorted(ref, os.path.join(FIXTURES, "default-shapes.ref.safetensors"),
                metadata={"config": json.dumps(cfg), "seed": str(seed)})
    report("default shapes", ref)
    for f in sorted(os.listdir(FIXTURES)):
        print(f"{f}: {os.path.getsize(os.path.join(FIXTURES, f))} bytes")


def run_reference(model, image, decoded=(1, 2)):
    trace = {}
    with torch.no_grad():
        thetas = model.predict(image, 4, trace)
    out = {"image": image[0], "tokens": trace["tokens"][0]}
    for i in decoded:
        out[f"decoded.{i}"] = trace["decoded"][i - 1][0]
    for i in (1, 2, 4):
        out[f"theta.{i}"] = thetas[i - 1][0]
    return {k: v.contiguous().float() for k, v in out.items()}


def report(name, ref):
    t1, t2 = ref["theta.1"], ref["theta.2"]
    feedback = (t2 - 2 * t1).abs().max().item()
    print(f"{name}: max|theta_1| {t1.abs().max():.4f}, max|theta_4| {ref['theta.4'].abs().max():.4f}, "
          f"max|theta_2 - 2 theta_1| {feedback:.4f} (iteration feedback; tolerance 1e-4 x max|theta_2| "
          f"= {1e-4 * t2.abs().max():.2e})")
    assert feedback > 100 * 1e-4 * t2.abs().max(), "theta barely feeds back: the test would not see it"


def check_preprocess():
    """The numpy transcription of Pillow's algorithm (what hdb implements) against Pillow itself
    on many sizes; prints the worst difference (expected 0). Squares only: preprocessing resizes a
    square crop to a square, where Pillow always runs the horizontal pass first (Pillow 13 runs
    the vertical pass first when the height shrinks much more than the width, which changes the
    f32 rounding of non-square resizes, never of square ones)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        n_in, n_out = int(rng.integers(1, 400)), int(rng.integers(1, 240))
        plane = rng.random((n_in, n_in), dtype=np.float32) * 255
        want = np.asarray(Image.fromarray(plane).resize((n_out, n_out), Image.Resampling.BILINEAR))
        got = pillow_bilinear_np(plane, n_out)
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"numpy transcription vs Pillow, 200 random sizes: worst |diff| {worst}")


# ---------------------------------------------------------------------------------------------
# Commands


def bench(threads, repeat, device="cpu", dtype="f32"):
    """One prediction (preprocessed 224 px image in, theta out) at the default config with random
    weights, in `dtype` (f32, f16 or bf16: the model and the image cast to it, as `hdb bench
    hypernet --dtype` stores its weights), after one warm-up; prints each time and the best. On
    cuda each time ends with a synchronize."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    model = Hypernet(default_config()).to(device, torch_dtype)
    print(f"built the default hypernetwork ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters) in {time.perf_counter() - t0:.1f} s")
    image = torch.from_numpy(preprocess(test_image(256, 256, 1), default_config()))[None].to(device, torch_dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(repeat + 1):
            sync()
            t0 = time.perf_counter()
            theta = model.predict(image)[-1]
            sync()
            dt = time.perf_counter() - t0
            if i > 0:
                times.append(dt)
            print(f"{'warm-up' if i == 0 else 'run'}: {dt * 1e3:.0f} ms (max|theta| {theta.abs().max():.3f})")
    print(f"pytorch {torch.__version__}, {threads} threads: best {min(times) * 1e3:.0f} ms")
    print(json.dumps({"peer": "pytorch-eager", "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": threads,
                      "device": device, "dtype": dtype,
                      "median_s": statistics.median(times), "best_s": min(times), "runs_s": times}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fixtures")
    sub.add_parser("check-preprocess")
    r = sub.add_parser("random")
    r.add_argument("--config", default="default")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--f16", action="store_true")
    r.add_argument("-o", "--output", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--hypernet", required=True)
    p.add_argument("--face", required=True)
    p.add_argument("--iterations", type=int)
    p.add_argument("-o", "--output", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--repeat", type=int, default=2)
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    a = ap.parse_args()
    if a.cmd == "fixtures":
        make_fixtures()
    elif a.cmd == "check-preprocess":
        check_preprocess()
    elif a.cmd == "random":
        cfg = {"default": default_config, "tiny": tiny_config}.get(a.config)
        cfg = cfg() if cfg else json.load(open(a.config))
        save(randomize_(Hypernet(cfg), a.seed), a.output, torch.float16 if a.f16 else torch.float32)
    elif a.cmd == "predict":
        from PIL import Image
        import lidb

        model = load(a.hypernet)
        rgb = np.asarray(Image.open(a.face).convert("RGB"))
        image = torch.from_numpy(preprocess(rgb, model.cfg))[None]
        with torch.no_grad():
            theta = model.predict(image, a.iterations)[-1][0].numpy()
        lidb.save_lidb(to_lidb(theta, model.cfg), a.output)
    elif a.cmd == "bench":
        bench(a.threads, a.repeat, a.device, a.dtype)


if __name__ == "__main__":
    main()
