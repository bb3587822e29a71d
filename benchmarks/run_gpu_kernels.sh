#!/usr/bin/env bash
# One device call on one H200 (about 4 minutes): the GPU tests of the Triton experts, then the same-process A/B of
# the experts before the kernel pruning (.ab_base/omni_ep_base, from benchmarks/make_baseline_package.sh: carry
# .ab_base) against today's, at T = 8194 for E_local 64 and 32 and one point per E_local whose kernels changed.
# Logs, JSON and Markdown go to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
[ -d .ab_base/omni_ep_base ] || { echo "no .ab_base: run bash benchmarks/make_baseline_package.sh and carry .ab_base"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# Four workers when pytest-xdist is there: the cases are mostly kernel compiles, which run on the CPU cores.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider $workers 2>&1 | tee "$OUT/gpu_tests.log"
tests=$?
python3 benchmarks/bench_moe.py --mode ab --points 64:8194 32:8194 64:4097 32:16388 16:4097 8:4097 \
    --changed 64:4097 32:16388 16:4097 8:4097 --rounds 6 --budget-ms 900 --settle-ms 200 \
    --json "$OUT/kernels_ab_h200.json" --table "$OUT/kernels_ab_h200.md" 2>&1 | tee "$OUT/ab.log"
ab=$?
echo
echo "GPU tests: $(tail -n 1 "$OUT/gpu_tests.log")"
grep -E '^\| (E_local|[0-9])' "$OUT/kernels_ab_h200.md" 2>/dev/null
echo "exit codes: tests $tests, A/B $ab"
[ "$tests" -eq 0 ] && [ "$ab" -eq 0 ]
