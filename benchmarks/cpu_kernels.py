"""Every linear layer of a model, once, at a given row count: mtpd's float32 AVX2 kernel
(model/cpu_kernels.py) against oneDNN's packed layout (what mtpd used before) and a plain
matmul (what transformers runs), interleaved in one run so the ratios hold on a noisy
machine. One row is a decoding step, 2–8 a verification step, more a prefill chunk.

    python benchmarks/cpu_kernels.py [--model M] [--threads 2] [--rounds 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mtpd.model.layers import Linear
from mtpd.train.engine import Engine

ROWS = (1, 2, 3, 4, 5, 8, 16, 64, 256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, max_context=64)
    layers = [m for m in engine.shard.modules() if isinstance(m, Linear)]
    if not all(m.on_kernel for m in layers):
        raise SystemExit("the kernel is unavailable here (see the log): nothing to compare")
    weights = [m.weight for m in layers]
    matrices = [m.matrix for m in layers]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    gigabytes = sum(w.numel() * 4 for w in weights) / 1e9

    def run(kind: str, inputs: dict[int, torch.Tensor]) -> None:
        for w, matrix, packed in zip(weights, matrices, onednn, strict=True):
            x = inputs[w.shape[1]]
            if kind == "kernel":
                matrix(x)
            elif kind == "onednn":
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            else:
                F.linear(x, w)

    print(
        f"{len(layers)} layers, {gigabytes * 1e3:.0f} MB of float32 weights, "
        f"{args.threads} thread(s); ms per pass over all layers (GB/s of weights)"
    )
    report = {}
    with torch.inference_mode():
        for rows in ROWS:
            inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
            times: dict[str, list[float]] = {k: [] for k in ("kernel", "onednn", "plain")}
            for _ in range(args.rounds if rows <= 16 else max(2, args.rounds // 4)):
                for kind, samples in times.items():
                    start = time.perf_counter()
                    run(kind, inputs)
                    samples.append(time.perf_counter() - start)
            ms = {kind: statistics.median(s) * 1e3 for kind, s in times.items()}
            report[rows] = {kind: round(v, 2) for kind, v in ms.items()}
            print(
                f"rows {rows:>3}: "
                + "  ".join(f"{k} {v:7.1f} ({gigabytes / v * 1e3:4.1f})" for k, v in ms.items())
                + f"   oneDNN/kernel {ms['onednn'] / ms['kernel']:.2f}x",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gigabytes": gigabytes, "threads": args.threads, "ms": report}, f)


if __name__ == "__main__":
    main()
