"""The PyTorch eager peer for `hdb bench pipeline`: SD 1.5's components with random weights
(transformers CLIPTextModel with CLIP ViT-L/14's text config, diffusers UNet2DConditionModel and
AutoencoderKL with SD 1.5's configs), f32, CPU, eval, no_grad, in one process:
  text encoder: 2 prompts of 77 tokens (one CFG pair);
  UNet step: batch 2 (CFG) at 64x64 latents with 77x768 context;
  VAE decode: [1, 4, 64, 64] -> 512x512.
Prints one JSON line: {"peer": "pytorch-eager", "torch", "threads", "text_encoder_s", "unet_step_s",
"vae_decode_s"} (medians of --runs after one warm-up). CI never runs this.

  /tmp/hdb-ref-venv/bin/python tools/bench_torch_pipeline.py --threads 2 --runs 2
"""

import argparse
import json
import statistics
import time

import torch


def timed(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, hidden_act="quick_gelu")).eval()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=512).eval()
    ids = torch.randint(0, 49408, (2, 77))
    sample, ctx, t = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768), torch.tensor([500.0, 500.0])
    z = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        out = {
            "peer": "pytorch-eager",
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": args.threads,
            "text_encoder_s": timed(lambda: te(ids), args.runs),
            "unet_step_s": timed(lambda: unet(sample, t, encoder_hidden_states=ctx), args.runs),
            "vae_decode_s": timed(lambda: vae.decode(z), args.runs),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
