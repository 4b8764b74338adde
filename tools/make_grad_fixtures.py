"""Reference gradients for hdb's training path, from torch autograd in float64.

1. grad/ops.safetensors: the input gradients of every op the UNet and the text encoder run
   (linear, conv 3x3 / 1x1 / stride 2, group norm with and without SiLU, layer norm, self /
   cross / causal attention, SiLU, GELU, quick GELU, GEGLU, nearest 2x upsampling), small
   shapes: for each case `<op>.<name>` the inputs (f32), the output gradient `dy` and the
   reference gradients `want.<input>`, computed in float64 from the f32 inputs.
2. Whole-model cases on the tiny SD fixture (diffusers' UNet2DConditionModel + transformers'
   CLIPTextModel, float64), with adapters applied as differentiable weight deltas: for a LiDB
   layer W + alpha U_aux U_train D_train D_aux, for a LoRA layer W + (alpha / r) up down. Each
   case writes the adapter file (`<adapter>`), the input of `hdb finetune grad`
   (`<case>.in.safetensors`: sample, timestep, target, and encoder_hidden_states or
   input_ids) and the reference (`<case>.grad.safetensors`: loss and the gradient of every
   trainable tensor under the adapter's own names and shapes).

Usage: /tmp/hdb-ref-venv/bin/python tools/make_grad_fixtures.py [--out tests/fixtures]
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lidb  # noqa: E402
from make_op_fixtures import save_sorted  # noqa: E402

GENERATOR = f"tools/make_grad_fixtures.py torch {torch.__version__}"
UNET_RE = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
TE_RE = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"


def fail(msg):
    sys.exit(f"FAIL {msg}")


# ---------------------------------------------------------------- ops

class Ops:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.out = {}

    def rand(self, *shape, scale=1.0):
        """f32 values, returned as a float64 leaf that requires grad."""
        x = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        return torch.from_numpy(x).double().requires_grad_(True)

    def case(self, name, inputs, fn, grads_of=None):
        """Runs fn(**inputs) in float64, draws dy, stores inputs, dy and the gradients of
        `grads_of` (default: every input)."""
        y = fn(**inputs)
        dy = torch.from_numpy(self.rng.standard_normal(tuple(y.shape)).astype(np.float32)).double()
        names = grads_of or list(inputs)
        gs = torch.autograd.grad(y, [inputs[n] for n in names], dy)
        for k, v in inputs.items():
            self.out[f"{name}.{k}"] = v.detach().float()
        self.out[f"{name}.dy"] = dy.float()
        for n, g in zip(names, gs):
            self.out[f"{name}.want.{n}"] = g.float()


def attention(q, k, v, heads, causal=False):
    b, lq, hd = q.shape
    lk = k.shape[1]
    d = hd // heads
    qh = q.view(b, lq, heads, d).transpose(1, 2)
    kh = k.view(b, lk, heads, d).transpose(1, 2)
    vh = v.view(b, lk, heads, d).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) / d ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ vh).transpose(1, 2).reshape(b, lq, hd)


def make_ops(path):
    o = Ops(20261207)
    o.case("linear.a", {"x": o.rand(5, 7), "w": o.rand(6, 7)}, lambda x, w: F.linear(x, w), ["x"])
    o.case("linear.rows1", {"x": o.rand(1, 33), "w": o.rand(40, 33)}, lambda x, w: F.linear(x, w), ["x"])
    for name, (xs, ws, stride, pad) in {
        "k3": ((2, 3, 5, 6), (4, 3, 3, 3), 1, 1),
        "k1": ((2, 4, 5, 5), (3, 4, 1, 1), 1, 0),
        "k3s2": ((1, 3, 7, 8), (2, 3, 3, 3), 2, 1),
        "k3s2even": ((2, 2, 8, 6), (3, 2, 3, 3), 2, 1),
    }.items():
        o.case(f"conv.{name}", {"x": o.rand(*xs), "w": o.rand(*ws, scale=0.5)},
               lambda x, w, s=stride, p=pad: F.conv2d(x, w, stride=s, padding=p), ["x"])
    for silu in (False, True):
        def gn(x, gamma, beta, silu=silu):
            y = F.group_norm(x, 3, gamma, beta, eps=1e-5)
            return F.silu(y) if silu else y
        o.case(f"group_norm.{'silu' if silu else 'plain'}",
               {"x": o.rand(2, 6, 5, 4, scale=2.0), "gamma": o.rand(6), "beta": o.rand(6)}, gn, ["x"])
    o.case("layer_norm.a", {"x": o.rand(5, 8, scale=3.0), "gamma": o.rand(8), "beta": o.rand(8)},
           lambda x, gamma, beta: F.layer_norm(x, (8,), gamma, beta, eps=1e-5), ["x"])
    o.case("attention.self", {"q": o.rand(2, 6, 8), "k": o.rand(2, 6, 8), "v": o.rand(2, 6, 8)},
           lambda q, k, v: attention(q, k, v, 2))
    o.case("attention.cross", {"q": o.rand(2, 5, 8), "k": o.rand(2, 7, 8), "v": o.rand(2, 7, 8)},
           lambda q, k, v: attention(q, k, v, 2))
    o.case("attention.causal", {"q": o.rand(2, 6, 8, scale=2.0), "k": o.rand(2, 6, 8, scale=2.0),
                                "v": o.rand(2, 6, 8)},
           lambda q, k, v: attention(q, k, v, 2, causal=True))
    o.case("attention.long", {"q": o.rand(1, 300, 8), "k": o.rand(1, 300, 8), "v": o.rand(1, 300, 8)},
           lambda q, k, v: attention(q, k, v, 1))
    o.case("act.silu", {"x": o.rand(64, scale=4.0)}, lambda x: F.silu(x))
    o.case("act.gelu", {"x": o.rand(64, scale=4.0)}, lambda x: F.gelu(x))
    o.case("act.quick_gelu", {"x": o.rand(64, scale=4.0)}, lambda x: x * torch.sigmoid(1.702 * x))
    o.case("geglu.a", {"x": o.rand(3, 10, scale=2.0)},
           lambda x: x.chunk(2, -1)[0] * F.gelu(x.chunk(2, -1)[1]))
    o.case("upsample.a", {"x": o.rand(2, 3, 3, 4)},
           lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"))
    save_sorted(o.out, path, metadata={"generator": GENERATOR})
    print(f"ok   {path}: {len({k.split('.want')[0].rsplit('.', 1)[0] for k in o.out})} op cases")


# ---------------------------------------------------------------- AdamW

def make_adamw(path):
    """torch.optim.AdamW for 8 steps on two tensors with fixed gradients, clipped to a global
    norm of 1 by clip_grad_norm_ (the large gradients of steps 0-3 are clipped, the others
    not), a constant learning rate: the parameters after each step."""
    rng = np.random.default_rng(31)
    f32 = lambda *s, scale=1.0: torch.from_numpy((rng.standard_normal(s) * scale).astype(np.float32))
    p = [f32(7).requires_grad_(True), f32(3, 4).requires_grad_(True)]
    out = {"p0.init": p[0].detach().clone(), "p1.init": p[1].detach().clone()}
    opt = torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for step in range(8):
        scale = 3.0 if step < 4 else 0.05
        g = [f32(7, scale=scale), f32(3, 4, scale=scale)]
        for t, gi in zip(p, g):
            t.grad = gi.clone()
        norm = torch.nn.utils.clip_grad_norm_(p, 1.0)
        opt.step()
        out[f"step{step}.g0"], out[f"step{step}.g1"] = g
        out[f"step{step}.norm"] = norm.detach().reshape(1)
        out[f"step{step}.p0"], out[f"step{step}.p1"] = p[0].detach().clone(), p[1].detach().clone()
    save_sorted(out, path, metadata={"generator": GENERATOR, "lr": "0.01", "betas": "0.9,0.999",
                                     "eps": "1e-08", "weight_decay": "0.01", "max_grad_norm": "1.0"})
    print(f"ok   {path}: 8 AdamW steps")


# ---------------------------------------------------------------- adapters

def adapted(unet, te):
    """{key: module} of every adapted projection, keys as hdb names them."""
    import re
    out = {}
    for name, m in unet.named_modules():
        if re.search(UNET_RE, name):
            out["unet." + name] = m
    for name, m in te.named_modules():
        if re.search(TE_RE, name):
            key = name if name.startswith("text_model.") else "text_model." + name
            out["text_encoder." + key] = m
    return dict(sorted(out.items()))


class Lidb:
    """LiDB factors as float64 leaves; the delta of layer k is alpha U_aux U_train D_train D_aux."""

    def __init__(self, mods, rank, a, b, seed, alpha, basis_seed, scale=0.3):
        rng = np.random.default_rng(seed)
        self.rank, self.a, self.b, self.alpha, self.basis_seed = rank, a, b, alpha, basis_seed
        self.train, self.aux = {}, {}
        for k, m in mods.items():
            d = (rng.standard_normal((rank, a)) * scale).astype(np.float32)
            u = (rng.standard_normal((b, rank)) * scale).astype(np.float32)
            self.train[k] = [torch.from_numpy(d).double().requires_grad_(True),
                             torch.from_numpy(u).double().requires_grad_(True)]
            d_aux, u_aux = lidb.basis(k, m.in_features, m.out_features, a, b, basis_seed)
            self.aux[k] = (torch.from_numpy(np.asarray(d_aux, np.float32)).double(),
                           torch.from_numpy(np.asarray(u_aux, np.float32)).double())

    def delta(self, k):
        d, u = self.train[k]
        d_aux, u_aux = self.aux[k]
        return self.alpha * (u_aux @ u) @ (d @ d_aux)

    def meta(self):
        return {"format": "hdb-lidb", "rank": str(self.rank), "a": str(self.a), "b": str(self.b),
                "basis_seed": str(self.basis_seed), "alpha": repr(self.alpha), "base": "tiny-sd",
                "generator": GENERATOR}

    def save_v1(self, path):
        t = {}
        for k, (d, u) in self.train.items():
            t[f"{k}.lidb_down"], t[f"{k}.lidb_up"] = d.detach().float(), u.detach().float()
        save_sorted(t, path, metadata={**self.meta(), "version": "1"})

    def v2_tensors(self, grads=None):
        keys = sorted(self.train)
        pick = (lambda k, i: grads[k][i]) if grads else (lambda k, i: self.train[k][i].detach())
        return ({"lidb_down": torch.stack([pick(k, 0) for k in keys]).float(),
                 "lidb_up": torch.stack([pick(k, 1) for k in keys]).float()},
                {**self.meta(), "version": "2", "layers": front_code(keys)})

    def grads_v1(self):
        t = {}
        for k, (d, u) in self.train.items():
            t[f"{k}.lidb_down"], t[f"{k}.lidb_up"] = d.grad.float(), u.grad.float()
        return t

    def params(self):
        return [p for pair in self.train.values() for p in pair]


def front_code(keys):
    lines, prev = [], ""
    for k in keys:
        n = 0
        while n < min(len(k), len(prev)) and k[n] == prev[n]:
            n += 1
        lines.append(f"{n}:{k[n:]}")
        prev = k
    return "\n".join(lines)


class Lora:
    """LoRA factors as float64 leaves; delta = (alpha / r) up down. `names(k)` gives the
    file's tensor names."""

    def __init__(self, mods, rank, seed, alpha, kind):
        rng = np.random.default_rng(seed)
        self.rank, self.alpha, self.kind = rank, alpha, kind
        self.f = {}
        for k, m in mods.items():
            d = (rng.standard_normal((rank, m.in_features)) / m.in_features ** 0.5).astype(np.float32)
            u = (rng.standard_normal((m.out_features, rank)) * 0.3).astype(np.float32)
            self.f[k] = [torch.from_numpy(d).double().requires_grad_(True),
                         torch.from_numpy(u).double().requires_grad_(True)]

    def scale(self):
        return self.alpha / self.rank if self.alpha is not None else 1.0

    def delta(self, k):
        d, u = self.f[k]
        return self.scale() * (u @ d)

    def names(self, k):
        if self.kind == "kohya":
            n = lidb.kohya_name(k)
            return f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"
        return f"{k}.lora_A.weight", f"{k}.lora_B.weight", None

    def tensors(self, grad=False):
        t = {}
        for k, (d, u) in self.f.items():
            dn, un, an = self.names(k)
            t[dn] = (d.grad if grad else d.detach()).float()
            t[un] = (u.grad if grad else u.detach()).float()
            if an and self.alpha is not None and not grad:
                t[an] = torch.tensor(self.alpha, dtype=torch.float32)
        return t

    def params(self):
        return [p for pair in self.f.values() for p in pair]


def patch(mods, adapter):
    """Every adapted Linear computes with W + delta (differentiable in the adapter's leaves)."""
    for k, m in mods.items():
        def forward(x, m=m, k=k):
            return F.linear(x, m.weight + adapter.delta(k), m.bias)
        m.forward = forward


def unpatch(mods):
    for m in mods.values():
        if "forward" in m.__dict__:
            del m.forward


# ---------------------------------------------------------------- model cases

def load_models(tiny):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet", local_files_only=True).double().eval()
    te = CLIPTextModel.from_pretrained(tiny, subfolder="text_encoder", local_files_only=True).double().eval()
    tok = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer", local_files_only=True)
    for p in list(unet.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    return unet, te, tok


def make_input(rng, tok, use_ids, b=2, hw=16, l=77, cross=16):
    f32 = lambda *s, scale=1.0: torch.from_numpy((rng.standard_normal(s) * scale).astype(np.float32))
    inp = {
        "sample": f32(b, 4, hw, hw),
        "timestep": torch.tensor([37.0, 801.0][:b], dtype=torch.float32),
        "target": f32(b, 4, hw, hw),
    }
    if use_ids:
        ids = tok(["a photo of sks person", "a [V] face"][:b], padding="max_length", max_length=l,
                  truncation=True, return_tensors="pt").input_ids
        inp["input_ids"] = ids.to(torch.int64)
    else:
        inp["encoder_hidden_states"] = f32(b, l, cross)
    return inp


def loss_of(unet, te, inp):
    if "input_ids" in inp:
        ctx = te(inp["input_ids"]).last_hidden_state
    else:
        ctx = inp["encoder_hidden_states"].double()
    out = unet(inp["sample"].double(), inp["timestep"].double(), encoder_hidden_states=ctx).sample
    return ((out - inp["target"].double()) ** 2).mean()


def run_case(out_dir, case, unet, te, mods, adapter, inp, write_adapter, write_grads):
    patch(mods, adapter)
    for p in adapter.params():
        p.grad = None
    loss = loss_of(unet, te, inp)
    loss.backward()
    unpatch(mods)
    g = [p.grad for p in adapter.params()]
    if any(x is None for x in g):
        # Layers the input does not reach (text encoder with encoder_hidden_states): zero.
        for p in adapter.params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    gmax = max(p.grad.abs().max().item() for p in adapter.params())
    if not np.isfinite(gmax) or gmax == 0:
        fail(f"{case}: gradients are {gmax}")
    write_adapter()
    save_sorted(inp, os.path.join(out_dir, f"{case}.in.safetensors"), metadata={"case": case, "generator": GENERATOR})
    tensors, meta = write_grads()
    tensors["loss"] = torch.tensor(loss.item(), dtype=torch.float32)
    save_sorted(tensors, os.path.join(out_dir, f"{case}.grad.safetensors"), metadata={**meta, "case": case})
    print(f"ok   {case}: loss {loss.item():.6f}, {len(adapter.params())} tensors, max|grad| {gmax:.3e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out_dir = os.path.join(args.out, "grad")
    os.makedirs(out_dir, exist_ok=True)
    make_ops(os.path.join(out_dir, "ops.safetensors"))
    make_adamw(os.path.join(out_dir, "adamw.safetensors"))

    unet, te, tok = load_models(os.path.join(args.out, "tiny-sd"))
    mods = adapted(unet, te)
    n_unet = sum(k.startswith("unet.") for k in mods)
    if (n_unet, len(mods) - n_unet) != (128, 8):
        fail(f"expected 128 UNet and 8 text-encoder adapted layers, found {n_unet} and {len(mods) - n_unet}")
    rng = np.random.default_rng(7)
    ad = lambda p: os.path.join(out_dir, p)

    # LiDB over every layer (UNet + text encoder), rank 2: v1 with the UNet alone, v2 with ids.
    li = Lidb(mods, rank=2, a=3, b=2, seed=11, alpha=0.8, basis_seed=987654321)
    run_case(out_dir, "lidb-v1-hidden", unet, te, mods, li, make_input(rng, tok, False),
             lambda: li.save_v1(ad("grad-id.v1.lidb.safetensors")),
             lambda: (li.grads_v1(), {**li.meta(), "version": "1"}))
    v2, v2meta = li.v2_tensors()
    run_case(out_dir, "lidb-v2-ids", unet, te, mods, li, make_input(rng, tok, True),
             lambda: save_sorted(v2, ad("grad-id.v2.lidb.safetensors"), metadata=v2meta),
             lambda: li.v2_tensors({k: [d.grad, u.grad] for k, (d, u) in li.train.items()}))
    # kohya LoRA with alpha (rank 3, alpha 1.5) on every layer, with ids.
    ko = Lora(mods, rank=3, seed=12, alpha=1.5, kind="kohya")
    run_case(out_dir, "kohya-ids", unet, te, mods, ko, make_input(rng, tok, True),
             lambda: save_sorted(ko.tensors(), ad("grad-lora.kohya.safetensors"), metadata={"generator": GENERATOR}),
             lambda: (ko.tensors(grad=True), {"generator": GENERATOR}))
    # PEFT LoRA without alpha (scale 1) on the UNet only, with hidden states.
    unet_mods = {k: m for k, m in mods.items() if k.startswith("unet.")}
    pe = Lora(unet_mods, rank=2, seed=13, alpha=None, kind="peft")
    run_case(out_dir, "peft-hidden", unet, te, unet_mods, pe, make_input(rng, tok, False),
             lambda: save_sorted(pe.tensors(), ad("grad-lora.peft.safetensors"), metadata={"generator": GENERATOR}),
             lambda: (pe.tensors(grad=True), {"generator": GENERATOR}))
    # The same PEFT LoRA at an odd latent size (9x9: the UNet's upsamplers crop to the skips'
    # sizes, as diffusers does). Last, so the cases above keep their random draws.
    run_case(out_dir, "peft-odd-hidden", unet, te, unet_mods, pe, make_input(rng, tok, False, hw=9),
             lambda: None,
             lambda: (pe.tensors(grad=True), {"generator": GENERATOR}))


if __name__ == "__main__":
    main()
