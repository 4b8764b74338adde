"""Builds hdb's per-operator numerics fixture: inputs, parameters and PyTorch's float32 CPU outputs
for every primitive the Stable Diffusion UNet is made of.

Makes (relative to the repository root):
  tests/fixtures/ops.safetensors   all tensors f32; header metadata {"groups": "4", "eps": "1e-5",
                                   "generator": "tools/make_op_fixtures.py torch <version> diffusers <version>"}

Keys (shapes in brackets; <op>.y is always the reference output):
  conv3x3.{x [2,5,7,6], w [4,5,3,3], b [4], y}       F.conv2d(x, w, b, stride=1, padding=1)
  conv1x1.{x [2,5,7,6], w [3,5,1,1], b [3], y}       F.conv2d(x, w, b)
  conv3x3s2.{x [2,5,7,6], w [4,5,3,3], b [4], y}     F.conv2d(x, w, b, stride=2, padding=1)
  conv3x3_wino.{x [2,16,33,34], w [12,16,3,3], b [12], y}
                                                     F.conv2d(x, w, b, stride=1, padding=1)
  group_norm.{x [2,8,5,3], w [8], b [8], y}          F.group_norm(x, 4, w, b, eps=1e-5)
  group_norm_silu.y                                  F.silu(group_norm.y)
  layer_norm.{x [3,5,16], w [16], b [16], y}         F.layer_norm(x, (16,), w, b, eps=1e-5)
  silu.{x [64], y}; gelu.{x [64], y}                 F.silu; F.gelu (exact erf form)
  geglu.{x [3,2,16], y [3,2,8]}                      h, gate = x.chunk(2, -1); y = h * F.gelu(gate)
  softmax.{x [3,7], y}                               softmax over the last dim
  upsample.{x [2,3,4,5], y [2,3,8,10]}               F.interpolate(x, scale_factor=2.0, mode="nearest")
  timestep.{t [3] = [0, 1.5, 999], y320 [3,320], y7 [3,7]}
                                                     diffusers get_timestep_embedding(t, dim,
                                                     flip_sin_to_cos=True, downscale_freq_shift=0)
  attn_<case>.{q, k, v, y}                           F.scaled_dot_product_attention on [B, heads, L, d],
                                                     stored as [B, L, heads*d] (heads split off the
                                                     last dim: x.view(B, L, heads, d).transpose(1, 2))
      attn_self40    q/k/v [2,33,120]  3 heads of 40
      attn_cross80   q [2,19,160], k/v [2,77,160]  2 heads of 80
      attn_self160   q/k/v [1,70,160]  1 head of 160
      attn_long40    q/k/v [1,300,80]  2 heads of 40, q scaled by 3 (peaky softmax, longer than a tile)

Inputs are seeded normals; norm weights and biases are 1 + noise and noise, never trivial.
Everything runs on one CPU thread; the file is written with a sorted header (safetensors' own
writer orders metadata arbitrarily), so running the tool twice writes identical bytes. CI never
runs this tool; the fixture it writes is committed.

Run from the repository root with the reference venv (../shared/setup-reference-venv.sh):
    /tmp/hdb-ref-venv/bin/python tools/make_op_fixtures.py [--out tests/fixtures/ops.safetensors]
"""

import argparse
import json
import os
import struct

import torch
import torch.nn.functional as F

SEED = 20240613
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32"}


def save_sorted(tensors, path, metadata=None):
    """A safetensors file with a deterministic header: keys sorted, data in key order, header
    padded with spaces to 8 bytes. safetensors.torch.save_file keeps metadata in a Rust HashMap,
    so with more than one metadata entry its bytes change from run to run."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def split_heads(x, heads):
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def build():
    from diffusers.models.embeddings import get_timestep_embedding

    g = torch.Generator().manual_seed(SEED)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=g)

    t = {}
    for name, cout, k, stride, pad in (("conv3x3", 4, 3, 1, 1), ("conv1x1", 3, 1, 1, 0), ("conv3x3s2", 4, 3, 2, 1)):
        x, w, b = randn(2, 5, 7, 6), randn(cout, 5, k, k, scale=0.3), randn(cout, scale=0.5)
        t.update({f"{name}.x": x, f"{name}.w": w, f"{name}.b": b,
                  f"{name}.y": F.conv2d(x, w, b, stride=stride, padding=pad)})

    # Channel offsets make per-group statistics differ, so a wrong grouping shows.
    x = randn(2, 8, 5, 3, scale=2.0) + torch.arange(8.0).view(1, 8, 1, 1)
    w, b = 1.0 + randn(8, scale=0.3), randn(8, scale=0.3)
    gn = F.group_norm(x, 4, w, b, eps=1e-5)
    t.update({"group_norm.x": x, "group_norm.w": w, "group_norm.b": b, "group_norm.y": gn,
              "group_norm_silu.y": F.silu(gn)})

    x = randn(3, 5, 16, scale=2.0) + 0.5
    w, b = 1.0 + randn(16, scale=0.3), randn(16, scale=0.3)
    t.update({"layer_norm.x": x, "layer_norm.w": w, "layer_norm.b": b,
              "layer_norm.y": F.layer_norm(x, (16,), w, b, eps=1e-5)})

    x = torch.linspace(-8.0, 8.0, 64)
    t.update({"silu.x": x, "silu.y": F.silu(x)})
    x = torch.linspace(-6.0, 6.0, 64) + randn(64, scale=0.05)
    t.update({"gelu.x": x, "gelu.y": F.gelu(x)})
    x = randn(3, 2, 16, scale=2.0)
    h, gate = x.chunk(2, dim=-1)
    t.update({"geglu.x": x, "geglu.y": h * F.gelu(gate)})
    x = randn(3, 7, scale=3.0)
    x[2] += 80.0  # large logits: a softmax without max-subtraction overflows here
    t.update({"softmax.x": x, "softmax.y": torch.softmax(x, dim=-1)})
    x = randn(2, 3, 4, 5)
    t.update({"upsample.x": x, "upsample.y": F.interpolate(x, scale_factor=2.0, mode="nearest")})

    ts = torch.tensor([0.0, 1.5, 999.0])
    t["timestep.t"] = ts
    for dim in (320, 7):
        t[f"timestep.y{dim}"] = get_timestep_embedding(ts, dim, flip_sin_to_cos=True, downscale_freq_shift=0)

    for name, b, lq, lk, heads, d, qscale in (("attn_self40", 2, 33, 33, 3, 40, 1.0),
                                              ("attn_cross80", 2, 19, 77, 2, 80, 1.0),
                                              ("attn_self160", 1, 70, 70, 1, 160, 1.0),
                                              ("attn_long40", 1, 300, 300, 2, 40, 3.0)):
        q, k, v = randn(b, lq, heads * d, scale=qscale), randn(b, lk, heads * d), randn(b, lk, heads * d)
        y = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
        t.update({f"{name}.q": q, f"{name}.k": k, f"{name}.v": v, f"{name}.y": merge_heads(y)})

    # Large enough a plane (33x34 >= 32x32) for hdb's Winograd F(2x2, 3x3) path; odd height.
    x, w, b = randn(2, 16, 33, 34), randn(12, 16, 3, 3, scale=0.2), randn(12, scale=0.5)
    t.update({"conv3x3_wino.x": x, "conv3x3_wino.w": w, "conv3x3_wino.b": b,
              "conv3x3_wino.y": F.conv2d(x, w, b, stride=1, padding=1)})

    for k_, v_ in t.items():
        assert v_.dtype == torch.float32 and bool(torch.isfinite(v_).all()), k_
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/ops.safetensors")
    args = ap.parse_args()

    import diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with torch.no_grad():
        t = build()
    # Spot checks of the references against hand-written formulas (catches a wrong call above).
    gx = t["group_norm.x"].view(2, 4, -1)
    gn = ((gx - gx.mean(-1, keepdim=True)) / torch.sqrt(gx.var(-1, unbiased=False, keepdim=True) + 1e-5)).view(2, 8, 5, 3)
    assert torch.allclose(gn * t["group_norm.w"].view(1, 8, 1, 1) + t["group_norm.b"].view(1, 8, 1, 1),
                          t["group_norm.y"], atol=1e-5)
    for name, heads in (("attn_self40", 3), ("attn_cross80", 2), ("attn_self160", 1), ("attn_long40", 2)):
        q, k, v = (split_heads(t[f"{name}.{s}"], heads) for s in "qkv")
        ref = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        err = (merge_heads(ref) - t[f"{name}.y"]).abs().max().item()
        assert err < 1e-4, (name, err)
    ts = t["timestep.t"]
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(160) / 160)
    arg = ts[:, None] * freqs[None]
    assert torch.allclose(torch.cat([torch.cos(arg), torch.sin(arg)], -1), t["timestep.y320"], atol=1e-4)
    assert t["timestep.y7"][:, -1].abs().max() == 0, "odd dim: last column is zero padding"

    meta = {"groups": "4", "eps": "1e-5",
            "generator": f"tools/make_op_fixtures.py torch {torch.__version__} diffusers {diffusers.__version__}"}
    save_sorted(t, args.out, meta)
    back = load_file(args.out)
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    with safe_open(args.out, "pt") as f:
        assert f.metadata() == meta, f.metadata()
    for k in sorted(t):
        print(f"{k:<22} {list(t[k].shape)}")
    p = torch.softmax(split_heads(t["attn_long40.q"], 2) @ split_heads(t["attn_long40.k"], 2).transpose(-1, -2)
                      / 40**0.5, dim=-1)
    print(f"attn_long40: largest softmax weight per row, mean over rows {p.amax(-1).mean().item():.3f}")
    print(f"{os.path.getsize(args.out):>9}  {args.out} ({len(t)} tensors), metadata {meta}")


if __name__ == "__main__":
    main()
