#!/usr/bin/env bash
# On one CUDA GPU, in under 5 minutes: the CUDA tests, then a short bench, eager and
# with --cuda-graphs, on a random-weight ~3B-parameter dense model with a random MTP
# head. Acceptance means nothing with random weights, so drafts are forced to an
# acceptance of 0.8 (--force-acceptance): what is measured is the cost of drafting and
# of verifying k+1 positions, and the speedup a head of that acceptance would give.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/mtpd-gpu-check}}"
mkdir -p "$out"
python3 -m pip install --quiet -e ".[test]"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout 120 python3 -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee "$out/cuda-tests.txt"

model="${MTPD_RANDOM_MODEL:-/tmp/mtpd-random-3b}"
[ -f "$model/model.safetensors" ] || python3 benchmarks/random_model.py --out "$model" --device cuda
bench=(python3 -m mtpd bench --model "$model" --device cuda --workers 1 --dtype bfloat16
       --max-context 1024 --requests 8 --max-tokens 48 --draft-tokens 2,4 --concurrency 1,8
       --force-acceptance 0.8)
# The same configurations eagerly and replayed as CUDA graphs.
timeout 100 "${bench[@]}" --json "$out/bench-bf16.json" 2>&1 | tee "$out/bench-bf16.txt"
timeout 100 "${bench[@]}" --cuda-graphs --json "$out/bench-bf16-graphs.json" 2>&1 \
    | tee "$out/bench-bf16-graphs.txt" || echo "the CUDA-graph bench did not finish"
timeout 60 "${bench[@]}" --quant int4 --concurrency 1 --draft-tokens 4 --json "$out/bench-int4.json" \
    2>&1 | tee "$out/bench-int4.txt" || echo "int4 bench did not finish"
