"""The PyTorch eager peer for `hdb bench unet`: times one Stable Diffusion 1.5 UNet forward
(diffusers UNet2DConditionModel, SD 1.5's config, randomly initialised, f32, CPU, eval, no_grad,
default attention processor, i.e. AttnProcessor2_0 = F.scaled_dot_product_attention).

Input: batch 2 (one classifier-free-guidance step), sample [2,4,S,S], encoder_hidden_states [2,77,768],
timestep [2]. Writes nothing; prints the attention processor on stderr and one JSON line on stdout:
  {"peer": "pytorch-eager", "torch": ..., "diffusers": ..., "threads": N, "batch": 2, "latent": S,
   "median_s": ..., "runs_s": [...], "peak_rss_mb": ..., "attn_processor": ...}
peak_rss_mb is the process's own peak RSS (VmHWM; model build included: ~3.4 GB of f32 weights at full size).

Nothing is downloaded (the config is written out below; weights are diffusers' default init, which
times the same as trained weights). CI never runs this tool. Full size (S=64) takes ~10 s a run
and ~4 GB of memory; a quick check is --size 16 --runs 1.

Run from the repository root with the reference venv (../shared/setup-reference-venv.sh):
    /tmp/hdb-ref-venv/bin/python tools/bench_torch_unet.py --threads 2 --warmup 1 --runs 3 --size 64
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch

# runwayml/stable-diffusion-v1-5 unet/config.json, less the defaults.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    center_input_sample=False,
    use_linear_projection=False,
)
BATCH = 2



def peak_rss_mb():
    """This process's own peak RSS in MB: VmHWM on Linux (the address space's high-water mark,
    fresh at exec), not ru_maxrss, which Linux carries over from the parent across fork and
    exec (spawned by hdb's benchmark, ru_maxrss would report hdb's own peak when larger)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="latent height = width")
    ap.add_argument("--batch", type=int, default=BATCH, help="2 = one classifier-free-guidance step")
    args = ap.parse_args()
    if args.runs < 1 or args.warmup < 0 or args.threads < 1 or args.size % 8:
        sys.exit("need --runs >= 1, --warmup >= 0, --threads >= 1, --size a multiple of 8")

    import diffusers
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    assert next(unet.parameters()).dtype == torch.float32
    procs = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    print(f"attention processor: {', '.join(procs)} ({len(unet.attn_processors)} attention layers, "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters)", file=sys.stderr)

    g = torch.Generator().manual_seed(0)
    sample = torch.randn((args.batch, 4, args.size, args.size), generator=g)
    context = torch.randn((args.batch, 77, SD15_UNET["cross_attention_dim"]), generator=g)
    timestep = torch.full((args.batch,), 981.0)

    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.runs):
            t0 = time.perf_counter()
            out = unet(sample, timestep, encoder_hidden_states=context).sample
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
    assert out.shape == sample.shape and bool(torch.isfinite(out).all())

    rss_mb = peak_rss_mb()
    print(json.dumps({
        "peer": "pytorch-eager",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "diffusers": diffusers.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "latent": args.size,
        "median_s": round(statistics.median(times), 4),
        "runs_s": [round(t, 4) for t in times],
        "peak_rss_mb": round(rss_mb, 1),
        "attn_processor": procs[0] if len(procs) == 1 else procs,
    }))


if __name__ == "__main__":
    main()
