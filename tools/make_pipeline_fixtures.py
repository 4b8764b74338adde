"""Fixtures for hdb's text-to-image pipeline (tests/pipeline.rs); CI never runs this.

diffusers' StableDiffusionPipeline on the tiny SD fixture (tests/fixtures/tiny-sd, f32, its
tokenizer), from fixed latents (`latents=`, unscaled noise [B, 4, 8, 8] -> 64x64 images), prompt
"a photo of sks person", negative prompt "blurry, low quality", 4 steps, guidance 7.5:

  latents.safetensors           `latents` [2, 4, 8, 8] f32 (the starting noise)
  <case>.safetensors            `images` [B, 64, 64, 3] floats in [0, 1] (output_type="np") and
                                `latents` [B, 4, 8, 8] (output_type="latent")
cases: ddim, euler, dpmpp_2m, dpmpp_2m_karras (batch 2, no adapter); ddim-id (batch 2, the UNet
identity tests/fixtures/adapter/id1 + the text-encoder identity tests/fixtures/text_encoder/te-id,
both loaded from their PEFT exports with load_lora_weights at weight 1); ddim-per-image (sample 0
with no adapter, sample 1 with both identities: two batch-1 runs concatenated; diffusers cannot
give images of one batch different adapters). Euler ancestral draws its own noise inside
diffusers, so it is covered at the scheduler level only.

Run from the repository root:  /tmp/hdb-ref-venv/bin/python tools/make_pipeline_fixtures.py
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lidb  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "tests/fixtures")
OUT = os.path.join(FX, "pipeline")
PROMPT, NEGATIVE, STEPS, GUIDANCE = "a photo of sks person", "blurry, low quality", 4, 7.5


def schedulers(base_config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    return {
        "ddim": DDIMScheduler.from_config(base_config),
        "euler": EulerDiscreteScheduler.from_config(base_config),
        "dpmpp_2m": DPMSolverMultistepScheduler.from_config(base_config),
        "dpmpp_2m_karras": DPMSolverMultistepScheduler.from_config(base_config, use_karras_sigmas=True),
    }


def run(pipe, latents):
    kw = dict(prompt=[PROMPT] * latents.shape[0], negative_prompt=[NEGATIVE] * latents.shape[0],
              num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64)
    with torch.no_grad():
        images = pipe(latents=latents.clone(), output_type="np", **kw).images
        lat = pipe(latents=latents.clone(), output_type="latent", **kw).images
    return np.ascontiguousarray(images.astype(np.float32)), lat.numpy().astype(np.float32)


def main():
    from diffusers import StableDiffusionPipeline

    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(FX, "tiny-sd"), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1234)
    latents = torch.randn((2, 4, 8, 8), generator=g)
    lidb.save_tensors({"latents": latents.numpy()}, os.path.join(OUT, "latents.safetensors"))
    base_config = pipe.scheduler.config
    results = {}
    for name, sched in schedulers(base_config).items():
        pipe.scheduler = sched
        images, lat = run(pipe, latents)
        results[name] = images
        lidb.save_tensors({"images": images, "latents": lat}, os.path.join(OUT, f"{name}.safetensors"))
        print(f"ok   {name}: images mean {images.mean():.4f} std {images.std():.4f}, max|latents| {np.abs(lat).max():.3f}")

    pipe.scheduler = schedulers(base_config)["ddim"]
    pipe.load_lora_weights(os.path.join(FX, "adapter/id1.peft.safetensors"), adapter_name="unet_id")
    pipe.load_lora_weights(os.path.join(FX, "text_encoder/te-id.peft.safetensors"), adapter_name="te_id")
    pipe.set_adapters(["unet_id", "te_id"], adapter_weights=[1.0, 1.0])
    images, lat = run(pipe, latents)
    change = np.abs(images - results["ddim"]).max()
    assert change > 0.01, f"the identities barely change the images ({change})"
    lidb.save_tensors({"images": images, "latents": lat}, os.path.join(OUT, "ddim-id.safetensors"))
    print(f"ok   ddim-id: max change to ddim {change:.3f}")
    img1, lat1 = run(pipe, latents[1:])
    pipe.disable_lora()
    img0, lat0 = run(pipe, latents[:1])
    d = np.abs(img0 - results["ddim"][:1]).max()
    print(f"note disable_lora batch-1 vs batch-2 base: max diff {d:.2e}")
    assert d < 1e-4, "disable_lora must give the base images"
    lidb.save_tensors({"images": np.concatenate([img0, img1]), "latents": np.concatenate([lat0, lat1])},
                      os.path.join(OUT, "ddim-per-image.safetensors"))
    print("ok   ddim-per-image")
    for f in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, f)):>8}  {f}")


if __name__ == "__main__":
    main()
