#!/usr/bin/env python3
"""Fixtures for LoRAs on every linear layer (tests/lora_layers.rs): a random "style" LoRA on all the
linear layers kohya's default network and PEFT target in tests/fixtures/tiny-sd (UNet: attention
projections, ff.net.0.proj, ff.net.2, resnets' time_emb_proj, time_embedding.linear_1/2; text encoder:
q/k/v/out_proj, mlp.fc1, mlp.fc2), in the layouts people have, and what diffusers' LoRA loader makes of
them. proj_in/proj_out are 1x1 convolutions in this SD 1.5-shaped model, not linear layers: not here.

Writes under tests/fixtures/lora-layers/ (f32):
  style.kohya.safetensors   lora_unet_* / lora_te_* with .lora_down/.lora_up and a per-layer .alpha
                            (ALPHAS cycled), except every third layer, which has none (kohya: alpha = rank)
  style.peft.safetensors    the same LoRA as diffusers/PEFT keys (`unet.<path>.lora_A.weight`,
                            `text_encoder.text_model.<path>.lora_B.weight`), alpha / rank folded into lora_B
  attn.old.safetensors      the UNet attention layers of the same LoRA in diffusers' older attention-
                            processor form (`unet.<block>.processor.to_q_lora.down.weight`, `to_out_lora`),
                            alpha / rank folded into `up`
  unet.out.safetensors      `out`: the tiny-sd UNet on tests/fixtures/unet/tiny-sd.in.safetensors with
                            style.peft loaded by StableDiffusionPipeline.load_lora_weights (peft),
                            weight 1.0
  unet-x0.6.out.safetensors the same at adapter weight 0.6
  unet-id1.out.safetensors  style.peft at 1.0 together with tests/fixtures/adapter/id1.peft.safetensors at
                            1.0 (an identity and a style stacked)
  attn.out.safetensors      attn.old loaded by load_lora_weights
  locon.kohya.safetensors   a LoCon on every UNet convolution (resnets' conv1/conv2/conv_shortcut, down/upsamplers,
  locon.peft.safetensors    proj_in/proj_out, conv_in, conv_out): down [r, in, kh, kw], up [out, r, 1, 1]; alphas
                            as style.kohya; the PEFT form with alpha / rank folded into lora_B
  locon.out.safetensors     `out`: the UNet with locon.peft loaded by load_lora_weights, weight 1.0
  locon-style.out.safetensors  locon.peft at 0.8 and style.peft at 1.0 together
  loha.kohya.safetensors    LyCORIS LoHa (hada_w1_a/b, hada_w2_a/b, .alpha) on the UNet's linear layers, and
  lokr.kohya.safetensors    LoKr (lokr_w1[_a/_b], lokr_w2[_a/_b], .alpha) on its linear layers and resnet/sampler
                            convolutions: made by peft (LoHaConfig / LoKrConfig, init_weights=False, factors
                            scaled by 1 and 0.35), renamed to kohya names; LoKr layers with both w1 and w2
                            full get peft's alpha / r folded into lokr_w2 (LyCORIS scales them by 1)
  loha.out.safetensors,     the UNet with them, by peft (unmerged; checked against each layer's merge())
  lokr.out.safetensors
  dora.peft.safetensors     DoRA by peft (LoraConfig(use_dora=True), init_lora_weights=False, lora_B x 0.05,
                            magnitudes x U(0.9, 1.1)) on the UNet's attention/feed-forward layers and resnet/
                            sampler convolutions: unet.<path>.lora_A/.lora_B (alpha / r folded in) and
                            .lora_magnitude_vector ([out]; [1, out, 1, 1] for convolutions, as peft)
  dora.out.safetensors      the UNet with it, by peft (unmerged; checked against merge())
  te.out.safetensors        `hidden`: the text encoder on tests/fixtures/text_encoder/prompts.safetensors with
                            style.peft loaded, weight 1.0

Checks (exits non-zero on failure): every reference also equals the UNet / text encoder with the weights
merged by hand from the kohya file's semantics (W + weight * alpha / r * up @ down, missing alpha = r, in
f64) within 1e-5 of max|out|, so style.kohya must give the same outputs; the LoRA visibly changes both.
diffusers' own kohya loader is not used as the reference: with per-layer alphas it scales some layers
by 1 instead of alpha / r (it keys their alphas wrongly; peft warns that they match no module).

With `--hdb PATH` (an hdb binary) it also checks the export round trip: `hdb adapter export` of
style.kohya, locon.kohya, loha.kohya and dora.peft to PEFT, and of locon.kohya and the identity
adapter/id1.lidb to kohya, each loaded by diffusers' load_lora_weights, gives the reference output
within 1e-5 of max|out| (nothing is written). style.kohya's kohya export is not checked through
diffusers: its kohya loader keys attention layers' alphas in the processor form, which peft ignores,
so attention layers whose rank differs from the file's most common alpha are mis-scaled (4% here).

Fixed seeds, one thread; running it twice writes identical bytes. CI never runs it.
Run from the repository root:  /tmp/hdb-ref-venv/bin/python tools/make_lora_layers_fixtures.py [--hdb target/debug/hdb]
"""

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lidb  # noqa: E402
from make_unet_fixtures import run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "tests", "fixtures")
TINY = os.path.join(FX, "tiny-sd")
OUT = os.path.join(FX, "lora-layers")
SEED = 20261207
RANKS = (2, 3, 1)
ALPHAS = (1.0, 4.0, 0.5)
UNET_RE = re.compile(r"(transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
                     r"|resnets\.\d+\.time_emb_proj|^time_embedding\.linear_[12])$")
TE_RE = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
CONV_RE = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|samplers\.0\.conv|attentions\.\d+\.proj_(in|out)"
                     r"|^conv_in|^conv_out)$")
OLD_FORM = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
GENERATOR = f"tools/make_lora_layers_fixtures.py torch {torch.__version__}"


def fail(msg):
    sys.exit(f"FAIL {msg}")


def linear_layers(module, pattern, prefix, kind=torch.nn.Linear):
    out = {}
    for name, m in module.named_modules():
        if pattern.search(name):
            assert isinstance(m, kind), name
            out[prefix + name] = m
    return dict(sorted(out.items()))


def make_lora(layers):
    """{key: (down [r,in], up [out,r], alpha or None)}: down ~ U(+-1/sqrt(in)), up scaled so each
    layer's update is a few percent of its weight."""
    rng = np.random.default_rng(SEED)
    lora = {}
    for i, (k, m) in enumerate(layers.items()):
        r = RANKS[i % len(RANKS)]
        if isinstance(m, torch.nn.Conv2d):  # LoCon: down [r, in, kh, kw], up [out, r, 1, 1]
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            down = (rng.uniform(-1, 1, (r, m.in_channels, *m.kernel_size)) / np.sqrt(fan_in)).astype(np.float32)
            up = (rng.uniform(-1, 1, (m.out_channels, r, 1, 1)) * 0.5).astype(np.float32)
            lora[k] = (down, up, None if i % 3 == 2 else np.float32(ALPHAS[i % len(ALPHAS)]))
            continue
        down = (rng.uniform(-1, 1, (r, m.in_features)) / np.sqrt(m.in_features)).astype(np.float32)
        up = (rng.uniform(-1, 1, (m.out_features, r)) * 0.5).astype(np.float32)
        alpha = None if i % 3 == 2 else np.float32(ALPHAS[i % len(ALPHAS)])
        lora[k] = (down, up, alpha)
    return lora


def scale_of(down, alpha):
    r = down.shape[0]
    return 1.0 if alpha is None else float(alpha) / r


def kohya_file(lora):
    sd = {}
    for k, (down, up, alpha) in lora.items():
        n = lidb.kohya_name(k)
        sd[n + ".lora_down.weight"] = down
        sd[n + ".lora_up.weight"] = up
        if alpha is not None:
            sd[n + ".alpha"] = np.array(alpha, dtype=np.float32)
    return sd


def peft_file(lora):
    sd = {}
    for k, (down, up, alpha) in lora.items():
        sd[k + ".lora_A.weight"] = down
        sd[k + ".lora_B.weight"] = (up * np.float32(scale_of(down, alpha))).astype(np.float32)
    return sd


def old_form_file(lora):
    sd = {}
    for k, (down, up, alpha) in lora.items():
        m = re.match(r"(unet\..*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)$", k)
        if not m:
            continue
        stem = f"{m.group(1)}.processor.{OLD_FORM[m.group(2)]}"
        sd[stem + ".down.weight"] = down
        sd[stem + ".up.weight"] = (up * np.float32(scale_of(down, alpha))).astype(np.float32)
    return sd


def merged_by_hand(model, lora, prefix, weight):
    """A copy of `model` with every LoRA layer of `prefix` merged in f64."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    for k, (down, up, alpha) in lora.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if prefix == "text_encoder." and name not in mods:
            name = name.removeprefix("text_model.")
        lin = mods[name]
        r = down.shape[0]
        dw = weight * scale_of(down, alpha) * (up.reshape(-1, r).astype(np.float64)
                                               @ down.reshape(r, -1).astype(np.float64))
        dw = dw.reshape(lin.weight.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy((lin.weight.double().numpy() + dw).astype(np.float32)))
    return m


from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402


def lycoris_configs():
    """LoHa on the linear layers (peft's convolution LoHa is CP-decomposed, which hdb refuses);
    LoKr on linear layers and convolutions, w1 and w2 both decomposed where peft can."""
    from peft import LoHaConfig, LoKrConfig

    linear = r"^(?!.*\.(proj_in|proj_out)$).*(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|time_emb_proj)$"
    conv = r"^.*(resnets\.\d+\.(conv1|conv2)|samplers\.0\.conv)$"
    return [
        ("loha", 1.0, LoHaConfig(r=2, alpha=3.0, target_modules=linear, init_weights=False)),
        ("lokr", 0.35, LoKrConfig(r=1, alpha=0.5, target_modules=f"({linear})|({conv})", init_weights=False,
                            decompose_both=True, decompose_factor=-1)),
    ]


def inject_lycoris(unet, cfg, shrink):
    from peft import inject_adapter_in_model

    torch.manual_seed(SEED)
    model = inject_adapter_in_model(cfg, copy.deepcopy(unet))
    # Every factor times `shrink`, so the updates change the output by percents, not by
    # multiples (peft's random init is sized for training, not for a visible fixed update).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(t in n for t in ("hada_", "lokr_")):
                p.mul_(shrink)
    return model


def get_peft_model_state_dict(model):
    from peft import get_peft_model_state_dict as g

    return g(model)


def rel(x, ref):
    return (x - ref).abs().max().item() / ref.abs().max().item()


def main():
    from diffusers import StableDiffusionPipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--hdb", help="an hdb binary: also check `hdb adapter export` through diffusers")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    inp = {k: v for k, v in load_file(os.path.join(FX, "unet", "tiny-sd.in.safetensors")).items()}
    ids = load_file(os.path.join(FX, "text_encoder", "prompts.safetensors"))["input_ids"].long()

    pipe = StableDiffusionPipeline.from_pretrained(TINY, local_files_only=True)
    unet, te = pipe.unet.eval(), pipe.text_encoder.eval()
    with torch.no_grad():
        base_out, base_hidden = run(unet, inp), te(ids)[0]
    layers = linear_layers(unet, UNET_RE, "unet.")
    te_layers = linear_layers(te, TE_RE, "text_encoder.")
    te_layers = {k if k.startswith("text_encoder.text_model.") else "text_encoder.text_model." + k[13:]: v
                 for k, v in te_layers.items()}
    layers.update(te_layers)
    n_unet = sum(k.startswith("unet.") for k in layers)
    print(f"ok   {n_unet} UNet and {len(layers) - n_unet} text-encoder linear layers")
    lora = make_lora(layers)
    meta = {"format": "pt", "generator": GENERATOR}
    paths = {}
    for name, sd in [("style.kohya", kohya_file(lora)), ("style.peft", peft_file(lora)),
                     ("attn.old", old_form_file(lora))]:
        paths[name] = os.path.join(OUT, f"{name}.safetensors")
        lidb.save_tensors(sd, paths[name], metadata=meta)

    def loaded(files_weights):
        p = StableDiffusionPipeline.from_pretrained(TINY, local_files_only=True)
        p.unet.eval()
        p.text_encoder.eval()
        names = []
        for i, (f, _) in enumerate(files_weights):
            p.load_lora_weights(f, adapter_name=f"a{i}")
            names.append(f"a{i}")
        p.set_adapters(names, [w for _, w in files_weights])
        with torch.no_grad():
            return run(p.unet, inp), p.text_encoder(ids)[0]

    def by_hand(lora_weights):
        u, t = unet, te
        for lo, w in lora_weights:
            u = merged_by_hand(u, lo, "unet.", w)
            t = merged_by_hand(t, lo, "text_encoder.", w)
        with torch.no_grad():
            return run(u, inp), t(ids)[0]

    def check(what, got, want):
        r = rel(got, want)
        if r > 1e-5:
            fail(f"{what}: {r:.3g} of max|ref| apart")
        print(f"ok   {what}: {r:.2g} of max|ref|")

    def save(name, key, t, note):
        if not bool(torch.isfinite(t).all()):
            fail(f"{name}: non-finite")
        lidb.save_tensors({key: t.numpy()}, os.path.join(OUT, f"{name}.out.safetensors"),
                          metadata={"generator": GENERATOR, "adapters": note})

    # diffusers' kohya conversion is not the reference for per-layer alphas: it keys some of them
    # wrongly (peft warns "alpha_pattern keys did not match any targeted module" for to_out_lora and
    # self_attn ones) and then scales those layers by 1 instead of alpha / rank. The PEFT form, with
    # alpha / rank folded in, is loaded by diffusers as is; kohya's semantics are checked by hand.
    out, hidden = loaded([(paths["style.peft"], 1.0)])
    want_out, want_hidden = by_hand([(lora, 1.0)])
    check("style.peft UNet, diffusers vs kohya's alpha / rank by hand", out, want_out)
    check("style.peft text encoder, diffusers vs by hand", hidden, want_hidden)
    for what, x, b in [("UNet", out, base_out), ("text encoder", hidden, base_hidden)]:
        if rel(x, b) < 0.02:
            fail(f"the style LoRA barely changes the {what} ({rel(x, b):.3g})")
        print(f"ok   the style changes the {what} by {100 * rel(x, b):.1f}% of max|base|")
    save("unet", "out", out, "style.peft x1.0")
    save("te", "hidden", hidden, "style.peft x1.0")

    out6, _ = loaded([(paths["style.peft"], 0.6)])
    check("style.peft x0.6 UNet, diffusers vs by hand", out6, by_hand([(lora, 0.6)])[0])
    save("unet-x0.6", "out", out6, "style.peft x0.6")

    id1 = load_file(os.path.join(FX, "adapter", "id1.peft.safetensors"))
    id1_lora = {k[: -len(".lora_A.weight")]: (v.numpy(), id1[k.replace("lora_A", "lora_B")].numpy(), None)
                for k, v in id1.items() if k.endswith(".lora_A.weight")}
    both, _ = loaded([(paths["style.peft"], 1.0), (os.path.join(FX, "adapter", "id1.peft.safetensors"), 1.0)])
    check("style + id1 UNet, diffusers vs by hand", both, by_hand([(lora, 1.0), (id1_lora, 1.0)])[0])
    save("unet-id1", "out", both, "style.peft x1.0 + adapter/id1.peft x1.0")

    # LoCon: every UNet convolution (3x3, 1x1, stride 2), by kohya's alpha / rank.
    convs = linear_layers(unet, CONV_RE, "unet.", torch.nn.Conv2d)
    print(f"ok   {len(convs)} UNet convolutions")
    locon = make_lora(convs)
    for name, sd in [("locon.kohya", kohya_file(locon)), ("locon.peft", peft_file(locon))]:
        paths[name] = os.path.join(OUT, f"{name}.safetensors")
        lidb.save_tensors(sd, paths[name], metadata=meta)
    conv_out, _ = loaded([(paths["locon.peft"], 1.0)])
    check("locon.peft UNet, diffusers vs by hand", conv_out, by_hand([(locon, 1.0)])[0])
    if rel(conv_out, base_out) < 0.02:
        fail(f"the LoCon barely changes the UNet ({rel(conv_out, base_out):.3g})")
    save("locon", "out", conv_out, "locon.peft x1.0")
    both, _ = loaded([(paths["locon.peft"], 0.8), (paths["style.peft"], 1.0)])
    check("locon x0.8 + style UNet, diffusers vs by hand", both, by_hand([(locon, 0.8), (lora, 1.0)])[0])
    save("locon-style", "out", both, "locon.peft x0.8 + style.peft x1.0")

    # LoHa and LoKr made by peft (init_weights=False: random), as LyCORIS/kohya files.
    for name, shrink, cfg in lycoris_configs():
        model = inject_lycoris(unet, cfg, shrink)
        sd = {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
        with torch.no_grad():
            got = run(model, inp)
            fused = copy.deepcopy(model)
            for mod in fused.modules():
                if isinstance(mod, BaseTunerLayer):
                    mod.merge()
            merged = run(fused, inp)
        check(f"{name} peft unmerged vs merged", got, merged)
        r = rel(got, base_out)
        if not 0.02 < r < 1.0:
            fail(f"{name} changes the UNet by {r:.3g} of max|base|")
        kohya = {}
        for k, v in sd.items():
            path, part = k.rsplit(".", 1)
            v = v.numpy()
            # LyCORIS scales a LoKr layer whose w1 and w2 are both full by 1 (it saves alpha =
            # its dim then), peft by alpha / r: fold peft's scale into such layers' w2.
            if part == "lokr_w2" and f"{path}.lokr_w1" in sd:
                v = (v * np.float32(cfg.alpha / cfg.r)).astype(np.float32)
            kohya[f"{lidb.kohya_name('unet.' + path)}.{part}"] = v
        for path in sorted({k.rsplit(".", 1)[0] for k in sd}):
            kohya[f"{lidb.kohya_name('unet.' + path)}.alpha"] = np.array(cfg.alpha, dtype=np.float32)
        lidb.save_tensors(kohya, os.path.join(OUT, f"{name}.kohya.safetensors"), metadata=meta)
        save(name, "out", got, f"{name} by peft, alpha {cfg.alpha}, r {cfg.r}")
        parts = sorted({k.rsplit(".", 1)[1] for k in sd})
        print(f"ok   {name}: {len({k.rsplit('.', 1)[0] for k in sd})} layers, parts {parts}, changes the UNet by "
              f"{100 * r:.1f}%")

    # DoRA (peft LoraConfig(use_dora=True)) on linear layers and convolutions, as a PEFT file.
    from peft import LoraConfig

    linear = r"^(?!.*\.(proj_in|proj_out)$).*(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2)$"
    conv = r"^.*(resnets\.\d+\.(conv1|conv2)|samplers\.0\.conv)$"
    cfg = LoraConfig(r=2, lora_alpha=3.0, target_modules=f"({linear})|({conv})", init_lora_weights=False,
                     use_dora=True)
    model = inject_lycoris(unet, cfg, 1.0)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
            if "lora_magnitude_vector" in n:  # peft starts at |W|_row: move it
                p.mul_(0.9 + 0.2 * torch.rand(p.shape, generator=gen))
        dora_out = run(model, inp)
        fused = copy.deepcopy(model)
        for mod in fused.modules():
            if isinstance(mod, BaseTunerLayer):
                mod.merge()
        check("dora peft unmerged vs merged", dora_out, run(fused, inp))
    r = rel(dora_out, base_out)
    if not 0.02 < r < 1.0:
        fail(f"dora changes the UNet by {r:.3g} of max|base|")
    scale = cfg.lora_alpha / cfg.r
    dora = {}
    for k, v in get_peft_model_state_dict(model).items():
        v = v.detach()
        if "lora_B" in k:
            v = v * scale
        dora["unet." + k] = v.numpy().astype(np.float32)
    lidb.save_tensors(dora, os.path.join(OUT, "dora.peft.safetensors"), metadata=meta)
    save("dora", "out", dora_out, f"dora.peft by peft (use_dora), lora_alpha {cfg.lora_alpha}, r {cfg.r}")
    print(f"ok   dora: {sum(k.endswith('lora_magnitude_vector') for k in dora)} layers, changes the UNet by "
          f"{100 * r:.1f}%")

    if args.hdb:
        with tempfile.TemporaryDirectory() as tmp:
            for src, ref in [("style.kohya", out), ("locon.kohya", conv_out),
                             ("loha.kohya", load_file(os.path.join(OUT, "loha.out.safetensors"))["out"]),
                             ("dora.peft", dora_out)]:
                # Kohya exports go through diffusers where its kohya loader reads them right:
                # it keys the alphas of attention layers in the older processor form, which peft
                # ignores (it warns), so an attention layer gets the file's most common alpha,
                # wrong where ranks differ (style.kohya: 4% off). LoCon files and uniform-rank
                # adapters (identities, below) load exactly; hdb re-imports every kohya export
                # exactly (tests/lora_layers.rs).
                for fmt in ["peft", "kohya"] if src == "locon.kohya" else ["peft"]:
                    dst = os.path.join(tmp, f"{src}.{fmt}.safetensors")
                    subprocess.run([args.hdb, "adapter", "export", "--model", TINY, "--format", fmt,
                                    os.path.join(OUT, f"{src}.safetensors"), dst], check=True,
                                   stdout=subprocess.DEVNULL)
                    got, _ = loaded([(dst, 1.0)])
                    check(f"hdb adapter export {src} --format {fmt}, loaded by diffusers", got, ref)
            # An identity (uniform rank) as kohya, against peft's output for it.
            dst = os.path.join(tmp, "id1.kohya.safetensors")
            subprocess.run([args.hdb, "adapter", "export", "--model", TINY, "--format", "kohya",
                            os.path.join(FX, "adapter", "id1.lidb.safetensors"), dst], check=True,
                           stdout=subprocess.DEVNULL)
            got, _ = loaded([(dst, 1.0)])
            check("hdb adapter export id1.lidb --format kohya, loaded by diffusers", got,
                  load_file(os.path.join(FX, "adapter", "id1.out.safetensors"))["out"])

    attn, _ = loaded([(paths["attn.old"], 1.0)])
    attn_lora = {k: v for k, v in lora.items() if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", k)
                 and k.startswith("unet.")}
    check("attn.old UNet, diffusers vs by hand", attn, by_hand([(attn_lora, 1.0)])[0])
    save("attn", "out", attn, "attn.old x1.0")
    for f in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, f)):>8}  {f}")


if __name__ == "__main__":
    main()
