"""The PyTorch peer for `hdb bench finetune`: times one rank-relaxed finetuning step at SD 1.5
shapes with the recipe hdb runs: diffusers' UNet2DConditionModel and transformers'
CLIPTextModel (SD 1.5's configs, randomly initialised, f32, CPU), peft LoRA of rank 4
(lora_alpha 4) on the UNet's attention projections (to_q, to_k, to_v, to_out.0) and the text
encoder's (q_proj, k_proj, v_proj, out_proj); per step a DDPM-noised latent [1, 4, S, S] at a
random timestep, the MSE against the noise, backward, clip_grad_norm_(1.0), AdamW(1e-4).
UNet gradient checkpointing as hdb (on by default; --no-checkpointing turns both off).

The VAE encoding of the face happens once before the steps in both, so it is not timed.
Prints one JSON line: {"peer": "pytorch-eager", "torch": ..., "diffusers": ..., "peft": ...,
"threads": N, "latent": S, "checkpointing": bool, "median_s": ..., "runs_s": [...],
"warmup_s": ..., "total_s": (warm-up step and runs together), "peak_mb": ..., "peak_kind": ...}
(CPU: the process's own peak RSS, VmHWM, weights included; CUDA: the caching
allocator's peak reservation). --device cuda keeps the frozen weights in fp16 and the LoRA
parameters in f32, as hdb does.

    /tmp/hdb-ref-venv/bin/python tools/bench_torch_finetune.py --threads 2 --runs 3 --size 64
"""

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_torch_unet import SD15_UNET, peak_rss_mb  # noqa: E402

SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="latent height = width (64 = 512x512)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import diffusers
    import peft
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**SD15_UNET)
    te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    for p in list(unet.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    te = get_peft_model(te, LoraConfig(r=args.rank, lora_alpha=args.rank,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    checkpointing = not args.no_checkpointing
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    te.train()
    dev = torch.device(args.device)
    if args.device == "cuda":
        # fp16 frozen weights and f32 LoRA parameters, as hdb runs on a GPU.
        for m in (unet, te):
            for n, p in m.named_parameters():
                p.data = p.data.to(dev, torch.float32 if p.requires_grad else torch.float16)
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    s = args.size
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    latents = (torch.randn(1, 4, s, s) * 0.18215).to(dev, dtype)
    ids = torch.randint(0, 49408, (1, 77)).to(dev)
    times = []
    warmup = 0.0
    for i in range(args.runs + 1):
        t0 = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,)).to(dev)
        noisy = sched.add_noise(latents, noise, t)
        ctx = te(ids).last_hidden_state
        pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"{'warm-up' if i == 0 else 'run'} {dt:.3f} s, loss {loss.item():.4f}", file=sys.stderr)
        if i > 0:
            times.append(dt)
        else:
            warmup = dt
    print(json.dumps({
        "peer": "pytorch-eager", "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "diffusers": diffusers.__version__,
        "peft": peft.__version__, "threads": args.threads, "latent": s, "checkpointing": checkpointing,
        "median_s": statistics.median(times) if times else None, "runs_s": times,
        "warmup_s": warmup, "total_s": warmup + sum(times),
        "peak_mb": (torch.cuda.max_memory_reserved() / 2**20 if args.device == "cuda"
                    else peak_rss_mb()),
        "peak_kind": "device memory reserved" if args.device == "cuda" else "RSS",
    }))


if __name__ == "__main__":
    main()
