"""Two versions of the CPU kernels' source, side by side in one process: each is built as
its own library and the whole-model steps alternate between them, so their ratio holds
on a noisy machine (the weights, packed once, are the same for both: the versions must
share the weights' layout).

    git show HEAD~1:model/cpu_kernels.c > /tmp/old.c
    python benchmarks/kernel_ab.py /tmp/old.c model/cpu_kernels.c [--quant int4] [--reps 40]
                                   [--shapes 1x1,1x2,1x8,8x1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from step_paths import step  # this folder's: a script's own folder is on sys.path

from mtpd.model import cpu_kernels, kernel_library
from mtpd.train.engine import Engine

SHAPES = "1x1,1x2,1x8,8x1"  # sequences x rows each


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=SHAPES, help="sequences x rows each, comma-separated")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    torch.set_num_threads(args.threads)
    compiler = shutil.which(os.environ.get("CC", "cc"))
    runtime, isa = kernel_library.openmp_runtime(), kernel_library.cpu_isa()
    libraries = {}
    for source in args.sources:
        kernel_library.SOURCE = source
        libraries[str(source)] = kernel_library.load(
            kernel_library.build(compiler, runtime, ["-lmvec"], isa)
        )
    most = max(n for n, _ in shapes)
    engine = Engine.load(
        args.model,
        max_context=args.context + max(rows for _, rows in shapes),
        quant=args.quant,
        max_seqs=most,
    )
    seqs = [f"s{i}" for i in range(most)]
    for s in seqs:
        engine.forward(s, 0, [7] * args.context)
    times = {(name, shape): [] for name in libraries for shape in shapes}
    order = list(libraries.items())
    for _ in range(args.reps):
        # Whichever runs second in a shape ran up to 5% faster: the order turns each rep.
        order = order[1:] + order[:1]
        for shape in shapes:
            for name, library in order:
                cpu_kernels.kernels = lambda library=library: library
                n, rows = shape
                start = time.perf_counter()
                step(engine, seqs[:n], args.context, rows)
                times[name, shape].append(time.perf_counter() - start)
    first = str(args.sources[0])
    for n, rows in shapes:
        base = statistics.median(times[first, (n, rows)])
        cells = "  ".join(
            f"{name} {statistics.median(times[name, (n, rows)]) * 1e3:6.2f} ms "
            f"({statistics.median(times[name, (n, rows)]) / base:.2f}x)"
            for name in libraries
        )
        print(f"{n} sequence(s) x {rows} row(s): {cells}")


if __name__ == "__main__":
    main()
