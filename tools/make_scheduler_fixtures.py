"""Builds hdb's sampler parity fixtures: diffusers' schedulers built `from_config` of SD 1.x
scheduler configs, their timesteps, sigmas and init_noise_sigma for several step counts, and a
full sampling loop on a deterministic synthetic "model".

Makes (relative to the repository root):
  tests/fixtures/scheduler/configs/<config>.json   the scheduler_config.json of each config
  tests/fixtures/scheduler/cases.json              one entry per case (see below)
  tests/fixtures/scheduler/inputs.safetensors      x0 [1,4,8,8], r [1,4,8,8], noise [1,4,8,8] (f32)
  tests/fixtures/scheduler/<config>.safetensors    per case "<sampler>.<n>.<what>" (f32):
      timesteps [n]          scheduler.timesteps as f32 (what the UNet receives)
      sigmas    [n+1]        scheduler.sigmas (Euler, Euler ancestral, DPM++ only)
      scaled    [n, K]       scale_model_input(x_i, t_i), elements PROBE of each step
      steps     [n, K]       step(...).prev_sample, elements PROBE of each step
      final     [1,4,8,8]    the last step's output, every element

Configs:
  sd15      SD 1.5's scheduler_config.json as published (PNDMScheduler, diffusers 0.6.0; no
            timestep_spacing, so each class uses its own default spacing)
  tiny-sd   tests/fixtures/tiny-sd/scheduler/scheduler_config.json (saved by diffusers 0.42.1:
            "timestep_spacing": "leading" for every class; no "clip_sample", so DDIM clips x0 to
            +-1, its class default)
  trailing  sd15 with "timestep_spacing": "trailing"
  linspace  sd15 with "timestep_spacing": "linspace"
  linear    sd15 with "beta_schedule": "linear", beta 0.0001..0.02

Samplers (diffusers 0.42.1 classes built `Cls.from_config(config)`):
  ddim             DDIMScheduler, step(eta=0)
  euler            EulerDiscreteScheduler
  euler_a          EulerAncestralDiscreteScheduler
  dpmpp_2m         DPMSolverMultistepScheduler (defaults: dpmsolver++, order 2)
  dpmpp_2m_karras  DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)

The loop, as StableDiffusionPipeline runs it (latents [1,4,8,8]):
  x = x0 * init_noise_sigma
  for i, t in enumerate(timesteps):
      s = scale_model_input(x, t)
      eps = s * 0.1 + r * (1 + 0.05 * i)        # the synthetic model, in f32
      x = step(eps, t, x).prev_sample
The Euler ancestral noise: diffusers' randn_tensor is replaced, in that module only, by
roll(noise.flatten(), 37 * k) for the k-th call (k = 0, 1, ...), reshaped; the number of calls
of each case is recorded in cases.json ("noise_calls"). hdb's test feeds the same tensors
through the `noise` callback.

Per-step tensors keep only K = 16 elements (PROBE: flat indices 0, 16, ..., 240: every channel,
four positions) to keep the fixtures small; `final` keeps all 256.

Everything runs in float32 on one CPU thread with fixed seeds: running the tool twice writes
identical bytes. Nothing is downloaded. CI never runs this tool; the fixtures it writes are
committed.

Run from the repository root with the reference venv (../shared/setup-reference-venv.sh):
    /tmp/hdb-ref-venv/bin/python tools/make_scheduler_fixtures.py [--out tests/fixtures/scheduler]
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SD 1.5's scheduler/scheduler_config.json as published with the model.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SHAPE = (1, 4, 8, 8)
NUMEL = 256
PROBE = list(range(0, NUMEL, 16))
ROLL = 37

SAMPLERS = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "euler_a": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
    "dpmpp_2m": lambda c: DPMSolverMultistepScheduler.from_config(c),
    "dpmpp_2m_karras": lambda c: DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True),
}
ALL = list(SAMPLERS)


def configs():
    with open(os.path.join(ROOT, "tests/fixtures/tiny-sd/scheduler/scheduler_config.json")) as f:
        tiny = json.load(f)
    return [
        # (name, config, samplers, step counts)
        ("sd15", SD15, ALL, [1, 2, 7, 10, 13, 25, 50]),
        ("tiny-sd", tiny, ALL, [1, 2, 7, 25]),
        ("trailing", dict(SD15, timestep_spacing="trailing"), ALL, [7, 25]),
        ("linspace", dict(SD15, timestep_spacing="linspace"), ["ddim"], [7, 25]),
        ("linear", dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02), ["ddim", "euler", "dpmpp_2m_karras"], [10]),
    ]


class NoiseLog:
    """Stands in for randn_tensor in the Euler ancestral module: deterministic, logged."""

    def __init__(self, base):
        self.base = base.flatten()
        self.calls = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE, shape
        out = torch.roll(self.base, ROLL * self.calls).reshape(SHAPE).to(dtype or torch.float32)
        self.calls += 1
        return out


def run_case(sampler, cfg, n, x0, r, noise):
    sched = SAMPLERS[sampler](cfg)
    sched.set_timesteps(n)
    log = NoiseLog(noise)
    euler_a_module.randn_tensor = log
    init = sched.init_noise_sigma
    x = x0 * init
    scaled, steps = [], []
    for i, t in enumerate(sched.timesteps):
        s = sched.scale_model_input(x, t)
        eps = s * 0.1 + r * (1 + 0.05 * i)
        kwargs = {"eta": 0.0} if sampler == "ddim" else {}
        x = sched.step(eps, t, x, **kwargs).prev_sample
        assert x.dtype == torch.float32
        scaled.append(s.flatten()[PROBE])
        steps.append(x.flatten()[PROBE])
    tensors = {
        "timesteps": sched.timesteps.to(torch.float32),
        "scaled": torch.stack(scaled),
        "steps": torch.stack(steps),
        "final": x.clone(),
    }
    if sampler != "ddim":
        tensors["sigmas"] = sched.sigmas.to(torch.float32)
    meta = {
        "sampler": sampler,
        "steps": n,
        "timesteps_len": len(sched.timesteps),
        "init_noise_sigma": float(init),
        "timestep_spacing": sched.config.timestep_spacing,
        "noise_calls": log.calls,
    }
    return tensors, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/scheduler"))
    args = ap.parse_args()
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(20240607)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    r = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    os.makedirs(os.path.join(args.out, "configs"), exist_ok=True)
    save_file({"x0": x0, "r": r, "noise": noise}, os.path.join(args.out, "inputs.safetensors"))
    cases = []
    for name, cfg, samplers, counts in configs():
        with open(os.path.join(args.out, "configs", f"{name}.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        out = {}
        for sampler in samplers:
            for n in counts:
                tensors, meta = run_case(sampler, cfg, n, x0, r, noise)
                for k, v in tensors.items():
                    out[f"{sampler}.{n}.{k}"] = v.contiguous()
                cases.append(dict(meta, config=name))
                print(f"{name:9s} {sampler:16s} n={n:3d} spacing={meta['timestep_spacing']:9s} "
                      f"init_noise_sigma={meta['init_noise_sigma']:.6f} t={tensors['timesteps'][:4].tolist()}...")
        save_file(out, os.path.join(args.out, f"{name}.safetensors"))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump({"probe": PROBE, "roll": ROLL, "cases": cases}, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(args.out) for fn in fns)
    print(f"{len(cases)} cases, {total} bytes under {args.out}")


if __name__ == "__main__":
    main()
