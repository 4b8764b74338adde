"""The PyTorch peer for `hdb bench cuda`, run on the same GPU in the same session.

Times, with CUDA events (median of --runs after --warmup):
- F.scaled_dot_product_attention at each --attn shape, fp16 and bf16, q/k/v [B, H, L, D]
  contiguous (PyTorch's own best layout; it picks flash / memory-efficient / cuDNN itself);
- its backward at each --attn-backward shape (b,h,lq,lk,d,causal), fp16 and bf16, q/k/v with
  requires_grad: the backward alone (torch.autograd.grad of a retained graph, so the forward's
  saved log-sum-exp is reused) as "bwd_ms", and forward + backward as "fwd_bwd_ms";
- F.conv2d (cuDNN, fp16, NCHW contiguous, with bias; torch.backends.cudnn.benchmark on, so the
  warm-up runs pick cuDNN's fastest algorithm) at each --conv shape (f32 on --device cpu);
- a device-to-device copy of --copy-bytes bytes (torch's Tensor.copy_);
- with --vae: diffusers' AutoencoderKL with SD 1.5's config, fp16, decoding one 64x64 latent
  (a 512x512 image);
- with --unet: diffusers' UNet2DConditionModel with SD 1.5's config (tools/bench_torch_unet.py),
  randomly initialised, fp16, eval, no_grad, default attention processor (SDPA), batch 2,
  64x64 latents, 77 tokens: PyTorch eager, the issue's peer;
- with --generate SIZE,STEPS: diffusers' StableDiffusionPipeline with SD 1.5's configs and random
  weights, fp16, one SIZExSIZE image in STEPS Euler ancestral steps with guidance 7.5, wall time
  of the whole call (see `generate`).

Prints one JSON line on stdout:
  {"peer": "pytorch", "torch": ..., "device": ..., "attention": [{"b","h","lq","lk","d","dtype",
   "ms"}...], "attention_backward": [{"b","h","lq","lk","d","causal","dtype","bwd_ms",
   "fwd_bwd_ms"}...], "conv": [{"b","c_in","c_out","h","w","k","stride","pad","dtype","ms"}...],
   "copy": {"bytes", "ms"}, "unet": {"ms", "min_ms", "max_ms", "runs", "diffusers",
   "attn_processor"} | null, "generate": {"ms", "min_ms", "max_ms", "runs", "size", "steps",
   ...} | null}
Eager diffusers is bound by Python launching ~1000 kernels a step, so its time follows the
host CPU: two runs on H100 machines of this workplace gave 24.7 and 49.9 ms (median).

Run on the GPU machine (scripts/gpu-check.sh does):
    python3 tools/bench_torch_cuda.py --attn 2,8,4096,4096,40 --copy-bytes 187000000 --unet
A CPU smoke test of the argument handling: --device cpu --runs 1 --attn 1,1,16,16,8
--attn-backward 1,2,16,16,8,1 --conv 1,4,8,9,9,3,1,1.
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# SD 1.5's VAE (AutoencoderKL) and text encoder (CLIP ViT-L/14's text tower) configs.
SD15_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def timed(fn, warmup, runs, device, spread=None):
    for _ in range(warmup):
        fn()
    if device == "cpu":
        import time

        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    # Events around each call, the calls queued back to back and waited for once: a call's
    # time is the device's, not the launch latency on an idle device (hdb's gpu_ms in
    # src/bin/hdb/bench_cuda.rs times the same way).
    torch.cuda.synchronize()
    events = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize()
    ts = [a.elapsed_time(b) for a, b in events]
    if spread is not None:
        spread.update(min_ms=min(ts), max_ms=max(ts), runs=len(ts))
    return statistics.median(ts)


def attention_backward(b, h, lq, lk, d, causal, name, dt, g, args, dev):
    """SDPA's backward alone and with its forward, at one shape (grad mode on: the caller is
    under no_grad)."""
    with torch.enable_grad():
        q, k, v = (
            torch.randn(b, h, n, d, device=dev, dtype=dt, generator=g).requires_grad_()
            for n in (lq, lk, lk)
        )
        do = torch.randn(b, h, lq, d, device=dev, dtype=dt, generator=g)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        # Fresh gradients each call (no accumulation into .grad), the graph kept for the next.
        bwd = timed(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), args.warmup, args.runs, dev)

        def step():
            o2 = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return torch.autograd.grad(o2, (q, k, v), do)

        fwd_bwd = timed(step, args.warmup, args.runs, dev)
    return dict(b=b, h=h, lq=lq, lk=lk, d=d, causal=causal, dtype=name, bwd_ms=bwd, fwd_bwd_ms=fwd_bwd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attn", action="append", default=[], help="b,h,lq,lk,d (repeatable)")
    ap.add_argument(
        "--attn-backward", action="append", default=[], help="b,h,lq,lk,d,causal (0/1): SDPA backward (repeatable)"
    )
    ap.add_argument(
        "--conv", action="append", default=[], help="b,c_in,c_out,h,w,k,stride,pad (repeatable)"
    )
    ap.add_argument("--linear", action="append", default=[], help="m,k,n: F.linear in f32 (repeatable)")
    ap.add_argument("--dtypes", default="f16,bf16")
    ap.add_argument("--copy-bytes", type=int, default=0)
    ap.add_argument("--unet", action="store_true")
    ap.add_argument("--vae", action="store_true", help="SD 1.5 AutoencoderKL decode, 1 x 64x64 latents, fp16")
    ap.add_argument(
        "--text-encoder", action="store_true", help="SD 1.5 CLIP text encoder (transformers), 2 x 77 tokens, fp16"
    )
    ap.add_argument(
        "--generate",
        default=None,
        metavar="SIZE,STEPS",
        help="diffusers' StableDiffusionPipeline with SD 1.5's configs: one SIZExSIZE image, STEPS steps",
    )
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = args.device
    dtypes = {"f16": torch.float16, "bf16": torch.bfloat16}
    out = {
        "peer": "pytorch",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "attention": [],
        "attention_backward": [],
        "conv": [],
        "linear": [],
        # Whether PyTorch's f32 matmuls may use TF32 (hdb's f32 GEMMs never do).
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "copy": None,
        "unet": None,
        "vae": None,
        "text_encoder": None,
        "generate": None,
    }
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for spec in args.attn:
            b, h, lq, lk, d = (int(v) for v in spec.split(","))
            for name in args.dtypes.split(","):
                dt = dtypes[name]
                q = torch.randn(b, h, lq, d, device=dev, dtype=dt, generator=g)
                k = torch.randn(b, h, lk, d, device=dev, dtype=dt, generator=g)
                v = torch.randn(b, h, lk, d, device=dev, dtype=dt, generator=g)
                ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.warmup, args.runs, dev)
                out["attention"].append(dict(b=b, h=h, lq=lq, lk=lk, d=d, dtype=name, ms=ms))
        for spec in args.attn_backward:
            b, h, lq, lk, d, causal = (int(v) for v in spec.split(","))
            for name in args.dtypes.split(","):
                out["attention_backward"].append(
                    attention_backward(b, h, lq, lk, d, bool(causal), name, dtypes[name], g, args, dev)
                )
        if args.conv and dev == "cuda":
            torch.backends.cudnn.benchmark = True
        for spec in args.conv:
            b, c_in, c_out, h, w, k, stride, pad = (int(v) for v in spec.split(","))
            name, dt = ("f16", torch.float16) if dev == "cuda" else ("f32", torch.float32)
            x = torch.randn(b, c_in, h, w, device=dev, dtype=dt, generator=g)
            wt = torch.randn(c_out, c_in, k, k, device=dev, dtype=dt, generator=g) * 0.02
            bias = torch.randn(c_out, device=dev, dtype=dt, generator=g) * 0.1
            ms = timed(
                lambda: F.conv2d(x, wt, bias, stride=stride, padding=pad),
                args.warmup,
                args.runs,
                dev,
            )
            out["conv"].append(
                dict(b=b, c_in=c_in, c_out=c_out, h=h, w=w, k=k, stride=stride, pad=pad, dtype=name, ms=ms)
            )
        for spec in args.linear:
            m, k, n = (int(v) for v in spec.split(","))
            x = torch.randn(m, k, device=dev, generator=g)
            w = torch.randn(n, k, device=dev, generator=g) * 0.02
            bias = torch.randn(n, device=dev, generator=g) * 0.1
            ms = timed(lambda: F.linear(x, w, bias), args.warmup, args.runs, dev)
            out["linear"].append(dict(m=m, k=k, n=n, dtype="f32", ms=ms))
        if args.copy_bytes > 0:
            n = args.copy_bytes // 2
            src = torch.randn(n, device=dev, dtype=torch.float16, generator=g)
            dst = torch.empty_like(src)
            ms = timed(lambda: dst.copy_(src), args.warmup, args.runs, dev)
            out["copy"] = dict(bytes=n * 2, ms=ms)
        if args.unet:
            import diffusers
            from diffusers import UNet2DConditionModel

            from bench_torch_unet import SD15_UNET

            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SD15_UNET).to(dev, torch.float16).eval()
            procs = sorted({type(p).__name__ for p in unet.attn_processors.values()})
            sample = torch.randn(2, 4, 64, 64, device=dev, dtype=torch.float16, generator=g)
            ctx = torch.randn(2, 77, 768, device=dev, dtype=torch.float16, generator=g)
            t = torch.full((2,), 981.0, device=dev)
            spread = {}
            ms = timed(
                lambda: unet(sample, t, encoder_hidden_states=ctx).sample,
                max(3, args.warmup),
                max(10, args.runs),
                dev,
                spread,
            )
            out["unet"] = dict(ms=ms, diffusers=diffusers.__version__, attn_processor=",".join(procs), **spread)
        if args.vae:
            from diffusers import AutoencoderKL

            torch.manual_seed(0)
            vae = AutoencoderKL(**SD15_VAE).to(dev, torch.float16).eval()
            z = torch.randn(1, 4, 64, 64, device=dev, dtype=torch.float16, generator=g)
            spread = {}
            ms = timed(lambda: vae.decode(z).sample, max(2, args.warmup), max(5, args.runs), dev, spread)
            out["vae"] = dict(ms=ms, **spread)
        if args.text_encoder:
            try:
                import transformers
                from transformers import CLIPTextConfig, CLIPTextModel
            except ImportError as e:
                out["text_encoder"] = dict(error=f"transformers not importable: {e}")
            else:
                torch.manual_seed(0)
                cfg = CLIPTextConfig(**SD15_TEXT)
                te = CLIPTextModel(cfg).to(dev, torch.float16).eval()
                ids = torch.randint(0, 49408, (2, 77), device=dev, generator=g)
                spread = {}
                ms = timed(lambda: te(input_ids=ids).last_hidden_state, args.warmup, args.runs, dev, spread)
                out["text_encoder"] = dict(
                    ms=ms, transformers=transformers.__version__, attn=cfg._attn_implementation, **spread
                )
        if args.generate:
            size, steps = (int(v) for v in args.generate.split(","))
            out["generate"] = generate(size, steps, dev, args.runs)
    print(json.dumps(out))


def generate(size, steps, dev, runs):
    """diffusers' StableDiffusionPipeline as an application runs it: SD 1.5's CLIP text encoder,
    UNet and VAE with random weights (fp16 on cuda, f32 on cpu), the Euler ancestral sampler
    with SD 1.5's scheduler config (hdb's default sampler), guidance 7.5, one image, pixels
    back on the host (output_type="np"). The prompts go in as token ids (no tokenizer files
    here): the timed call runs the text encoder on them, then the pipeline from the two
    embeddings, so it times the same work as `hdb generate` (tokenizing is microseconds). Wall
    time of the whole call (its result is on the host), median of `runs` after one warm-up."""
    import time

    import diffusers
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench_torch_unet import SD15_UNET

    dt = torch.float16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).to(dev, dt).eval()
    unet = UNet2DConditionModel(**SD15_UNET).to(dev, dt).eval()
    vae = AutoencoderKL(**SD15_VAE).to(dev, dt).eval()
    # SD 1.5's scheduler_config.json, as hdb's SchedulerConfig::default.
    sched = EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ids = torch.randint(0, 49408, (2, 77), device=dev)

    def run():
        emb = te(input_ids=ids).last_hidden_state
        return pipe(prompt_embeds=emb[1:], negative_prompt_embeds=emb[:1], num_inference_steps=steps,
                    guidance_scale=7.5, height=size, width=size, output_type="np",
                    generator=torch.Generator(dev).manual_seed(0)).images

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(max(3, runs // 4) + 1):
            sync()
            t0 = time.perf_counter()
            images = run()
            sync()
            if i > 0:
                times.append((time.perf_counter() - t0) * 1e3)
    return dict(ms=statistics.median(times), min_ms=min(times), max_ms=max(times), runs=len(times),
                size=size, steps=steps, shape=list(images.shape), finite=bool(np.isfinite(images).all()),
                diffusers=diffusers.__version__, scheduler=type(pipe.scheduler).__name__)


if __name__ == "__main__":
    main()
