"""Writes tests/fixtures/hostile/: small malformed or hostile inputs, one per class of fault
that once crashed, aborted, hung or silently misread hdb (issue 18). tests/hostile.rs feeds each
to the library, the CLI or the C API and checks it is refused cleanly with a message naming the
fault; the fuzz targets (fuzz/) start from them too.

Standard library only (no torch): every file is built from the committed tiny fixtures by
rewriting a safetensors header, a JSON config or a PNG chunk. Run from the repository root:

    python3 tools/make_hostile.py

The output is deterministic; tests/hostile.rs fails when a file is missing or stale.
"""

import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "hostile")

# A tiny-sd UNet projection (weight [4, 4] in tests/fixtures/tiny-sd).
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
PEFT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


def read_st(path):
    """(header dict, data bytes) of a safetensors file."""
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def st_bytes(tensors, metadata=None, raw_header=None):
    """A safetensors file from [(name, dtype, shape, data bytes)] in order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off, data = 0, b""
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        off += len(blob)
        data += blob
    text = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":"))
    text = text.encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32(*v):
    return struct.pack("<%df" % len(v), *v)


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(w, h):
    """A PNG whose IHDR declares w x h RGB8 pixels and whose pixel data is one empty row."""
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return sig + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0")) + png_chunk(b"IEND", b"")


def write(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def main():
    os.makedirs(OUT, exist_ok=True)
    big = 1 << 62
    # Finding 1: empty factors and a rank of 2^62; rank x din wrapped to 0 in release builds.
    write(
        "lora-rank-2p62.kohya.safetensors",
        st_bytes(
            [
                (KOHYA + ".alpha", "F32", [], f32(1.0)),
                (KOHYA + ".lora_down.weight", "F32", [big, 0], b""),
                (KOHYA + ".lora_up.weight", "F32", [0, big], b""),
            ]
        ),
    )
    write(
        "lora-rank-2p62.peft.safetensors",
        st_bytes(
            [
                (PEFT + ".lora_A.weight", "F32", [big, 0], b""),
                (PEFT + ".lora_B.weight", "F32", [0, big], b""),
            ]
        ),
    )
    # Finding 2: sizes that were allocated before they were checked.
    write("png-100000x100000.png", png_header_only(100000, 100000))
    write("latents-2p62x0.safetensors", st_bytes([("latents", "F32", [big, 0], b"")]))
    sched = json.load(open(os.path.join(FIX, "tiny-sd", "scheduler", "scheduler_config.json")))
    for name, n in [("2p40", 1 << 40), ("2p64m1", (1 << 64) - 1)]:
        s = dict(sched, num_train_timesteps=n)
        write("scheduler-%s.json" % name, json.dumps(s, indent=1).encode())
    # Finding 3 (the hypernetwork configs of 2^20 layers are made in tests/hostile.rs, to keep
    # three copies of a 349 KB file out of the repository).
    write("png-20000x20000.png", png_header_only(20000, 20000))
    # Found by the png fuzz target: a palette of 49 bytes (not a whole number of RGB entries)
    # made the png crate index past it while expanding the image.
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", 1, 16, 8, 3, 0, 0, 0)
    rows = b"".join(b"\0\0" for _ in range(16))
    write(
        "png-plte-49-bytes.png",
        sig + png_chunk(b"IHDR", ihdr) + png_chunk(b"PLTE", bytes(range(49)))
        + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""),
    )
    # Finding 5: silently misread before.
    # up declared [rank, out] = [1, 4]: the element count of [4, 1], the wrong layout.
    down = f32(0.1, 0.2, 0.3, 0.4)
    write(
        "lora-up-transposed.kohya.safetensors",
        st_bytes(
            [
                (KOHYA + ".alpha", "F32", [], f32(1.0)),
                (KOHYA + ".lora_down.weight", "F32", [1, 4], down),
                (KOHYA + ".lora_up.weight", "F32", [1, 4], down),
            ]
        ),
    )
    for name, shape, blob in [("3", [3], f32(1.0, 2.0, 3.0)), ("empty", [0], b"")]:
        write(
            "lora-alpha-%s.kohya.safetensors" % name,
            st_bytes(
                [
                    (KOHYA + ".alpha", "F32", shape, blob),
                    (KOHYA + ".lora_down.weight", "F32", [1, 4], down),
                    (KOHYA + ".lora_up.weight", "F32", [4, 1], down),
                ]
            ),
        )
    # The same name twice in one header, both over the same bytes (JSON allows it; the last one,
    # here of another shape, used to win without a word).
    dup = (
        '{"%s.lora_down.weight":{"dtype":"F32","shape":[1,4],"data_offsets":[0,16]},'
        '"%s.lora_up.weight":{"dtype":"F32","shape":[4,1],"data_offsets":[16,32]},'
        '"%s.lora_down.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'
    ) % (KOHYA, KOHYA, KOHYA)
    write("duplicate-names.safetensors", st_bytes([("x", "F32", [8], down * 2)], raw_header=dup))
    nan = struct.pack("<f", float("nan"))
    write("latents-nan.safetensors", st_bytes([("latents", "F32", [1, 4, 8, 8], nan + f32(*[0.0] * 255))]))
    # Finding 9: random bytes with a pickle-like name are not called a pickle.
    write("random-bytes.bin", bytes((i * 197 + 13) % 256 for i in range(64)))


if __name__ == "__main__":
    main()
