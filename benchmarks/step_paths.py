"""A whole-model step in one process on each CPU path, side by side: every decoder layer
as one kernel call (what runs) against the per-op calls it replaced (norms, projections,
attention and SwiGLU each a call, the residual adds in PyTorch), and, on a CPU with
AVX-512 VNNI, the kernels' AVX-512 build against their AVX2 one. Paths
alternate step by step, so their ratios hold on a noisy machine. A step appends `rows`
tokens to a `context`-token cache: 1 is a decode step, k + 1 a verification of k drafts.

    python benchmarks/step_paths.py [--model M] [--quant none,int4] [--rows 1,2,3,5]
                                    [--context 200] [--reps 40] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import torch

from mtpd.model import cpu_kernels
from mtpd.worker.engine import Engine


def use(layers: list, kernels: list, fused: bool, library) -> None:
    """Run `layers` as one kernel call each (`fused`) or op by op, on `library`."""
    for layer, kernel in zip(layers, kernels, strict=True):
        layer.kernel = kernel if fused else None
    cpu_kernels._library = lambda: library


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--quant", default="none,int4")
    ap.add_argument("--rows", default="1,2,3,5")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native = cpu_kernels._library()
    if native is None:
        raise SystemExit("the CPU kernels are unavailable here (see the log): nothing to compare")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    avx2 = cpu_kernels._load(cpu_kernels._build_avx2(compiler, cpu_kernels._openmp_runtime()))
    rows_list = [int(r) for r in args.rows.split(",")]
    report: dict[str, dict] = {}
    for quant in args.quant.split(","):
        engine = Engine.load(args.model, max_context=args.context + max(rows_list), quant=quant)
        layers = list(engine.shard.stack.layers)
        kernels = [layer.kernel for layer in layers]
        paths = {"whole layer": (True, native), "per op": (False, native)}
        if cpu_kernels._isa():
            paths["whole layer, AVX2 only"] = (True, avx2)

        engine.forward("bench", 0, [7] * args.context)
        times = {(rows, name): [] for rows in rows_list for name in paths}
        for _ in range(args.reps):  # every row count and path in each rep: drift is shared
            for rows in rows_list:
                for name, (fused, library) in paths.items():
                    use(layers, kernels, fused, library)
                    start = time.perf_counter()
                    engine.forward("bench", args.context, [11] * rows, all_logits=True)
                    times[rows, name].append(time.perf_counter() - start)
        for rows in rows_list:
            ms = {name: statistics.median(times[rows, name]) * 1e3 for name in paths}
            report[f"{quant} x{rows}"] = {name: round(v, 3) for name, v in ms.items()}
            base = ms["whole layer"]
            print(
                f"{quant:>5} rows {rows}: "
                + "  ".join(f"{name} {v:6.2f} ms ({v / base:.2f}x)" for name, v in ms.items()),
                flush=True,
            )
        use(layers, kernels, True, native)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
