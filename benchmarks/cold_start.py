"""How long the README's command takes, as a new user meets it:

    mtpd run "What is the capital of France?"

    python benchmarks/cold_start.py [--runs 5] [--mtpd PATH] [--cwd DIR] [--json OUT]

- first run ever: an empty mtpd cache ($XDG_CACHE_HOME/mtpd: the CPU kernels are
  compiled, the GGUF header parsed) and, where this user may drop it, a cold page cache;
- cold page cache: mtpd's cache kept, the kernel's page cache dropped (root only);
- warm: `--runs` runs one after another, min / median / max.

Wall time of the whole command, from the process's start to its exit; each run must
answer "Paris". `--mtpd` picks the installed command to time (default: the one beside
this Python); `--cwd` where it runs (default: the clone's root, where a new user is).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "What is the capital of France?"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def timed_run(mtpd: str, cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(
        [mtpd, "run", PROMPT], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    elapsed = time.perf_counter() - start
    if out.returncode != 0 or "Paris" not in out.stdout:
        raise SystemExit(f"mtpd run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return elapsed


def drop_page_cache() -> bool:
    """Whether the kernel's page cache could be dropped (it needs root)."""
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mtpd", default=str(Path(sys.executable).with_name("mtpd")))
    parser.add_argument("--cwd", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    env = dict(os.environ)
    report: dict[str, object] = {"command": f'mtpd run "{PROMPT}"', "cwd": str(args.cwd)}
    empty_cache = tempfile.mkdtemp(prefix="mtpd-cold-cache-")
    try:
        cold = drop_page_cache()
        report["first_run_s"] = timed_run(
            args.mtpd, args.cwd, {**env, "XDG_CACHE_HOME": empty_cache}
        )
        report["first_run_page_cache"] = "cold" if cold else "warm (no permission to drop it)"
    finally:
        shutil.rmtree(empty_cache, ignore_errors=True)
    timed_run(args.mtpd, args.cwd, env)  # fills this user's own mtpd cache
    if drop_page_cache():
        report["cold_page_cache_s"] = timed_run(args.mtpd, args.cwd, env)
    warm = [timed_run(args.mtpd, args.cwd, env) for _ in range(args.runs)]
    report["warm_s"] = warm
    report["warm_min_median_max_s"] = [min(warm), statistics.median(warm), max(warm)]
    for key, value in report.items():
        shown = [round(v, 2) for v in value] if isinstance(value, list) else value
        print(f"{key}: {round(shown, 2) if isinstance(shown, float) else shown}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
