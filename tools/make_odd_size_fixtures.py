"""Builds the UNet fixtures at latent sizes that are not multiples of the UNet's total
downsampling (8 for tiny-sd's 4 blocks): 9x8 (a 72x64 image) and 5x7. diffusers runs them by
passing each skip's size to the upsampler (`forward_upsample_size`); hdb must match.

Makes (relative to the repository root), with tests/fixtures/tiny-sd's UNet (f32 files):
  tests/fixtures/unet/tiny-sd-odd-9x8.in.safetensors   sample [2,4,9,8], timestep [2],
                                                      encoder_hidden_states [2,77,16]
  tests/fixtures/unet/tiny-sd-odd-9x8.out.safetensors  out [2,4,9,8]
  tests/fixtures/unet/tiny-sd-odd-5x7.{in,out}.safetensors  likewise at 5x7

Deterministic (fixed seed, one CPU thread). Run with the reference venv:
    /tmp/hdb-ref-venv/bin/python tools/make_odd_size_fixtures.py
"""

import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_op_fixtures import save_sorted  # noqa: E402  (deterministic header order)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20240727


@torch.no_grad()
def main():
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(1)
    unet = UNet2DConditionModel.from_pretrained(
        os.path.join(ROOT, "tests/fixtures/tiny-sd"), subfolder="unet", local_files_only=True
    ).eval()
    gen = torch.Generator().manual_seed(SEED)
    ctx_dim = unet.config.cross_attention_dim
    out_dir = os.path.join(ROOT, "tests/fixtures/unet")
    for h, w in [(9, 8), (5, 7)]:
        case = f"tiny-sd-odd-{h}x{w}"
        inp = {
            "sample": torch.randn((2, 4, h, w), generator=gen),
            "timestep": torch.tensor([981.0, 1.0]),
            "encoder_hidden_states": torch.randn((2, 77, ctx_dim), generator=gen),
        }
        out = unet(inp["sample"], inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"]).sample
        assert out.shape == inp["sample"].shape and bool(torch.isfinite(out).all())
        meta = {"case": case, "generator": f"tools/make_odd_size_fixtures.py torch {torch.__version__}"}
        save_sorted(inp, os.path.join(out_dir, f"{case}.in.safetensors"), metadata=meta)
        save_sorted({"out": out}, os.path.join(out_dir, f"{case}.out.safetensors"), metadata=meta)
        assert torch.equal(load_file(os.path.join(out_dir, f"{case}.out.safetensors"))["out"], out)
        print(f"ok   {case}: max|out| {out.abs().max().item():.4f}")


if __name__ == "__main__":
    main()
