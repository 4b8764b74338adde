#!/usr/bin/env python3
"""Reads `cargo test --no-run --message-format=json` on stdin and prints one line per test
binary built: its target name and the executable's path. Used by scripts/gpu-check.sh
(--prepare copies them) and scripts/emulated-gpu.sh (runs them)."""
import json
import sys

for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if (
        m.get("reason") == "compiler-artifact"
        and m.get("executable")
        and m["target"]["kind"] == ["test"]
    ):
        print(m["target"]["name"], m["executable"])
