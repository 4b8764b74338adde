"""Fixtures for hdb's CLIP text encoder (tests/text_encoder.rs); CI never runs this.

Writes tests/fixtures/text_encoder/:
  prompts.safetensors  `input_ids` [2, 77] (i64): the tiny-sd tokenizer on two prompts, padded as
                       StableDiffusionPipeline calls it; `hidden` [2, 77, 16]: transformers'
                       CLIPTextModel (tests/fixtures/tiny-sd/text_encoder, f32) last_hidden_state.
  te-id.lidb.safetensors  a random LiDB identity on the 8 text-encoder projections (r 1, a 3, b 2,
                       tools/lidb.py), and te-id.peft.safetensors, the same exported as a PEFT LoRA.
  te-id.out.safetensors  `hidden` of the text encoder with that identity at scale 1: computed by
                       merging W + dW (dW from tools/lidb.py, f64) into a copy of the model, and
                       checked against diffusers' own LoRA loading (load_lora_weights) when that
                       applies to this transformers version.

Run from the repository root:  /tmp/hdb-ref-venv/bin/python tools/make_text_encoder_fixtures.py
"""

import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lidb  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests/fixtures/tiny-sd")
OUT = os.path.join(ROOT, "tests/fixtures/text_encoder")
PROMPTS = ["a photo of sks person, highly detailed", ""]
SEED, A, B, ALPHA = 1234567890123456789, 3, 2, 0.8


def main():
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(TINY, local_files_only=True)
    tok, te = pipe.tokenizer, pipe.text_encoder.eval()
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids)[0]
    lidb.save_tensors({"input_ids": ids.numpy().astype(np.int64), "hidden": hidden.numpy()},
                      os.path.join(OUT, "prompts.safetensors"))

    # The text-encoder projections: canonical keys use the hub layout `text_model.*`.
    modules = dict(te.named_modules())
    flat = "text_model.encoder.layers.0.self_attn.q_proj" not in modules
    shapes, layers = {}, {}
    rng = np.random.default_rng(7)
    for i in range(te.config.num_hidden_layers):
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"]:
            key = f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}"
            mod = modules[f"{'' if flat else 'text_model.'}encoder.layers.{i}.self_attn.{p}"]
            shapes[key] = (mod.in_features, mod.out_features)
            layers[key] = ((rng.standard_normal((1, A)) * 0.8).astype(np.float32),
                           (rng.standard_normal((B, 1)) * 0.8).astype(np.float32))
    ident = lidb.LidbAdapter(layers, 1, A, B, SEED, ALPHA, "tiny-sd")
    lidb.save_lidb(ident, os.path.join(OUT, "te-id.lidb.safetensors"))
    factors = ident.factors(shapes)
    lidb.save_tensors(lidb.to_peft(factors), os.path.join(OUT, "te-id.peft.safetensors"))

    merged = copy.deepcopy(te)
    mm = dict(merged.named_modules())
    with torch.no_grad():
        for key, (d_train, u_train) in layers.items():
            n_in, n_out = shapes[key]
            d_aux, u_aux = lidb.basis(key, n_in, n_out, A, B, SEED)
            dw = lidb.delta_weight(d_train, u_train, d_aux, u_aux, ALPHA)
            name = key[len("text_encoder."):]
            mod = mm[name[len("text_model."):] if flat else name]
            mod.weight += torch.from_numpy(dw).float()
        want = merged(ids)[0]
    change = (want - hidden).abs().max().item() / hidden.abs().max().item()
    assert change > 0.01, f"the identity barely changes the text embeddings ({change})"
    lidb.save_tensors({"hidden": want.numpy()}, os.path.join(OUT, "te-id.out.safetensors"))
    print(f"ok   te-id: relative change of the embeddings {change:.3f}")

    try:
        pipe.load_lora_weights(lidb.to_peft({k: (torch.from_numpy(d), torch.from_numpy(u))
                                             for k, (d, u) in factors.items()}), adapter_name="te")
        with torch.no_grad():
            got = pipe.text_encoder(ids)[0]
        err = (got - want).abs().max().item() / want.abs().max().item()
        applied = (got - hidden).abs().max().item() > 0
        print(f"{'ok  ' if applied and err < 1e-5 else 'note'} diffusers load_lora_weights on the text "
              f"encoder: applied={applied}, relative difference to the merged reference {err:.2e}")
        if applied and err >= 1e-5:
            sys.exit("diffusers and the merged reference disagree")
    except Exception as e:  # noqa: BLE001 - report, the merged reference stands on its own
        print(f"note diffusers could not load the text-encoder LoRA here: {type(e).__name__}: {e}")
    for f in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, f)):>8}  {f}")


if __name__ == "__main__":
    main()
