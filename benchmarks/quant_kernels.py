"""What one linear layer costs per weight format, on SmolLM2-135M's shapes: float32 on
mtpd's kernel (its CPU default) and oneDNN-packed, bfloat16, and int8 / int4 on mtpd's
kernels (what `--quant` runs on CPU) and on PyTorch's packed operators (gpt-fast's).
Interleaved in one run, so the ratios hold on a noisy machine. This is the profile
behind docs/quantization.md's numbers.

    python benchmarks/quant_kernels.py [--threads 2] [--reps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from mtpd.model import cpu_kernels
from mtpd.model.quant import Int4Linear, Int4Weight, Int8Linear

SHAPES = {  # [out, in] of SmolLM2-135M's fused layers and its output head
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        wb = w.bfloat16()
        q4 = Int4Weight.from_float(w)
        f32 = cpu_kernels.Matrix.f32(w)
        i8, i4 = Int8Linear(w, None), Int4Linear(q4, None, torch.float32)
        i8_op = Int8Linear(w, None, use_kernel=False)
        i4_op = Int4Linear(q4, None, torch.float32, use_kernel=False)
        for rows in (1, 5):
            x = torch.randn(rows, k)
            xb = x.bfloat16()
            kinds = {
                "float32": partial(f32, x),
                "float32 oneDNN": partial(
                    torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], ""
                ),
                "bfloat16": partial(F.linear, xb, wb),
                "int8": partial(i8, x),
                "int8 op": partial(i8_op, x),
                "int4": partial(i4, x),
                "int4 op": partial(i4_op, x),
            }
            times = {kind: [] for kind in kinds}
            for _ in range(args.reps):
                for kind, f in kinds.items():
                    start = time.perf_counter()
                    f()
                    times[kind].append(time.perf_counter() - start)
            row = {kind: round(statistics.median(t) * 1e6, 1) for kind, t in times.items()}
            out[f"{name} x{rows}"] = row
            print(
                f"{name:>8} rows {rows}: "
                + ", ".join(f"{kind} {us:8.1f} us" for kind, us in row.items()),
                flush=True,
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
