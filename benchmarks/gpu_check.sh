#!/usr/bin/env bash
# On one CUDA GPU, in about 5 minutes: the CUDA tests, then a short bench, eager and
# with --cuda-graphs, on a random-weight ~3B-parameter dense model with a random MTP
# head. Acceptance means nothing with random weights, so drafts are forced to an
# acceptance of 0.8 (--force-acceptance): what is measured is the cost of drafting and
# of verifying k+1 positions, and the speedup a head of that acceptance would give.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# It installs mtpd with its test extras unless mtpd is importable already (on a machine
# without a package index, install the dependencies first, then `pip install --no-deps -e .`).
# A failing step is reported and the rest still runs; the exit status counts the failures.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/mtpd-gpu-check}}"
mkdir -p "$out"
python3 -c "import mtpd" 2>/dev/null || python3 -m pip install --quiet -e ".[test]" || exit 1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
failures=0
step() {  # step NAME SECONDS COMMAND...: run, keep the output, count a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name FAILED (exit $rc)"; failures=$((failures + 1)); }
}

step cuda-tests 180 python3 -m pytest -q -m cuda tests/test_cuda.py

model="${MTPD_RANDOM_MODEL:-/tmp/mtpd-random-3b-decisive}"
[ -f "$model/model.safetensors" ] || step random-model 120 \
    python3 benchmarks/random_model.py --out "$model" --device cuda
bench=(python3 -m mtpd bench --model "$model" --device cuda --workers 1 --dtype bfloat16
       --max-context 1024 --requests 8 --max-tokens 48 --draft-tokens 2,4 --concurrency 1,8
       --force-acceptance 0.8)
# The same configurations eagerly and replayed as CUDA graphs.
step bench-bf16 100 "${bench[@]}" --no-cuda-graphs --json "$out/bench-bf16.json"
step bench-bf16-graphs 100 "${bench[@]}" --cuda-graphs --json "$out/bench-bf16-graphs.json"
# 60 s cut the first H200 run (2026-11-29) off during its last configuration.
step bench-int4 100 "${bench[@]}" --quant int4 --concurrency 1 --draft-tokens 4 --requests 4 \
    --json "$out/bench-int4.json"
echo "== $failures step(s) failed"
exit "$failures"
