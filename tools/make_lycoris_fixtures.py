#!/usr/bin/env python3
"""Fixtures made by LyCORIS itself (lycoris-lora, pinned in tools/requirements.txt) for the layouts only it
writes (tests/lycoris.rs): CP-decomposed (Tucker) convolutions and DoRA `dora_scale`, on tests/fixtures/tiny-sd's
UNet. Each network is created by `lycoris.create_lycoris` with kohya names (`LORA_PREFIX = "lora_unet"`), its
factors randomized (LyCORIS inits an update of zero), saved by `save_weights`, then loaded back by
`create_lycoris_from_weights` and merged by `merge_to` (LyCORIS' own merge, what ComfyUI and the webui
extension follow) before the UNet runs on tests/fixtures/unet/tiny-sd.in.safetensors.

Writes under tests/fixtures/lycoris/ (f32):
  locon-tucker-dora.safetensors   LoCon (lora_down/lora_up/alpha), rank 2, alpha 1, on the attention
                                  projections, feed-forward and the resnet/sampler convolutions; 3x3 convs
                                  CP-decomposed (lora_mid [r, r, 3, 3], down [r, in, 1, 1]); DoRA on every
                                  layer (dora_scale [out, 1(, 1, 1)], wd_on_out=True)
  loha-tucker-dora-in.safetensors LoHa (hada_w1_a/b, hada_w2_a/b, alpha 2 of rank 2) on the same layers,
                                  3x3 convs CP-decomposed (hada_t1/hada_t2 [r, r, 3, 3], hada_w*_a [r, out],
                                  hada_w*_b [r, in]); DoRA per input channel (wd_on_out=False: dora_scale
                                  [1, in(, 1, 1)])
  lokr-tucker.safetensors         LoKr (lokr_w1, lokr_w2_a/b, lokr_t2 on 3x3 convs), rank 2, factor 4,
                                  alpha = rank (LyCORIS 4.1.3's module applies alpha / rank twice when it
                                  merges a LoKr, once in get_weight and once in get_diff_weight; readers of
                                  the format (ComfyUI, the webui extension) apply it once; alpha = rank makes
                                  both 1), DoRA per output row
  <name>.out.safetensors          `out`: the UNet with it merged at multiplier 1.0
  <name>-x0.6.out.safetensors     the same at multiplier 0.6 (DoRA: LyCORIS interpolates the rescale,
                                  `W (0.6 (m / |W| - 1) + 1)` with `W = W0 + dW`, not `dW`)

Checks (exits non-zero on failure): each merge visibly changes the output; dora_scale differs from the
merged weight's norms (so the DoRA step is exercised); the file's keys carry the parts named above.
Fixed seeds, one thread; CI never runs it.
Run from the repository root:  /tmp/hdb-ref-venv/bin/python tools/make_lycoris_fixtures.py
"""

import copy
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_unet_fixtures import run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "tests", "fixtures")
TINY = os.path.join(FX, "tiny-sd")
OUT = os.path.join(FX, "lycoris")
SEED = 20261207
TARGETS = [
    "*attn1.to_q", "*attn1.to_k", "*attn2.to_v", "*attn2.to_out.0", "*ff.net.0.proj", "*ff.net.2",
    "*resnets.*.conv1", "*resnets.*.conv2", "*resnets.*.conv_shortcut", "*samplers.0.conv",
]


def fail(msg):
    sys.exit(f"FAIL {msg}")


def modules(unet, algo, **kw):
    """{lora_name: LyCORIS module} on the TARGETS layers, kohya-named (`lora_unet_<path>`)."""
    import fnmatch

    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]
    torch.manual_seed(SEED)
    out = {}
    for name, m in unet.named_modules():
        if any(fnmatch.fnmatch(name, t) for t in TARGETS):
            lora_name = "lora_unet_" + name.replace(".", "_")
            out[lora_name] = cls(lora_name, m, 1.0, **kw)
            path_of[lora_name] = name
    return out


path_of = {}  # lora_name -> module path


def randomize(mods, shrink):
    """Every factor random (LyCORIS inits one factor to zero) so the updates are a few percent of the
    weights: factors N(0, shrink[0]), Tucker cores N(0, shrink[1]); dora_scale off the base norms by +-10%."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for m in mods.values():
            for n, p in m.named_parameters():
                if n == "dora_scale":
                    p.mul_(1 + 0.1 * (2 * torch.rand(p.shape, generator=g) - 1))
                elif n in ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2"):
                    p.copy_(torch.randn(p.shape, generator=g) * shrink[1])
                elif any(t in n for t in ("lora_", "hada_", "lokr_")):
                    p.copy_(torch.randn(p.shape, generator=g) * shrink[0])


def main():
    from diffusers import UNet2DConditionModel
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    LycorisNetwork.LORA_PREFIX = "lora_unet"

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    inp = load_file(os.path.join(FX, "unet", "tiny-sd.in.safetensors"))
    base_unet = UNet2DConditionModel.from_pretrained(os.path.join(TINY, "unet"), local_files_only=True).eval()
    with torch.no_grad():
        base = run(base_unet, inp)
    cases = [
        ("locon-tucker-dora", "locon", dict(lora_dim=2, alpha=1, use_tucker=True, weight_decompose=True,
                                            wd_on_out=True),
         (0.05, 0.5), ["lora_mid", "dora_scale", "alpha"]),
        ("loha-tucker-dora-in", "loha", dict(lora_dim=2, alpha=2, use_tucker=True, weight_decompose=True,
                                             wd_on_out=False),
         (0.15, 0.5), ["hada_t1", "hada_t2", "dora_scale"]),
        ("lokr-tucker", "lokr", dict(lora_dim=2, alpha=2, factor=4, use_tucker=True, weight_decompose=True,
                                     wd_on_out=True),
         (0.1, 0.5), ["lokr_w1", "lokr_w2_a", "lokr_t2", "dora_scale"]),
    ]
    for name, algo, kw, shrink, parts in cases:
        unet = copy.deepcopy(base_unet)
        mods = modules(unet, algo, **kw)
        randomize(mods, shrink)
        path = os.path.join(OUT, f"{name}.safetensors")
        sd = {f"{ln}.{k}": v.detach().float().contiguous()
              for ln, m in mods.items() for k, v in m.custom_state_dict().items()}
        for p in parts:
            if not any(k.endswith("." + p) or f".{p}." in k for k in sd):
                fail(f"{name}: no '{p}' key ({sorted(sd)[:4]} ...)")
        save_file({k: sd[k].contiguous() for k in sorted(sd)}, path, metadata={"generator": "tools/make_lycoris_fixtures.py"})
        print(f"ok   {name}: {len(sd)} tensors, {len({k.split('.')[0] for k in sd})} layers")
        for mult, suffix in [(1.0, ""), (0.6, "-x0.6")]:
            # LyCORIS' merge of the saved tensors: each module's get_merged_weight on a fresh UNet.
            fresh = copy.deepcopy(base_unet)
            by_name = dict(fresh.named_modules())
            with torch.no_grad():
                for ln, m in mods.items():
                    w, _ = m.get_merged_weight(multiplier=mult, shape=m.shape)
                    by_name[path_of[ln]].weight.copy_(w)
                out = run(fresh, inp)
            if not bool(torch.isfinite(out).all()):
                fail(f"{name}{suffix}: non-finite output")
            change = (out - base).abs().max().item() / base.abs().max().item()
            if change < 1e-2:
                fail(f"{name}{suffix}: the merge changes the output by only {change:.2e}")
            # The file read back by LyCORIS' own loader merges the same. Its loader assumes
            # wd_on_out=True (a per-input-channel dora_scale does not load there) and rebuilds a
            # LoKr module from the wrong dims when lokr_w2 is decomposed (AttributeError
            # 'lokr_w2_a'), so those two cases rely on the modules' merge alone.
            if kw.get("wd_on_out", True) and algo != "lokr":
                again = copy.deepcopy(base_unet)
                loaded, _ = create_lycoris_from_weights(mult, path, again)
                loaded.merge_to(mult)
                with torch.no_grad():
                    d = (run(again, inp) - out).abs().max().item() / out.abs().max().item()
                if d > 1e-5:
                    fail(f"{name}{suffix}: LyCORIS' loader merges differently ({d:.2e})")
            save_file({"out": out.contiguous()}, os.path.join(OUT, f"{name}{suffix}.out.safetensors"),
                      metadata={"generator": "tools/make_lycoris_fixtures.py", "multiplier": str(mult)})
            print(f"ok   {name}{suffix}: max|out - base| / max|base| = {change:.3f}")


if __name__ == "__main__":
    main()
