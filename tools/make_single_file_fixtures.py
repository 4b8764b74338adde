#!/usr/bin/env python3
"""Fixtures for `hdb generate` on an LDM single-file checkpoint with the built-in tokenizer
(tests/single_file.rs); CI never runs this.

A tiny SD 1.x model with SD's conventions where an LDM file leaves them implicit (what hdb and
diffusers infer from shapes: 8 heads per UNet block, 32 norm groups, a text encoder head per 64
channels) and the real CLIP ViT-L/14 vocabulary (49408 tokens), so that the built-in tokenizer's
ids index it. Even tiny, such a model is 1.2 MB in f16 (the vocabulary alone 3 MB), so what is
committed is the recipe of the checkpoint, and the test writes the file from it:

  recipe.json            every tensor of the LDM checkpoint in file order: name, dtype (F16, or I64
                         for CLIP's position_ids = 0..76), shape, and for F16 `offset` and `scale`
                         (powers of two). Element i of tensor K is offset + scale * (2 k_i - 127) / 128,
                         k_i = z_i >> 57 with z_i the i-th output of splitmix64 started at x = fnv1a64(K)
                         (DESIGN.md section 4's splitmix64 and fnv1a64): 128 levels, every one exact
                         in f16, so Rust and Python write the same bits with no rounding to agree on.
                         `data_fnv1a64`: fnv1a64 of all tensor bytes in file order, so the test knows
                         the file it wrote is this one.
  reference.safetensors  `latents` [1, 4, 8, 8] (the starting noise), `out_latents` (the denoised
                         latents, output_type="latent"), `images` [1, 16, 16, 3] in [0, 1]
                         (output_type="np"), and `input_ids` [77] i64: the pipeline's tokens
                         for the prompt, padded

The reference is diffusers' `StableDiffusionPipeline.from_single_file` on that very file, offline:
`config=` a local folder with the components' configs, SD 1.5's scheduler config and SD 1.5's
tokenizer folder rebuilt from CLIP's merge list (tools/make_tokenizer_fixtures.py), which is also
the data hdb embeds. Prompt PROMPT, negative NEGATIVE, STEPS steps of DPM++ 2M, guidance 7.5,
16x16 pixels (the 2-level VAE scales by 2).

Run from the repository root:  /tmp/hdb-ref-venv/bin/python tools/make_single_file_fixtures.py
"""

import json
import math
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lidb  # noqa: E402
import make_io_fixtures as io_fx  # noqa: E402
import make_scheduler_fixtures as sched_fx  # noqa: E402
import make_tokenizer_fixtures as tok_fx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "single-file")
GZ = os.path.join(ROOT, "data", "clip", "bpe_simple_vocab_16e6.txt.gz")
SEED = 20250307
VOCAB = 49408
TEXT_HIDDEN = 32
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
PROMPT, NEGATIVE, STEPS, GUIDANCE = "a photo of sks person, highly detailed", "blurry", 4, 7.5


def build_models():
    """The three components with SD 1.x's conventions, tiny (their weights come from the recipe)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
        attention_head_dim=8,  # SD 1.x's convention: the number of heads, as hdb infers it
        cross_attention_dim=TEXT_HIDDEN, use_linear_projection=False,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32, latent_channels=4,
        sample_size=16, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=1,  # hidden / 64, at least 1: what a single file's shapes imply
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_HIDDEN,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = PNDMScheduler(  # SD 1.5's scheduler_config.json, which hdb uses for single files
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, trained_betas=None,
    )
    return unet, vae, text_encoder, scheduler


def recipe_entry(name, shape):
    """offset and scale (powers of two, exact in JSON) of one tensor: norms near 1, biases small,
    weights uniform in +-2^-round(log2 sqrt(fan_in)), about PyTorch's default init."""
    if len(shape) == 1:
        offset, scale = (1.0, 0.125) if name.endswith(".weight") else (0.0, 0.125)
    else:
        fan_in = int(np.prod(shape[1:]))
        offset, scale = 0.0, 2.0 ** -round(math.log2(math.sqrt(fan_in)))
    return {"name": name, "dtype": "F16", "shape": list(shape), "offset": offset, "scale": scale}


def recipe_values(e):
    """The recipe's elements (see the module doc): splitmix64 from fnv1a64(name), vectorized."""
    n = int(np.prod(e["shape"]))
    x0 = np.uint64(lidb.fnv1a64(e["name"]))
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x0 + i * np.uint64(lidb.SPLITMIX_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    k = (z >> np.uint64(57)).astype(np.float64)
    v = e["offset"] + e["scale"] * (2.0 * k - 127.0) / 128.0
    h = v.astype(np.float16)
    assert np.array_equal(h.astype(np.float64), v), f"{e['name']}: a recipe value is not exact in f16"
    return torch.from_numpy(h.reshape(e["shape"]))


def config_folder(path, unet, vae, text_encoder, scheduler):
    """What `from_single_file(config=...)` reads instead of the Hub: configs and SD 1.5's tokenizer."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(path, "tokenizer")
    enc, merges = tok_fx.clip_vocab(GZ)
    tok_fx.write_folder(tok_dir, enc, merges, tok_fx.SD15_CONFIG, tok_fx.SD15_SPECIAL_TOKENS_MAP)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    # save_pretrained rewrites tokenizer/ in transformers 5's form; keep SD 1.5's files as shipped.
    for f in os.listdir(tok_dir):
        os.remove(os.path.join(tok_dir, f))
    tok_fx.write_folder(tok_dir, enc, merges, tok_fx.SD15_CONFIG, tok_fx.SD15_SPECIAL_TOKENS_MAP)
    # save_pretrained writes every scheduler default, "timestep_spacing": "leading" included, which
    # DPMSolverMultistepScheduler.from_config would then inherit; SD 1.5's published config (what
    # from_single_file fetches without config=, and hdb's default) has no such key, so DPM++
    # spaces "linspace".
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched_fx.SD15, f, indent=2)


def main():
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    unet, vae, text_encoder, scheduler = build_models()
    te_sd = {k if k.startswith("text_model.") else "text_model." + k: v
             for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    io_fx.LAYERS_PER_BLOCK = 1  # to_ldm's UNet block numbering
    names = io_fx.to_ldm(unet.state_dict(), vae.state_dict(), te_sd, len(vae.config.up_block_types))
    recipe = [recipe_entry(k, tuple(v.shape)) for k, v in sorted(names.items())]
    recipe.append({"name": POSITION_IDS, "dtype": "I64", "shape": [1, 77]})
    recipe.sort(key=lambda e: e["name"])
    ldm = {e["name"]: (torch.arange(77).unsqueeze(0) if e["dtype"] == "I64" else recipe_values(e))
           for e in recipe}
    # A check for the test's own writer: fnv1a64 of every tensor's bytes, in file order.
    data = b"".join(ldm[e["name"]].numpy().tobytes() for e in recipe)
    with open(os.path.join(OUT, "recipe.json"), "w") as f:
        json.dump({"generator": "tools/make_single_file_fixtures.py", "data_fnv1a64": str(lidb.fnv1a64(data)),
                   "tensors": recipe}, f, indent=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny-sd1.safetensors")
        save_file(ldm, path, metadata={"format": "pt"})
        # The converters' view of the file equals the recipe (names, shapes, values).
        from diffusers.loaders import single_file_utils as sfu
        f32 = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
        unet_sd = sfu.convert_ldm_unet_checkpoint(dict(f32), unet.config)
        vae_sd = sfu.convert_ldm_vae_checkpoint(dict(f32), vae.config)
        assert sfu.infer_diffusers_model_type(f32) == "v1"
        cfg = os.path.join(tmp, "config")
        config_folder(cfg, unet, vae, text_encoder, scheduler)
        pipe = StableDiffusionPipeline.from_single_file(path, config=cfg, local_files_only=True,
                                                        torch_dtype=torch.float32, safety_checker=None,
                                                        requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        io_fx.assert_equal_dicts("from_single_file unet", pipe.unet.state_dict(), unet_sd)
        io_fx.assert_equal_dicts("from_single_file vae", pipe.vae.state_dict(), vae_sd)
        emb = pipe.text_encoder.get_input_embeddings().weight
        key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
        assert emb.shape == (VOCAB, TEXT_HIDDEN) and torch.equal(emb, f32[key]), "token embedding"
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED))
        kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  height=16, width=16)
        with torch.no_grad():
            images = pipe(latents=latents.clone(), output_type="np", **kw).images
            out_latents = pipe(latents=latents.clone(), output_type="latent", **kw).images
    assert np.isfinite(images).all() and np.isfinite(out_latents.numpy()).all()
    assert images.std() > 0.01, "a flat image would hide a broken VAE"
    lidb.save_tensors({
        "latents": latents.numpy(),
        "out_latents": out_latents.numpy().astype(np.float32),
        "images": np.ascontiguousarray(images.astype(np.float32)),
        "input_ids": np.array(ids, dtype=np.int64),
    }, os.path.join(OUT, "reference.safetensors"))
    print(f"ok   ids {ids[:12]}...; images mean {images.mean():.4f} std {images.std():.4f}; "
          f"max|out_latents| {out_latents.abs().max():.3f}")
    for f in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, f)):>8}  {f}")


if __name__ == "__main__":
    main()
