"""Turns a CLIP ViT image tower (ViT-H/14 and its relatives) from a timm or open_clip state dict
into the `encoder.*` part of an hdb hypernetwork v1 file (DESIGN.md section 4): renames only.

  timm (`vit_huge_patch14_clip_224`, or open_clip's timm-backed `visual.trunk.*`): the names are
      already the format's; `encoder.` goes in front, the classifier `head.*` is dropped.
  open_clip (`ViT-H-14` and other `VisionTransformer` towers, `visual.*` of a CLIP checkpoint):
      class_embedding [w]         -> encoder.cls_token [1, 1, w]   (same values, a view)
      positional_embedding [n, w] -> encoder.pos_embed [1, n, w]   (same values, a view)
      conv1.weight                -> encoder.patch_embed.proj.weight
      ln_pre / ln_post            -> encoder.norm_pre / encoder.norm
      transformer.resblocks.{i}.  -> encoder.blocks.{i}.
          ln_1 / ln_2 -> norm1 / norm2, attn.in_proj_weight / attn.in_proj_bias -> attn.qkv.weight
          / attn.qkv.bias, attn.out_proj -> attn.proj, mlp.c_fc / mlp.c_proj -> mlp.fc1 / mlp.fc2
      proj (the pooled-embedding projection) and the text tower are dropped: the hypernetwork
      reads every token after the final norm.

Usage (reference venv; no network):
  tools/convert_vit.py SRC -o ENCODER.safetensors [--format auto|timm|open_clip] [--heads 16]
        [--f16] [--hypernet OUT.safetensors [--seed N]]
  SRC: .safetensors, or a torch checkpoint (.bin/.pt/.pth; a {'state_dict': ...} wrapper is fine).
  ENCODER.safetensors gets the `encoder.*` tensors and, under metadata key `encoder`, the config's
  `encoder` object (heads cannot be read off the weights: --heads, 16 for ViT-H/14; mean/std are
  OpenAI CLIP's, which timm and open_clip use for these towers). --hypernet also writes a whole
  hypernetwork v1 file with the default decoder config, randomly initialised around this encoder:
  where training would start (tools/hypernet_ref.py).
  tools/convert_vit.py --selftest   converts randomly initialised timm `vit_huge_patch14_clip_224`
        and open_clip `ViT-H-14` models (built with 2 blocks: the renaming is what is tested) and
        checks that the converted encoder reproduces each source model's tokens.
"""

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OPEN_CLIP_BLOCK = {
    "ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
TIMM_PREFIXES = ["module.", "visual.trunk.", "trunk.", "model."]


def detect(sd):
    if any(k.endswith("transformer.resblocks.0.ln_1.weight") for k in sd):
        return "open_clip"
    if any(k.endswith("blocks.0.norm1.weight") for k in sd):
        return "timm"
    raise ValueError("neither a timm VisionTransformer nor an open_clip CLIP vision tower state dict")


def convert_timm(sd):
    keys = [k for k in sd if k.endswith("blocks.0.norm1.weight")]
    prefix = keys[0][: -len("blocks.0.norm1.weight")]
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name.startswith(("head.", "fc_norm.", "attn_pool.")):
            continue  # classifier / pooling: not part of forward_features' tokens
        if ".ls1." in name or ".ls2." in name or name == "reg_token":
            raise ValueError(f"{k}: layer scale and register tokens are not in hypernetwork format v1")
        out["encoder." + name] = v
    return out


def convert_open_clip(sd):
    keys = [k for k in sd if k.endswith("transformer.resblocks.0.ln_1.weight")]
    # The vision tower's prefix: the one whose resblocks sit next to conv1 (the text tower has none).
    prefix = next((k[: -len("transformer.resblocks.0.ln_1.weight")] for k in keys
                   if k[: -len("transformer.resblocks.0.ln_1.weight")] + "conv1.weight" in sd), None)
    if prefix is None:
        raise ValueError("no open_clip vision tower (conv1.weight next to transformer.resblocks)")
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name == "class_embedding":
            out["encoder.cls_token"] = v.reshape(1, 1, -1)
        elif name == "positional_embedding":
            out["encoder.pos_embed"] = v.reshape(1, *v.shape)
        elif name == "conv1.weight":
            out["encoder.patch_embed.proj.weight"] = v
        elif name.startswith("ln_pre."):
            out["encoder.norm_pre." + name[len("ln_pre."):]] = v
        elif name.startswith("ln_post."):
            out["encoder.norm." + name[len("ln_post."):]] = v
        elif name == "proj":
            continue  # pooled embedding projection
        else:
            m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
            if not m:
                raise ValueError(f"{k}: no hypernetwork v1 name for this tensor")
            rest = m.group(2)
            for src, dst in OPEN_CLIP_BLOCK.items():
                if rest == src or rest.startswith(src + "."):
                    out[f"encoder.blocks.{m.group(1)}.{dst}{rest[len(src):]}"] = v
                    break
            else:
                raise ValueError(f"{k}: no hypernetwork v1 name for this tensor (layer scale? "
                                 "attention pooling?)")
    return out


def convert(sd, fmt="auto"):
    fmt = detect(sd) if fmt == "auto" else fmt
    out = convert_timm(sd) if fmt == "timm" else convert_open_clip(sd)
    return {k: v.detach().contiguous() for k, v in out.items()}, fmt


def encoder_config(enc, heads):
    """The `encoder` object of a hypernetwork config, read off the converted tensors."""
    import hypernet_ref

    w, _, p, _ = enc["encoder.patch_embed.proj.weight"].shape
    n = enc["encoder.pos_embed"].shape[1]
    cls = "encoder.cls_token" in enc
    grid = round((n - cls) ** 0.5)
    depth = len({k.split(".")[2] for k in enc if k.startswith("encoder.blocks.")})
    hidden = enc["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    if grid * grid + cls != n or w % heads:
        raise ValueError(f"pos_embed has {n} tokens for patch {p}, width {w}, heads {heads}: not a square grid")
    return {"img_size": grid * p, "patch_size": p, "width": w, "depth": depth, "heads": heads,
            "mlp_ratio": hidden / w, "pre_norm": "encoder.norm_pre.weight" in enc, "class_token": cls,
            "layer_norm_eps": 1e-5, "image_mean": hypernet_ref.OPENAI_CLIP_MEAN,
            "image_std": hypernet_ref.OPENAI_CLIP_STD}


def read_state_dict(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def check_against_format(enc, cfg):
    import hypernet_ref

    full = hypernet_ref.default_config()
    full["encoder"] = cfg
    want = {k: v for k, v in hypernet_ref.expected_shapes(full).items() if k.startswith("encoder.")}
    got = {k: list(v.shape) for k, v in enc.items()}
    if got != want:
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
        raise ValueError(f"converted encoder does not match format v1: extra {extra[:5]}, missing "
                         f"{missing[:5]}, wrong shapes {wrong[:5]}")


# ---------------------------------------------------------------------------------------------
# Self-test


def randomize_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            u = torch.rand(p.shape, generator=g) * 2 - 1
            if p.dim() >= 2 and p.shape[0] > 1 and "embed" not in name and "embedding" not in name:
                p.copy_(u * (1.5 / p[0].numel() ** 0.5))
            elif p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * u)
            else:
                p.copy_(0.5 * u)
    return module.eval()


def encoder_from(enc, cfg):
    import hypernet_ref

    full = hypernet_ref.default_config()
    full["encoder"] = cfg
    full["layer_keys"] = full["layer_keys"][:1]
    net = hypernet_ref.Hypernet(full)
    missing, unexpected = net.load_state_dict(enc, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("encoder.")], (missing, unexpected)
    return net.eval()


def report(name, got, want):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"{name}: tokens {tuple(want.shape)}, max |converted - source| {err:.2e} (max|source| {scale:.2f})")
    assert err <= 1e-5 * scale, f"{name}: converted encoder differs from the source model"


def selftest():
    import open_clip
    import timm

    torch.manual_seed(0)
    image = torch.randn(2, 3, 224, 224)

    # timm: the vit_huge_patch14_clip_224 architecture (its registered constructor), 2 blocks.
    src = randomize_(timm.create_model("vit_huge_patch14_clip_224", pretrained=False, depth=2), 1)
    enc, fmt = convert({"module." + k: v for k, v in src.state_dict().items()})  # a DDP-style prefix
    cfg = encoder_config(enc, heads=16)
    check_against_format(enc, cfg)
    assert fmt == "timm" and cfg["width"] == 1280 and cfg["patch_size"] == 14 and cfg["img_size"] == 224
    with torch.no_grad():
        report("timm vit_huge_patch14_clip_224 (depth 2)", encoder_from(enc, cfg).image_tokens(image),
               src.forward_features(image))

    # open_clip: the ViT-H-14 CLIP model config, 2 vision blocks and 1 text block.
    mc = open_clip.get_model_config("ViT-H-14")
    mc = dict(mc, vision_cfg=dict(mc["vision_cfg"], layers=2), text_cfg=dict(mc["text_cfg"], layers=1))
    clip = randomize_(open_clip.CLIP(**mc), 2)
    enc, fmt = convert(clip.state_dict())
    cfg = encoder_config(enc, heads=16)
    check_against_format(enc, cfg)
    assert fmt == "open_clip" and cfg["width"] == 1280 and cfg["depth"] == 2
    tokens = {}
    hook = clip.visual.ln_post.register_forward_hook(lambda m, i, o: tokens.update(x=o))
    with torch.no_grad():
        clip.encode_image(image)
        hook.remove()
        report("open_clip ViT-H-14 (2 vision blocks)", encoder_from(enc, cfg).image_tokens(image), tokens["x"])
    print("selftest ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="?")
    ap.add_argument("-o", "--output")
    ap.add_argument("--format", default="auto", choices=["auto", "timm", "open_clip"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--f16", action="store_true")
    ap.add_argument("--hypernet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--selftest", action="store_true")
    a = ap.parse_args()
    if a.selftest:
        selftest()
        return
    if not a.src or not (a.output or a.hypernet):
        ap.error("SRC and -o (or --hypernet) are required")
    from make_op_fixtures import save_sorted

    enc, fmt = convert(read_state_dict(a.src), a.format)
    cfg = encoder_config(enc, a.heads)
    check_against_format(enc, cfg)
    dtype = torch.float16 if a.f16 else torch.float32
    print(f"{a.src}: {fmt} layout, encoder {json.dumps(cfg)}")
    if a.output:
        save_sorted({k: v.to(dtype) for k, v in enc.items()}, a.output, metadata={"encoder": json.dumps(cfg)})
    if a.hypernet:
        import hypernet_ref

        full = hypernet_ref.default_config()
        full["encoder"] = cfg
        torch.manual_seed(a.seed)
        net = hypernet_ref.Hypernet(full)
        net.load_state_dict(enc, strict=False)
        hypernet_ref.save(net, a.hypernet, dtype)


if __name__ == "__main__":
    main()
