#!/usr/bin/env bash
# Sequence parallel on 2 GPUs (NCCL, nvidia-h200-x2), parts in the order given (each 3-5 minutes):
#   check     tiny checkpoint, fp32, TF32 off: ulysses 2 and ring 2 (+EP2, both dispatch backends) and ulysses 2
#             without EP against one GPU (latents relative error, image PSNR), and whether the cached step was captured;
#             then bf16 ring 2 / ulysses 2 + EP2 against one GPU in bf16 (the ring's flash-attention path)
#   ulysses   full size (real-dummy, 32 layers, 64 experts), 1024x1024, 50 steps, bf16: ulysses 2 + EP2, guidance 5 and 1.0
#   ring      the same with ring 2 + EP2
#   baselines the same with CFG2 + EP2 (guidance 5 only: CFG parallel needs guidance) and TP2 + EP2 (5 and 1.0)
#   profile   profile_step.py, ulysses 2 + EP2, cached steps 2-5 run eagerly: kernel and exposed time of the ulysses all-to-all
# usage: OUT=/some/dir benchmarks/run_gpu_sp2.sh PART...   (needs the diffusers wheel in .whl/, see benchmarks/README.md)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
PARTS=$(IFS=_; echo "$*")
S=/tmp/scratch  # latents and per-run JSON: $OUT brings back at most 8 files
rm -rf "$S"; mkdir -p "$OUT" "$S"
FULL_LOG=$OUT/full_sp2_$PARTS.log  # every run's whole output; the console gets the lines that matter
# At exit the per-run JSON files become one, $OUT/sp2_$PARTS.json.
trap 'python3 -c "import glob, json, os, sys; fs = sorted(glob.glob(\"$S/*.json\")); fs and json.dump({os.path.basename(f)[:-5]: json.load(open(f)) for f in fs}, open(sys.argv[1], \"w\"), indent=1)" "$OUT/sp2_$PARTS.json"' EXIT
exec > >(tee -a "$OUT/run_gpu_sp2_$PARTS.log") 2>&1  # what a killed call printed stays under $OUT
# Every run is bounded: a hang costs its own limit, not the whole call's.
B="timeout 300 python3 benchmarks/bench_pipeline.py"
T2="timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/bench_pipeline.py"
REAL="--model real-dummy --layers 32 --num-experts 64 --height 1024 --width 1024 --steps 50 --dtype bfloat16"
EP="--enable-expert-parallel --all2all-backend all2all"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for part in "$@"; do
case "$part" in
  check)
    export NVIDIA_TF32_OVERRIDE=0
    TINY="--model tiny --height 256 --width 256 --steps 6 --dtype float32"
    $B $TINY --no-timing --save-output $S/sp_ref.pt 2>&1 | tee -a "$FULL_LOG" | tail -2
    for layout in "--ulysses-degree 2" "--ring-degree 2"; do
      for backend in allgather_reducescatter all2all; do
        $T2 $TINY $layout --enable-expert-parallel --all2all-backend $backend --compare-output $S/sp_ref.pt --rtol 1e-4 \
          2>&1 | tee -a "$FULL_LOG" | grep -E "SP=|vs |True|False|rror" | tail -4
      done
    done
    $T2 $TINY --ulysses-degree 2 --compare-output $S/sp_ref.pt --rtol 1e-4 2>&1 | tee -a "$FULL_LOG" | grep -E "SP=|vs |True|False|rror"
    # bf16: the ring's flash-attention path (fp32 takes the formula), agreement with one GPU (no limit)
    unset NVIDIA_TF32_OVERRIDE
    TINY16="--model tiny --height 256 --width 256 --steps 6 --dtype bfloat16"
    $B $TINY16 --no-timing --save-output $S/sp_ref16.pt 2>&1 | tee -a "$FULL_LOG" | tail -1
    for layout in "--ring-degree 2" "--ulysses-degree 2"; do
      $T2 $TINY16 $layout $EP --compare-output $S/sp_ref16.pt 2>&1 | tee -a "$FULL_LOG" | grep -E "SP=|vs |True|False|rror"
    done ;;
  ulysses|ring)
    layout="--ulysses-degree 2"; [ "$part" = ring ] && layout="--ring-degree 2"
    for g in 5.0 1.0; do
      echo "== ${part} 2 + EP2, guidance $g"
      $T2 $REAL $layout $EP --guidance-scale $g --json $S/pipeline_2xh200_${part}2_ep2_g${g%.0}.json 2>&1 | tee -a "$FULL_LOG" | tail -4
    done ;;
  baselines)
    echo "== CFG2 + EP2, guidance 5"
    $T2 $REAL --cfg-parallel-size 2 $EP --guidance-scale 5.0 --json $S/pipeline_2xh200_cfg2_ep2_g5.json 2>&1 | tee -a "$FULL_LOG" | tail -4
    for g in 5.0 1.0; do
      echo "== TP2 + EP2, guidance $g"
      $T2 $REAL --tensor-parallel-size 2 $EP --guidance-scale $g --json $S/pipeline_2xh200_tp2_ep2_g${g%.0}.json 2>&1 | tee -a "$FULL_LOG" | tail -4
    done ;;
  profile)
    timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/profile_step.py --model real-dummy --layers 32 --height 1024 \
      --width 1024 --ulysses-degree 2 $EP --steps 6 --from-step 2 --json $S/profile_2xh200_ulysses2_ep2.json \
      2>&1 | tee -a "$FULL_LOG" | tail -16 ;;
  *) echo "usage: $0 PART... (check ulysses ring baselines profile)" >&2; exit 2 ;;
esac
done
