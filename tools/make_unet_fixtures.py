"""Builds hdb's UNet numerics fixtures: inputs and diffusers' float32 CPU output for five small
UNet2DConditionModel shapes, each chosen to cover one structural variant a Stable Diffusion 1.x/2.x
UNet reader must handle.

Makes (relative to the repository root):
  tests/fixtures/unet/<case>.in.safetensors   sample [B,4,H,W] f32, timestep [B] f32,
                                              encoder_hidden_states [B,77,C] f32
  tests/fixtures/unet/<case>.out.safetensors  out [B,4,H,W] f32 =
                                              UNet2DConditionModel(sample, timestep, ehs).sample
  tests/fixtures/unet/sd2-linear/unet/        diffusers layout (config.json + diffusion_pytorch_model.safetensors)
  tests/fixtures/unet/lpb1/unet/              diffusers layout
  tests/fixtures/unet/ldm-sd1.safetensors     LDM single file, UNet keys (model.diffusion_model.*) only, f16

Cases (B=2, timesteps [981, 1], inputs ~ N(0,1)):
  tiny-sd       the UNet of tests/fixtures/tiny-sd (made by tools/make_io_fixtures.py), f32 files, 16x16
  tiny-sd-fp16  same inputs; the reference runs in f32 on the fp16 variant's weights upcast. (make_io_fixtures
                rounds the model through f16 before writing the f32 files, so today both files hold the
                same values and both cases have the same output; this case checks the f16 load path.)
  sd2-linear    SD 2 style: use_linear_projection, per-block heads list ("attention_head_dim" [4, 2, 6],
                i.e. head dims 2, 4 and 2 in the mid block), 3 blocks (8, 8, 12), groups 4, cross dim 24,
                layers_per_block 2, 16x16
  lpb1          layers_per_block 1, transformer_layers_per_block 2, conv projections, (4, 8, 12),
                groups 2, 2 heads, cross dim 20, 16x16
  ldm-sd1       what an LDM single file with SD 1.x defaults implies: groups 32, 8 heads, conv
                projections, (32, 32), layers_per_block 1, cross dim 32, 8x8; stored only as an LDM
                file in f16, the reference runs in f32 on the f16-rounded weights. (32, 64) would add
                a channel change but weighs 1.6 MB in f16; the other cases cover channel changes.
                The LDM names come from make_io_fixtures.unet_ldm_name; diffusers'
                convert_ldm_unet_checkpoint must give the state dict back bit for bit, or the tool fails.

Every parameter of the new models gets seeded noise (norm weights away from 1, biases away from 0),
so a dropped bias or norm affine shows in the output. Everything runs on one CPU thread with fixed
seeds: running the tool twice writes identical bytes. Nothing is downloaded. CI never runs this
tool; the fixtures it writes are committed.

Run from the repository root with the reference venv (../shared/setup-reference-venv.sh), after
tools/make_io_fixtures.py has made tests/fixtures/tiny-sd:
    /tmp/hdb-ref-venv/bin/python tools/make_unet_fixtures.py [--out tests/fixtures]
"""

import argparse
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_io_fixtures import assert_equal_dicts, unet_ldm_name  # noqa: E402  (the verified key table)
from make_op_fixtures import save_sorted  # noqa: E402  (deterministic header order)

SEED = 20240612
TIMESTEPS = [981.0, 1.0]
BATCH = 2
CTX_LEN = 77


def randomize_all_(model, gen):
    """Noise on every parameter: constant tensors (norm weights 1, zero biases) get N(0, 0.2^2)
    added; the others get noise at half their own spread, so output magnitudes stay sane."""
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.2 * noise)
            else:
                p.add_(0.5 * p.std() * noise)


def new_unet(gen, **kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    base = dict(in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
                norm_eps=1e-5, downsample_padding=1, mid_block_scale_factor=1)
    base.update(kw)
    unet = UNet2DConditionModel(**base)
    randomize_all_(unet, gen)
    return unet.eval()


def make_inputs(gen, hw, ctx_dim):
    return {
        "sample": torch.randn((BATCH, 4, hw, hw), generator=gen),
        "timestep": torch.tensor(TIMESTEPS, dtype=torch.float32),
        "encoder_hidden_states": torch.randn((BATCH, CTX_LEN, ctx_dim), generator=gen),
    }


@torch.no_grad()
def run(unet, inp):
    return unet(inp["sample"], inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"]).sample


def describe(unet):
    c = unet.config
    heads = c.num_attention_heads or c.attention_head_dim
    return (f"block_out_channels={tuple(c.block_out_channels)} heads={heads} groups={c.norm_num_groups} "
            f"layers_per_block={c.layers_per_block} transformer_layers_per_block={c.transformer_layers_per_block} "
            f"linear_proj={c.use_linear_projection} cross_dim={c.cross_attention_dim} "
            f"down={list(c.down_block_types)} up={list(c.up_block_types)}")


def write_case(out_dir, case, unet, inp, note):
    out = run(unet, inp)
    again = run(unet, inp)
    if not torch.equal(out, again):
        sys.exit(f"FAIL {case}: two runs differ")
    if not bool(torch.isfinite(out).all()):
        sys.exit(f"FAIL {case}: non-finite output")
    meta = {"case": case, "generator": f"tools/make_unet_fixtures.py torch {torch.__version__}", "model": note}
    save_sorted(inp, os.path.join(out_dir, f"{case}.in.safetensors"), metadata=meta)
    save_sorted({"out": out}, os.path.join(out_dir, f"{case}.out.safetensors"), metadata=meta)
    back = load_file(os.path.join(out_dir, f"{case}.out.safetensors"))["out"]
    assert torch.equal(back, out)
    hw = inp["sample"].shape[-1]
    print(f"ok   {case}: {describe(unet)} H=W={hw}")
    print(f"     max|out|={out.abs().max().item():.4f} mean|out|={out.abs().mean().item():.4f} "
          f"max|sample|={inp['sample'].abs().max().item():.4f}; two runs identical")
    return out


def save_diffusers(unet, folder, inp, want):
    """Write the diffusers layout, read it back with from_pretrained, and check it reproduces `want`."""
    from diffusers import UNet2DConditionModel

    shutil.rmtree(folder, ignore_errors=True)
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    back = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True).eval()
    assert_equal_dicts(f"{folder}/unet from_pretrained", back.state_dict(), unet.state_dict())
    if not torch.equal(run(back, inp), want):
        sys.exit(f"FAIL {folder}: reloaded model gives a different output")
    print(f"ok   {folder}/unet reloads and reproduces the output bit for bit")


def ldm_sd1_case(gen, out_dir):
    from diffusers.loaders import single_file_utils as sfu

    lpb = 1
    unet = new_unet(gen, sample_size=8, block_out_channels=(32, 32), layers_per_block=lpb,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    norm_num_groups=32, attention_head_dim=8, cross_attention_dim=32,
                    use_linear_projection=False)
    with torch.no_grad():  # the reference runs on exactly the weights the f16 file holds
        for p in unet.parameters():
            p.copy_(p.half().float())
    sd16 = {k: v.half() for k, v in unet.state_dict().items()}
    ldm = {"model.diffusion_model." + unet_ldm_name(k, lpb, up_blocks_without_attn=(0,)): v.contiguous()
           for k, v in sd16.items()}
    assert len(ldm) == len(sd16), "two diffusers keys got the same LDM name"
    path = os.path.join(out_dir, "ldm-sd1.safetensors")
    save_file(dict(sorted(ldm.items())), path, metadata={"format": "pt"})
    back = load_file(path)
    assert all(v.dtype == torch.float16 for v in back.values())
    assert_equal_dicts("ldm-sd1 convert_ldm_unet_checkpoint", sfu.convert_ldm_unet_checkpoint(dict(back), unet.config),
                       sd16)
    print(f"     ldm-sd1.safetensors: {len(back)} keys, all model.diffusion_model.*, f16; "
          f"infer_diffusers_model_type={sfu.infer_diffusers_model_type(back)!r}")
    return unet


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out_dir = os.path.join(args.out, "unet")
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)

    tiny = os.path.join(args.out, "tiny-sd")
    if not os.path.isdir(tiny):
        sys.exit(f"{tiny} is missing: run tools/make_io_fixtures.py first")
    # a, b: the tiny SD 1.5-shaped pipeline's UNet, f32 and fp16 variant, same inputs.
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet", local_files_only=True).eval()
    assert next(unet.parameters()).dtype == torch.float32
    inp = make_inputs(gen, 16, unet.config.cross_attention_dim)
    write_case(out_dir, "tiny-sd", unet, inp, "tests/fixtures/tiny-sd (unet, f32 files)")
    unet16 = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet", variant="fp16", torch_dtype=torch.float16,
                                                  local_files_only=True)
    assert next(unet16.parameters()).dtype == torch.float16
    unet16 = unet16.float().eval()
    write_case(out_dir, "tiny-sd-fp16", unet16, inp, "tests/fixtures/tiny-sd (unet, fp16 variant, run in f32)")

    # c: SD 2 style.
    unet = new_unet(gen, sample_size=16, block_out_channels=(8, 8, 12), layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    norm_num_groups=4, attention_head_dim=[4, 2, 6], cross_attention_dim=24,
                    use_linear_projection=True)
    inp = make_inputs(gen, 16, 24)
    out = write_case(out_dir, "sd2-linear", unet, inp, "tests/fixtures/unet/sd2-linear (diffusers layout)")
    save_diffusers(unet, os.path.join(out_dir, "sd2-linear"), inp, out)

    # d: one resnet per level, two transformer blocks per attention.
    unet = new_unet(gen, sample_size=16, block_out_channels=(4, 8, 12), layers_per_block=1,
                    transformer_layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    norm_num_groups=2, attention_head_dim=2, cross_attention_dim=20,
                    use_linear_projection=False)
    n_tb = {len(m.transformer_blocks) for n, m in unet.named_modules() if n.endswith("attentions.0")}
    assert n_tb == {2}, f"transformer_layers_per_block=2 not honoured: {n_tb}"
    inp = make_inputs(gen, 16, 20)
    out = write_case(out_dir, "lpb1", unet, inp, "tests/fixtures/unet/lpb1 (diffusers layout)")
    save_diffusers(unet, os.path.join(out_dir, "lpb1"), inp, out)

    # e: LDM single file with SD 1.x defaults.
    unet = ldm_sd1_case(gen, out_dir)
    inp = make_inputs(gen, 8, 32)
    write_case(out_dir, "ldm-sd1", unet, inp, "tests/fixtures/unet/ldm-sd1.safetensors (LDM, f16, run in f32)")

    total = 0
    for root, _, names in sorted(os.walk(out_dir)):
        for n in sorted(names):
            p = os.path.join(root, n)
            total += os.path.getsize(p)
            print(f"{os.path.getsize(p):>9}  {os.path.relpath(p, args.out)}")
    print(f"{total:>9}  unet/ total")


if __name__ == "__main__":
    main()
