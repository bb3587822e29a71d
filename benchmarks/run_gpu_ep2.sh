#!/usr/bin/env bash
# One device call on 2 GPUs (NCCL): expert parallel checked against one GPU on the tiny checkpoint (fp32, TF32 off),
# then real-width 4-layer dummy timings of EP=1 (one GPU) vs EP=2 layouts with both dispatch backends.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NVIDIA_TF32_OVERRIDE=0
OUT=${OUT:-/tmp/out}
B="python3 benchmarks/bench_pipeline.py"
T2="torchrun --standalone --nproc-per-node 2 benchmarks/bench_pipeline.py"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
TINY="--model tiny --height 256 --width 256 --steps 4 --dtype float32 --experts-backends torch"
$B $TINY --save-latents $OUT/ref.pt 2>&1 | tail -3
for layout in "--cfg-parallel-size 2" "--tensor-parallel-size 2" "--data-parallel-size 2"; do
  for backend in allgather_reducescatter all2all; do
    $T2 $TINY $layout --enable-expert-parallel --all2all-backend $backend --compare-latents $OUT/ref.pt 2>&1 | grep -E "layout|relative|Error|error" | tail -3
  done
done 2>&1 | tee $OUT/ep2_check.log
REAL="--model real-dummy --layers 4 --num-experts 64 --height 1024 --width 1024 --steps 10 --experts-backends triton"
$B $REAL --json $OUT/real4_ep1.json 2>&1 | tail -3 | tee $OUT/ep2_bench.log
for backend in allgather_reducescatter all2all; do
  $T2 $REAL --cfg-parallel-size 2 --enable-expert-parallel --all2all-backend $backend --json $OUT/real4_cfg2_ep2_$backend.json 2>&1 | tail -3
  $T2 $REAL --tensor-parallel-size 2 --enable-expert-parallel --all2all-backend $backend --json $OUT/real4_tp2_ep2_$backend.json 2>&1 | tail -3
done 2>&1 | tee -a $OUT/ep2_bench.log
