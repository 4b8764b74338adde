"""Builds hdb's VAE numerics fixtures: inputs and diffusers' float32 CPU outputs of AutoencoderKL's
decode and encode, for the tiny SD 1.5-shaped VAE of tests/fixtures/tiny-sd and one small VAE with
the optional parts switched off.

Makes (relative to the repository root):
  tests/fixtures/vae/<case>.decode.safetensors  latents [B,C_lat,h,w] f32 (the argument of
                                                vae.decode(), i.e. already divided by
                                                scaling_factor), image [B,C_out,fh,fw] f32 =
                                                vae.decode(latents).sample
  tests/fixtures/vae/<case>.encode.safetensors  image [B,C_in,H,W] f32 in [-1, 1], mean and logvar
                                                [B,C_lat,H/f,W/f] = vae.encode(image).latent_dist
                                                .mean / .logvar (logvar clamped to [-30, 20] by
                                                diffusers), noise (seeded normal, same shape) and
                                                sample = mean + exp(0.5 logvar) * noise (what
                                                latent_dist.sample() computes from that noise)
  tests/fixtures/vae/noquant/vae/               diffusers layout (config.json + safetensors) of the
                                                second case's model

Cases:
  tiny-sd   AutoencoderKL.from_pretrained("tests/fixtures/tiny-sd", subfolder="vae"), f32 files:
            block_out_channels (4, 8, 12, 12), layers_per_block 2, groups 2, 4 latent channels,
            quant convs and mid attention present (made by tools/make_io_fixtures.py with seeded
            noise on every weight). B=2, latents 8x8 -> image 64x64; encode 64x64 -> 8x8.
            The LDM single file tests/fixtures/tiny-sd-ldm.safetensors holds the same weights
            (make_io_fixtures.py checks diffusers' converter gives them back bit for bit), so the
            Rust test runs the same fixture through both.
  noquant   a new AutoencoderKL: block_out_channels (4, 6) (downscale 2), layers_per_block 1,
            groups 2, 3 latent channels, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=False; seeded noise on every parameter (norm weights away from
            1, biases away from 0). B=1, latents 8x8 -> 16x16; encode 16x16 -> 8x8.

Each case prints max|out| and std of every output and the share of logvar values at the clamp
bounds, so a degenerate (constant, saturated) reference would show. Everything runs on one CPU
thread with fixed seeds: running the tool twice writes identical bytes. Nothing is downloaded. CI
never runs this tool; the fixtures it writes are committed.

Run from the repository root with the reference venv (../shared/setup-reference-venv.sh), after
tools/make_io_fixtures.py has made tests/fixtures/tiny-sd:
    /tmp/hdb-ref-venv/bin/python tools/make_vae_fixtures.py [--out tests/fixtures]
"""

import argparse
import os
import shutil
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_io_fixtures import assert_equal_dicts  # noqa: E402
from make_op_fixtures import save_sorted  # noqa: E402  (deterministic header order)
from make_unet_fixtures import randomize_all_  # noqa: E402  (same noise recipe as the UNet cases)

SEED = 20240614


def stats(name, t):
    return f"{name} {list(t.shape)} max|.|={t.abs().max().item():.4f} std={t.std().item():.4f}"


@torch.no_grad()
def decode(vae, z):
    return vae.decode(z).sample


@torch.no_grad()
def encode(vae, x):
    d = vae.encode(x).latent_dist
    return d.mean, d.logvar, d.std


def write_case(out_dir, case, vae, b, lat_hw, gen, note):
    c = vae.config
    f = 2 ** (len(c.block_out_channels) - 1)
    z = torch.randn((b, c.latent_channels, lat_hw, lat_hw), generator=gen)
    image = decode(vae, z)
    if not torch.equal(image, decode(vae, z)):
        sys.exit(f"FAIL {case}: two decodes differ")
    x = torch.rand((b, c.in_channels, lat_hw * f, lat_hw * f), generator=gen) * 2 - 1
    mean, logvar, std = encode(vae, x)
    m2, l2, _ = encode(vae, x)
    if not (torch.equal(mean, m2) and torch.equal(logvar, l2)):
        sys.exit(f"FAIL {case}: two encodes differ")
    noise = torch.randn(mean.shape, generator=gen)
    sample = mean + std * noise
    for t in (image, mean, logvar):
        if not bool(torch.isfinite(t).all()):
            sys.exit(f"FAIL {case}: non-finite output")
        if t.std().item() < 1e-3:
            sys.exit(f"FAIL {case}: degenerate output (std {t.std().item():.2e})")
    clamped = ((logvar <= -30) | (logvar >= 20)).float().mean().item()
    if clamped > 0.5:
        sys.exit(f"FAIL {case}: {clamped:.0%} of logvar at the clamp bounds")
    meta = {"case": case, "generator": f"tools/make_vae_fixtures.py torch {torch.__version__}", "model": note}
    dec = os.path.join(out_dir, f"{case}.decode.safetensors")
    enc = os.path.join(out_dir, f"{case}.encode.safetensors")
    save_sorted({"latents": z, "image": image}, dec, metadata=meta)
    save_sorted({"image": x, "mean": mean, "logvar": logvar, "noise": noise, "sample": sample}, enc, metadata=meta)
    assert torch.equal(load_file(dec)["image"], image) and torch.equal(load_file(enc)["logvar"], logvar)
    print(f"ok   {case}: block_out_channels={tuple(c.block_out_channels)} layers_per_block={c.layers_per_block} "
          f"groups={c.norm_num_groups} latent_channels={c.latent_channels} quant_conv={c.use_quant_conv} "
          f"post_quant_conv={c.use_post_quant_conv} mid_attention={c.mid_block_add_attention}")
    print(f"     decode: {stats('latents', z)} -> {stats('image', image)}")
    print(f"     encode: {stats('image', x)} -> {stats('mean', mean)}, {stats('logvar', logvar)} "
          f"({clamped:.1%} at the clamp bounds); {stats('sample', sample)}")
    print(f"     {os.path.getsize(dec)} + {os.path.getsize(enc)} bytes")
    return z, x, image, mean, logvar


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out_dir = os.path.join(args.out, "vae")
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)

    tiny = os.path.join(args.out, "tiny-sd")
    if not os.path.isdir(tiny):
        sys.exit(f"{tiny} is missing: run tools/make_io_fixtures.py first")
    vae = AutoencoderKL.from_pretrained(tiny, subfolder="vae", local_files_only=True).eval()
    assert next(vae.parameters()).dtype == torch.float32
    write_case(out_dir, "tiny-sd", vae, 2, 8, gen, "tests/fixtures/tiny-sd (vae, f32 files)")

    torch.manual_seed(SEED)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 6),
                        layers_per_block=1, norm_num_groups=2, latent_channels=3, sample_size=16,
                        scaling_factor=0.5, use_quant_conv=False, use_post_quant_conv=False,
                        mid_block_add_attention=False)
    randomize_all_(vae, gen)
    vae.eval()
    z, x, image, mean, logvar = write_case(out_dir, "noquant", vae, 1, 8, gen,
                                           "tests/fixtures/vae/noquant (diffusers layout)")
    folder = os.path.join(out_dir, "noquant")
    shutil.rmtree(folder, ignore_errors=True)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    back = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True).eval()
    assert_equal_dicts(f"{folder}/vae from_pretrained", back.state_dict(), vae.state_dict())
    if not (torch.equal(decode(back, z), image) and torch.equal(encode(back, x)[1], logvar)):
        sys.exit(f"FAIL {folder}: reloaded model gives a different output")
    print(f"ok   {folder}/vae reloads and reproduces both outputs bit for bit")

    total = 0
    for root, _, names in sorted(os.walk(out_dir)):
        for n in sorted(names):
            size = os.path.getsize(os.path.join(root, n))
            total += size
            print(f"{size:>9}  {os.path.relpath(os.path.join(root, n), args.out)}")
    print(f"{total:>9}  vae/ total")


if __name__ == "__main__":
    main()
