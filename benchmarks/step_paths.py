"""A whole-model step in one process, as a verification step's cost grows with its rows:
one sequence x N rows (a verification of N - 1 drafts) and N sequences x 1 row (N
streams decoding), against a roofline (the step's bytes at the measured bandwidth, its
multiply-adds at the cores' vector peak). For one sequence x N rows it also runs, on a
CPU with AVX-512 VNNI, the kernels' AVX-512 build against their AVX2 one (the per-op
path that whole-layer calls replaced in session 10 is gone from here: with a quantized
model it cannot read the float16 cache). Shapes and paths are shuffled in every rep, so
their ratios hold on a noisy machine.

    python benchmarks/step_paths.py [--model M] [--quant none,int4] [--rows 1,2,3,5,8]
                                    [--context 200] [--reps 40] [--threads 2] [--json OUT]
                                    [--macs-per-cycle N]

The peak assumes, per core and cycle at the clock /proc/cpuinfo reports, two 512-bit
dpbusd (int4, int8: 64 multiply-adds each) or FMAs (float32: 16 each) where the kernels
run their AVX-512 VNNI build: a loop of independent dpbusd ran 6.1 a nanosecond on one
core of the Xeon (session 24), a little more than 2 x 2.6 GHz (its turbo clock is
higher). Under the AVX2 build, two 256-bit maddubs (32 each) or FMAs (8 each), as
Intel's cores since Haswell and AMD's since Zen 2 issue them; Zen 1 issues a quarter of
that for maddubs (one every 0.8 ns on the EPYC of session 30) and half for FMAs, so
`--macs-per-cycle` overrides it there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

from mtpd.model import cpu_kernels, kernel_library
from mtpd.model.kv_cache import KVCache
from mtpd.train.engine import Engine

# Per core and cycle, by the kernels' build: AVX-512 VNNI, or AVX2 alone.
MACS_PER_CYCLE = {
    True: {"none": 32, "int8": 128, "int4": 128},
    False: {"none": 16, "int8": 64, "int4": 64},
}


def use(library) -> None:
    """Run the kernels of `library`."""
    cpu_kernels.kernels = lambda: library


def bandwidth_gbs(threads: int, nbytes: int = 2**30) -> float:
    """Read bandwidth over `nbytes` read again and again, best of five: over 1 GiB the
    memory's; over a step's weights what a step can read (this machine's 480 MB L3 keeps
    part of a 95 MB model: about 50 GB/s, where 1 GiB reads at 25)."""
    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def clock_ghz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1e3
    return 0.0


def matrices(engine: Engine) -> list:
    return [m.matrix for m in engine.shard.modules() if getattr(m, "matrix", None) is not None]


def step(
    engine: Engine, seqs: list[str], context: int, rows: int, cache: KVCache | None = None
) -> None:
    """Every sequence back to `context` cached positions, then `rows` more in one step
    (over `cache`, else the engine's)."""
    cache = engine.cache if cache is None else cache
    slots = [cache.slot(s) for s in seqs]
    for slot in slots:
        cache.truncate(slot, context)
    ids = torch.full((len(seqs) * rows,), 11, dtype=torch.long)
    hidden = engine.shard(ids, cache, slots, [rows] * len(seqs))
    engine.shard.logits(hidden)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--quant", default="none,int4")
    ap.add_argument("--rows", default="1,2,3,5,8")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--macs-per-cycle",
        type=float,
        default=None,
        help="a core's peak multiply-adds a cycle for the arithmetic floor (default: by build)",
    )
    args = ap.parse_args()
    native = kernel_library.kernels()
    if native is None:
        raise SystemExit("the CPU kernels are unavailable here (see the log): nothing to compare")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    avx2 = kernel_library.load(kernel_library.build_avx2(compiler, kernel_library.openmp_runtime()))
    rows_list = [int(r) for r in args.rows.split(",")]
    gbs, ghz = bandwidth_gbs(args.threads), clock_ghz()
    print(f"bandwidth {gbs:.1f} GB/s (1 GiB sum, {args.threads} threads), clock {ghz:.2f} GHz")
    torch.set_num_threads(args.threads)
    report: dict[str, dict] = {"bandwidth_gbs": gbs, "clock_ghz": ghz}
    for quant in args.quant.split(","):
        engine = Engine.load(
            args.model,
            max_context=args.context + max(rows_list),
            quant=quant,
            max_seqs=max(rows_list),
        )
        cfg = engine.cfg
        weights = sum(
            t.numel() * t.element_size()
            for m in matrices(engine)
            for t in m.tensors
            if t is not None
        )
        macs_per_row = sum(m.n * m.k for m in matrices(engine))
        cached_gbs = bandwidth_gbs(args.threads, weights)
        kv_bytes = engine.cache.k.element_size()  # float16 beside quantized weights
        kv_per_seq = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_bytes * args.context
        per_cycle = args.macs_per_cycle or MACS_PER_CYCLE[bool(kernel_library.cpu_isa())][quant]
        peak = args.threads * per_cycle * ghz * 1e9
        paths = {"whole layer": native}
        if kernel_library.cpu_isa():
            paths["whole layer, AVX2 only"] = avx2
        seqs = [f"s{i}" for i in range(max(rows_list))]
        for s in seqs:
            engine.forward(s, 0, [7] * args.context)
        shapes = [("1 seq", rows, path) for rows in rows_list for path in paths]
        shapes += [("seqs", rows, "whole layer") for rows in rows_list if rows > 1]
        times: dict[tuple, list[float]] = {shape: [] for shape in shapes}
        order = random.Random(0)
        for _ in range(args.reps):  # every shape and path in each rep: drift is shared
            # In a fixed order, the 1-row step ran right after the largest one, which had
            # pushed the weights out of the cache: 2 rows looked 0.97x one (session 24),
            # where shuffled they cost 1.1-1.2x.
            order.shuffle(shapes)
            for shape in shapes:
                kind, rows, path = shape
                use(paths[path])
                start = time.perf_counter()
                if kind == "1 seq":
                    step(engine, seqs[:1], args.context, rows)
                else:
                    step(engine, seqs[:rows], args.context, 1)
                times[shape].append(time.perf_counter() - start)
        use(native)
        ms = {shape: statistics.median(t) * 1e3 for shape, t in times.items()}
        base = ms["1 seq", 1, "whole layer"]
        print(
            f"{quant}: weights {weights / 1e6:.1f} MB (read again and again at "
            f"{cached_gbs:.1f} GB/s: the memory floor's rate), {macs_per_row / 1e6:.1f} M "
            f"multiply-adds a row, cache {kv_per_seq / 1e6:.1f} MB a sequence at "
            f"{args.context} positions; arithmetic peak {per_cycle:g} a cycle a core"
        )
        for rows in rows_list:
            arithmetic = macs_per_row * rows / peak * 1e3
            one = {path: ms["1 seq", rows, path] for path in paths}
            streams = ms.get(("seqs", rows, "whole layer"), base)
            memory = {n: (weights + n * kv_per_seq) / cached_gbs / 1e6 for n in (1, rows)}
            print(
                f"{quant:>5} 1 seq x {rows} rows: "
                + "  ".join(f"{p} {v:6.2f} ms ({v / base:.2f}x)" for p, v in one.items())
                + f"  floor: memory {memory[1]:.2f} ms, arithmetic {arithmetic:.2f} ms"
            )
            if rows > 1:
                print(
                    f"{quant:>5} {rows} seqs x 1 row: whole layer {streams:6.2f} ms "
                    f"({streams / base:.2f}x)  floor: memory {memory[rows]:.2f} ms"
                )
            report[f"{quant} x{rows}"] = {
                **{path: round(v, 3) for path, v in one.items()},
                "sequences x 1 row": round(streams, 3),
                "memory floor ms": round(memory[1], 3),
                "arithmetic floor ms": round(arithmetic, 3),
            }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
