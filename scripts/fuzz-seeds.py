#!/usr/bin/env python3
"""Seed corpora for the fuzz targets (fuzz/harness.rs), made from tests/fixtures: one folder
per target under the output folder (default target/fuzz-seeds). Files a target reads as they
are (safetensors, adapters, PNGs, configs) are copied; multi-file inputs (a model folder, a
tokenizer folder) are encoded as the harness's records, [name: u8][len: u32 LE][bytes]...;
LDM key lists are the tensor names of the LDM fixtures, one per line. A few small valid PNGs
are made here (no PNG fixture exists). Standard library only; deterministic.

    python3 scripts/fuzz-seeds.py [OUT]
"""

import glob
import json
import os
import shutil
import struct
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")

# Must match FOLDER_FILES and TOKENIZER_FILES in fuzz/harness.rs.
FOLDER_FILES = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/shard-1.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
]
TOKENIZER_FILES = [
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "prompt",
]


def rec(name_index, data):
    return bytes([name_index]) + struct.pack("<I", len(data)) + data


def read(path):
    with open(path, "rb") as f:
        return f.read()


def st_names(path):
    b = read(path)
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8 : 8 + n])
    return [k for k in h if k != "__metadata__"], h.get("__metadata__", {})


def st_subset(path, prefixes):
    """The safetensors file at `path` with only the tensors whose names start with one of
    `prefixes` (offsets renumbered, metadata dropped)."""
    b = read(path)
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8 : 8 + n])
    body, out, off = b[8 + n :], {}, 0
    parts = []
    for k in sorted(h):
        if k == "__metadata__" or not k.startswith(prefixes):
            continue
        s, e = h[k]["data_offsets"]
        parts.append(body[s:e])
        out[k] = {"dtype": h[k]["dtype"], "shape": h[k]["shape"], "data_offsets": [off, off + e - s]}
        off += e - s
    head = json.dumps(out, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(parts)


def png(w, h, color, depth, rows):
    """A PNG of `rows` (already filtered scanlines)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
    if color == 3:
        out += chunk(b"PLTE", bytes(range(48)))
    return out + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "fuzz-seeds")
    shutil.rmtree(out, ignore_errors=True)
    seeds = {}

    def add(target, name, data):
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        seeds[target] = seeds.get(target, 0) + 1

    def copy(target, pattern):
        for p in sorted(glob.glob(os.path.join(FIX, pattern))):
            add(target, os.path.basename(p), read(p))

    copy("safetensors", "adapter/id1*.safetensors")
    copy("safetensors", "hostile/*.safetensors")
    copy("safetensors", "unet/*.in.safetensors")
    copy("safetensors", "text_encoder/*.safetensors")
    copy("lidb", "adapter/*.lidb.safetensors")
    copy("lidb", "text_encoder/te-id.lidb.safetensors")
    copy("lora", "adapter/*.kohya.safetensors")
    copy("lora", "adapter/*.peft.safetensors")
    copy("lora", "text_encoder/te-id.peft.safetensors")
    copy("lora", "hostile/lora-*.safetensors")
    # LyCORIS layouts (LoHa, LoKr, Tucker cores, dora_scale): two layers of each fixture (a 3x3
    # convolution and an attention projection), small enough for the fuzzer to mutate.
    keep = ("lora_unet_down_blocks_0_resnets_0_conv1.",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.")
    for pattern in ["lycoris/*[!t].safetensors", "lora-layers/lo[hk][ar].kohya.safetensors"]:
        for p in sorted(glob.glob(os.path.join(FIX, pattern))):
            if p.endswith(".out.safetensors"):
                continue
            add("lora", "few-" + os.path.basename(p), st_subset(p, keep))
    copy("hypernet", "hypernet/tiny.hypernet.safetensors")
    _, meta = st_names(os.path.join(FIX, "hypernet/tiny.hypernet.safetensors"))
    add("hypernet_config", "tiny.json", meta["config"].encode())
    for pattern in ["tiny-sd/*/config.json", "tiny-sd/scheduler/*.json", "scheduler/configs/*.json",
                    "hostile/scheduler-*.json", "unet/*/unet/config.json", "vae/noquant/*.json"]:
        for p in sorted(glob.glob(os.path.join(FIX, pattern))):
            add("configs", p[len(FIX) + 1 :].replace("/", "_"), read(p))
    copy("cli_inputs", "unet/*.in.safetensors")
    copy("cli_inputs", "pipeline/latents.safetensors")
    copy("cli_inputs", "hostile/latents-*.safetensors")
    copy("png", "hostile/*.png")
    for name, (w, h, color, depth, bpp) in {
        "rgb8": (16, 16, 2, 8, 3),
        "rgba8": (17, 16, 6, 8, 4),
        "gray8": (16, 18, 0, 8, 1),
        "graya8": (16, 16, 4, 8, 2),
        "rgb16": (16, 16, 2, 16, 6),
        "palette": (16, 16, 3, 8, 1),
    }.items():
        rows = b"".join(bytes([0]) + bytes((x * 7 + y * 13) % 256 for x in range(w * bpp)) for y in range(h))
        add("png", name + ".png", png(w, h, color, depth, rows))

    # Model folders: tiny-sd (f32 files), a UNet component folder, the LDM single files.
    def folder(base, files):
        data = bytes([0])
        for rel, slot in files:
            p = os.path.join(base, rel)
            if os.path.isfile(p):
                data += rec(FOLDER_FILES.index(slot), read(p))
        return data

    tiny = os.path.join(FIX, "tiny-sd")
    add("model_folder", "tiny-sd", folder(tiny, [(f, f) for f in FOLDER_FILES]))
    add("model_folder", "tiny-sd-unet-only",
        folder(tiny, [(f, f) for f in ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]]))
    for case in ["lpb1", "sd2-linear"]:
        base = os.path.join(FIX, "unet", case)
        add("model_folder", case, folder(base, [(f, f) for f in FOLDER_FILES]))
    for p in ["tiny-sd-ldm.safetensors", "unet/ldm-sd1.safetensors"]:
        add("model_folder", "ldm-" + os.path.basename(p), bytes([1]) + read(os.path.join(FIX, p)))
        names, _ = st_names(os.path.join(FIX, p))
        add("ldm_keys", os.path.basename(p) + ".txt", "\n".join(sorted(names)).encode())

    tok = os.path.join(FIX, "tiny-sd", "tokenizer")
    files = b"".join(
        rec(i, read(os.path.join(tok, f)))
        for i, f in enumerate(TOKENIZER_FILES)
        if os.path.isfile(os.path.join(tok, f))
    )
    for i, prompt in enumerate(["a photo of sks person", "Émoji 🙂 and CAPS, punctuation!!", ""]):
        add("tokenizer", "tiny-sd-%d" % i, files + rec(5, prompt.encode()))
    no_json = b"".join(
        rec(i, read(os.path.join(tok, f)))
        for i, f in enumerate(TOKENIZER_FILES)
        if f != "tokenizer.json" and os.path.isfile(os.path.join(tok, f))
    )
    add("tokenizer", "tiny-sd-vocab-merges", no_json + rec(5, b"a cat"))

    for t, n in sorted(seeds.items()):
        print("%-16s %d seeds" % (t, n))


if __name__ == "__main__":
    main()
