"""The PyTorch peer for `hdb bench gemm`: `torch.nn.functional.linear(x [m, k], w [n, k])` (the BLAS
PyTorch's CPU build calls: MKL or oneDNN, named in the output), f32, no_grad, at the shapes given as
m,k,n triples; and `F.conv2d` (oneDNN) for 3x3, stride 1, padding 1 convolutions given as
--conv batch,c_in,c_out,size. Prints one JSON line: {"peer": "pytorch", "torch", "cpu_capability",
"threads", "blas", "shapes": [{"m", "k", "n", "s"}], "convs": [{"batch", "c_in", "c_out", "size",
"s"}]} (medians of --runs after one warm-up). CI never runs this.

  /tmp/hdb-ref-venv/bin/python tools/bench_torch_gemm.py --threads 2 --runs 5 154,768,768 8192,320,320
"""

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch_pipeline import timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--conv", action="append", default=[], help="batch,c_in,c_out,size")
    ap.add_argument("shapes", nargs="*", help="m,k,n")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", cfg)
    out = []
    with torch.no_grad():
        for s in args.shapes:
            m, k, n = (int(v) for v in s.split(","))
            x, w = torch.randn(m, k), torch.randn(n, k)
            y = torch.empty(m, n)
            out.append({"m": m, "k": k, "n": n,
                        "s": timed(lambda: torch.matmul(x, w.t(), out=y), args.runs)})
        convs = []
        for s in args.conv:
            b, ci, co, hw = (int(v) for v in s.split(","))
            x, w, bias = torch.randn(b, ci, hw, hw), torch.randn(co, ci, 3, 3), torch.randn(co)
            convs.append({"batch": b, "c_in": ci, "c_out": co, "size": hw,
                          "s": timed(lambda: torch.nn.functional.conv2d(x, w, bias, padding=1), args.runs)})
    print(json.dumps({"peer": "pytorch", "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": args.threads,
                      "blas": blas.group(1) if blas else "unknown",
                      "mkldnn": bool(torch.backends.mkldnn.is_available()), "shapes": out,
                      "convs": convs}))


if __name__ == "__main__":
    main()
