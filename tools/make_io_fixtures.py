"""Builds hdb's checkpoint-reading fixtures: a tiny, randomly initialised Stable Diffusion 1.5-shaped
model written twice, once as a diffusers pipeline folder and once as a single-file LDM checkpoint.

Makes (relative to the repository root):
  tests/fixtures/tiny-sd/               diffusers StableDiffusionPipeline folder: unet, vae, text_encoder
                                        (f32 `*.safetensors` and f16 `*.fp16.safetensors` side by side),
                                        tokenizer (tiny byte-level BPE CLIP vocab), scheduler (SD 1.5's
                                        PNDM config), model_index.json
  tests/fixtures/tiny-sd-ldm.safetensors the same f32 weights under LDM names (model.diffusion_model.*,
                                        cond_stage_model.transformer.text_model.*, first_stage_model.*)
                                        plus the non-weight keys real checkpoints carry

The UNet and VAE have exactly SD 1.5's block types, layers_per_block and key set (686 and 248
tensors); only channel counts are tiny. Every parameter is random and no two tensors of a component
are byte-identical, so a test that compares bytes catches any mix-up of names. The LDM names come
from `ldm_name()` below, written independently of diffusers; the tool then runs diffusers' own
single-file converters on the LDM file and fails unless they give back the diffusers state dicts bit
for bit. Nothing is downloaded: all configs are built in code.

Run from the repository root with the reference venv (../shared/setup-reference-venv.sh):
    /tmp/hdb-ref-venv/bin/python tools/make_io_fixtures.py [--out tests/fixtures]
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SEED = 20240611
LAYERS_PER_BLOCK = 2
# SD 1.5's shape with tiny channels. (4, 8, 12, 12) keeps SD's pattern of which resnets need a
# channel-changing shortcut (conv_shortcut / nin_shortcut), so the key set equals SD 1.5's.
BLOCK_OUT = (4, 8, 12, 12)
GROUPS = 2
TEXT_HIDDEN = 16
VOCAB_TARGET = 1000

# Text the tiny BPE vocabulary is trained on: prompt-like words, so that test prompts tokenize into
# real merges instead of single bytes.
CORPUS = """
a photo of sks person, a portrait photo of a person with a smile, close up face, studio lighting,
high quality, detailed skin, sharp focus, a painting of a man in the style of van gogh, oil on canvas,
a woman wearing glasses and a red hat, standing in a park at sunset, golden hour, bokeh background,
a child playing with a dog on the beach, wide angle, cinematic lighting, photorealistic, 35mm film,
an astronaut riding a horse on the moon, digital art, trending on artstation, highly detailed,
a watercolor illustration of a cat sleeping on a chair, soft colors, pencil sketch, black and white,
a headshot of a young man with short hair and a beard, looking at the camera, neutral expression,
a professional photograph of an old woman with wrinkles and grey hair, natural light, window,
an anime character with blue eyes and long hair, smiling, colorful, vibrant, fantasy, magic forest,
a statue made of marble in a museum, a bronze sculpture, a drawing in charcoal, a pixel art sprite,
low quality, blurry, deformed, ugly, bad anatomy, extra fingers, worst quality, jpeg artifacts,
the quick brown fox jumps over the lazy dog, one two three four five six seven eight nine ten,
superhero costume, cyberpunk city at night, neon lights, rain, reflections, portrait of a knight in
armor, renaissance painting, pop art, comic book style, linkedin profile picture, passport photo,
"""


def bytes_to_unicode():
    """CLIP's (GPT-2's) reversible byte -> printable unicode character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe(text, max_merges):
    """Plain BPE with CLIP's end-of-word marker; ties break on the pair itself, so it is deterministic."""
    b2u = bytes_to_unicode()
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))
    splits = Counter()
    for w, c in words.items():
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        splits[tuple(syms)] += c
    merges = []
    while len(merges) < max_merges:
        pairs = Counter()
        for syms, c in splits.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for syms, c in splits.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            merged[tuple(out)] += c
        splits = merged
    return merges


def build_vocab():
    """CLIP's vocab layout: 256 bytes, the same with </w>, one token per merge, then the two specials."""
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    merges = train_bpe(CORPUS, VOCAB_TARGET - len(tokens) - 2)
    vocab = {}
    for t in tokens + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def randomize_(model, gen):
    """Default init leaves norms at 1/0 and some biases at 0: identical tensors under different names
    would let a name mix-up pass a byte comparison. Add noise to every constant tensor."""
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def build_models():
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=BLOCK_OUT,
        layers_per_block=LAYERS_PER_BLOCK,
        norm_num_groups=GROUPS,
        attention_head_dim=2,  # SD 1.x convention: this is the number of heads
        cross_attention_dim=TEXT_HIDDEN,
        use_linear_projection=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=BLOCK_OUT,
        layers_per_block=LAYERS_PER_BLOCK,
        norm_num_groups=GROUPS,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    vocab, merges = build_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=TEXT_HIDDEN,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    for m in (unet, vae, text_encoder):
        randomize_(m, gen)
        m.eval()
    # SD 1.5's scheduler/scheduler_config.json.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        trained_betas=None,
    )
    return unet, vae, text_encoder, scheduler, vocab, merges


def build_tokenizer(vocab, merges, tmp):
    from transformers import CLIPTokenizer

    vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
    write_vocab_merges(vocab, merges, vocab_file, merges_file)
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=77)


def write_vocab_merges(vocab, merges, vocab_file, merges_file):
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


# ---------------------------------------------------------------- diffusers -> LDM names (SD 1.x)

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_ldm_name(name, lpb, up_blocks_without_attn=(0,)):
    """One UNet2DConditionModel parameter name -> its name under model.diffusion_model."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    stem, leaf = name.rsplit(".", 1)
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    p = name.split(".")
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":  # down_blocks.B.downsamplers.0.conv.X
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.{p[5]}"
        n = 1 + b * (lpb + 1) + int(p[3])
        if p[2] == "resnets":
            return f"input_blocks.{n}.0.{UNET_RESNET[p[4]]}.{p[5]}"
        return f"input_blocks.{n}.1.{'.'.join(p[4:])}"
    if p[0] == "mid_block":
        if p[1] == "attentions":
            return f"middle_block.1.{'.'.join(p[3:])}"
        return f"middle_block.{2 * int(p[2])}.{UNET_RESNET[p[3]]}.{p[4]}"
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":  # after the resnet, or after resnet + attention
            slot = 1 if b in up_blocks_without_attn else 2
            return f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.{p[5]}"
        n = b * (lpb + 1) + int(p[3])
        if p[2] == "resnets":
            return f"output_blocks.{n}.0.{UNET_RESNET[p[4]]}.{p[5]}"
        return f"output_blocks.{n}.1.{'.'.join(p[4:])}"
    raise KeyError(f"no LDM name for unet key {name}")


def vae_ldm_name(name, n_up):
    """One AutoencoderKL parameter name -> its name under first_stage_model (LDM's up is reversed)."""
    name = name.replace(".conv_norm_out.", ".norm_out.")
    p = name.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out", "norm_out"):
        return name
    coder = p[0]
    if p[1] == "mid_block":
        if p[2] == "resnets":
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.mid.block_{int(p[3]) + 1}.{rest}"
        rest = ".".join(p[4:])
        stem, leaf = rest.rsplit(".", 1)
        return f"{coder}.mid.attn_1.{VAE_ATTN[stem]}.{leaf}"
    i = int(p[2])
    level, kind = (i, "down") if p[1] == "down_blocks" else (n_up - 1 - i, "up")
    if p[3] in ("downsamplers", "upsamplers"):
        return f"{coder}.{kind}.{level}.{kind}sample.conv.{p[6]}"
    rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
    return f"{coder}.{kind}.{level}.block.{p[4]}.{rest}"


def is_vae_attn_matrix(name):
    return ".mid_block.attentions." in name and name.endswith(".weight") and ".group_norm." not in name


def to_ldm(unet_sd, vae_sd, te_sd, n_up):
    out = {}
    for k, v in unet_sd.items():
        out["model.diffusion_model." + unet_ldm_name(k, LAYERS_PER_BLOCK)] = v
    for k, v in vae_sd.items():
        # LDM's AttnBlock uses 1x1 convolutions where diffusers uses Linear.
        out["first_stage_model." + vae_ldm_name(k, n_up)] = v[:, :, None, None] if is_vae_attn_matrix(k) else v
    for k, v in te_sd.items():
        assert k.startswith("text_model."), k
        out["cond_stage_model.transformer." + k] = v
    assert len(out) == len(unet_sd) + len(vae_sd) + len(te_sd), "two diffusers keys got the same LDM name"
    return out


# ---------------------------------------------------------------- checks

def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def assert_equal_dicts(what, got, want):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if not same(got[k], want[k]))
    if missing or extra or bad:
        sys.exit(f"FAIL {what}: missing {missing[:10]} ({len(missing)}), extra {extra[:10]} ({len(extra)}), "
                 f"different {bad[:10]} ({len(bad)})")
    print(f"ok   {what}: {len(want)} tensors identical (names, dtypes, shapes, values)")


def assert_distinct(what, sd):
    seen = {}
    for k, v in sd.items():
        b = (tuple(v.shape), v.numpy().tobytes())
        if b in seen:
            sys.exit(f"FAIL {what}: {k} and {seen[b]} are identical; byte checks could not tell them apart")
        seen[b] = k


def verify_with_diffusers(ldm, unet, vae, te_sd):
    """The oracle: diffusers' own single-file converters must turn our LDM dict back into the
    diffusers state dicts exactly."""
    from diffusers.loaders import single_file_utils as sfu

    assert_equal_dicts("convert_ldm_unet_checkpoint", sfu.convert_ldm_unet_checkpoint(dict(ldm), unet.config),
                       unet.state_dict())
    # convert_ldm_vae_checkpoint squeezes the [C, C, 1, 1] attention weights to [C, C] itself.
    assert_equal_dicts("convert_ldm_vae_checkpoint", sfu.convert_ldm_vae_checkpoint(dict(ldm), vae.config),
                       vae.state_dict())
    assert sfu.is_clip_model(ldm), "diffusers does not detect an SD 1.x CLIP text encoder"
    clip = sfu.convert_ldm_clip_checkpoint(dict(ldm))
    # It strips the prefix from every cond_stage_model.transformer.* key, position_ids included;
    # that buffer is not a weight, so leave it out of the comparison.
    clip.pop("text_model.embeddings.position_ids")
    assert_equal_dicts("convert_ldm_clip_checkpoint", clip, te_sd)
    assert sfu.infer_diffusers_model_type(ldm) == "v1", sfu.infer_diffusers_model_type(ldm)
    print("ok   infer_diffusers_model_type: v1")


def add_text_model_prefix(path):
    """transformers >= 5.6 saves CLIPTextModel flattened (`embeddings.*`, `encoder.*`); every SD 1.x
    repository on the hub, and the LDM layout, have `text_model.*`. Write the hub layout, which
    transformers still loads."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    save_file(sd, path, metadata=meta)
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()

    from diffusers import StableDiffusionPipeline

    torch.use_deterministic_algorithms(True)
    unet, vae, text_encoder, scheduler, vocab, merges = build_models()
    folder = os.path.join(args.out, "tiny-sd")
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(vocab, merges, tmp)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        # f16 first: saving rewrites the configs, and the f32 save must be the one they describe.
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
        pipe.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    tok_dir = os.path.join(folder, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "merges.txt")):
        write_vocab_merges(vocab, merges, os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"))
    for variant in ("", ".fp16"):
        add_text_model_prefix(os.path.join(folder, "text_encoder", f"model{variant}.safetensors"))

    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    te_sd = {"text_model." + k if not k.startswith("text_model.") else k: v
             for k, v in text_encoder.state_dict().items()}
    for what, sd in (("unet", unet_sd), ("vae", vae_sd), ("text_encoder", te_sd)):
        assert_distinct(what, sd)

    # What the folder holds is what the models hold, in both variants, and diffusers reads it back.
    files = {"unet": ("diffusion_pytorch_model", unet_sd), "vae": ("diffusion_pytorch_model", vae_sd),
             "text_encoder": ("model", te_sd)}
    for sub, (stem, sd) in files.items():
        for variant, dtype in (("", torch.float32), (".fp16", torch.float16)):
            got = load_file(os.path.join(folder, sub, f"{stem}{variant}.safetensors"))
            assert_equal_dicts(f"{sub}/{stem}{variant}.safetensors", got, {k: v.to(dtype) for k, v in sd.items()})
    back = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    for what, model, sd in (("unet", back.unet, unet_sd), ("vae", back.vae, vae_sd),
                            ("text_encoder", back.text_encoder, te_sd)):
        re_sd = {("text_model." + k if what == "text_encoder" and not k.startswith("text_model.") else k): v
                 for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        assert_equal_dicts(f"from_pretrained {what}", re_sd, sd)
    # transformers 5 writes only tokenizer.json; the vocab.json/merges.txt written next to it must agree.
    with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)["model"]
    tj_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tj["merges"]]
    assert tj["vocab"] == vocab and tj_merges == merges, "tokenizer.json disagrees with vocab.json/merges.txt"
    ids = back.tokenizer("a photo of sks person").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"], ids
    print(f"ok   tokenizer: 'a photo of sks person' -> {ids}")
    image = back("a photo of sks person", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all()), image.shape
    print("ok   pipeline runs: 2 steps, 64x64, finite output")

    # The single-file LDM checkpoint, f32, with the non-weight keys real ones have.
    n_up = len(vae.config.up_block_types)
    ldm = to_ldm(unet_sd, vae_sd, te_sd, n_up)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ldm["alphas_cumprod"] = torch.cumprod(1.0 - betas, 0).to(torch.float32)
    ldm["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    ldm["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    ldm = {k: v.contiguous() for k, v in sorted(ldm.items())}
    ldm_path = os.path.join(args.out, "tiny-sd-ldm.safetensors")
    save_file(ldm, ldm_path, metadata={"format": "pt"})
    verify_with_diffusers(load_file(ldm_path), unet, vae, te_sd)
    # And the whole single-file path users take, with the folder as the config source (offline).
    single = StableDiffusionPipeline.from_single_file(ldm_path, config=folder, local_files_only=True)
    for what, model, sd in (("unet", single.unet, unet_sd), ("vae", single.vae, vae_sd),
                            ("text_encoder", single.text_encoder, te_sd)):
        re_sd = {("text_model." + k if what == "text_encoder" and not k.startswith("text_model.") else k): v
                 for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        assert_equal_dicts(f"from_single_file {what}", re_sd, sd)

    total = 0
    for root, _, names in sorted(os.walk(folder)):
        for n in sorted(names):
            size = os.path.getsize(os.path.join(root, n))
            total += size
            print(f"{size:>9}  {os.path.relpath(os.path.join(root, n), args.out)}")
    print(f"{total:>9}  tiny-sd/ total")
    print(f"{os.path.getsize(ldm_path):>9}  tiny-sd-ldm.safetensors ({len(ldm)} keys)")


if __name__ == "__main__":
    main()
