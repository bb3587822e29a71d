#!/usr/bin/env bash
# Device calls for the whole pipeline on two H200s (nvidia-h200-x2), one stage per call:
#   bash benchmarks/run_gpu_pipeline.sh check     # exactness: tiny checkpoint, fp32 (about 3 min)
#   bash benchmarks/run_gpu_pipeline.sh agreement # real width, 4 layers, bf16: 2 GPUs vs 1 and vs .ab_base, and the
#                                                 # bf16 floor (vs fp32 on 1 GPU) (about 8 min)
#   bash benchmarks/run_gpu_pipeline.sh agreement_fp32  # real width, 4 layers, fp32: EP2 layouts vs 1 GPU (untimed)
#   bash benchmarks/run_gpu_pipeline.sh layouts [NAME...]  # full size, 1024x1024, 50 steps, every layout (and
#                                                 # two with placement balanced) or the named ones (about 50 s each)
#   bash benchmarks/run_gpu_pipeline.sh profile [NAME LAYOUT...]   # the kernel-time breakdown, .ab_base's
#                                                 # package and this one (about 4 min); default NAME cfg2_ep2_all2all
#   bash benchmarks/run_gpu_pipeline.sh nccl_collectives   # the collectives alone under NCCL settings (about 2 min)
#   bash benchmarks/run_gpu_pipeline.sh balanced  # expert loads recorded, placement linear vs balanced, full size
#                                                 # (about 8 min)
#   bash benchmarks/run_gpu_pipeline.sh fp8_kernels  # FP8 experts: GPU tests, bench_moe bf16 vs FP8 (about 2 min)
#   bash benchmarks/run_gpu_pipeline.sh fp8       # FP8 experts: agreement (real width, 4 layers) and full size: EP2
#                                                 # layouts exact and FP8, TP2 without EP, FP8 on one GPU (about 8 min)
#   bash benchmarks/run_gpu_pipeline.sh fp8_profile  # FP8 experts: the profile, placement linear vs balanced (about 6 min)
#   bash benchmarks/run_gpu_pipeline.sh fp8_graph # FP8: GPU tests, CFG2 + EP2 balanced with and without a CUDA graph
#   bash benchmarks/run_gpu_pipeline.sh distil    # Instruct-Distil, full size, 8 steps, each 2-GPU layout (about 4 min)
#   bash benchmarks/run_gpu_pipeline.sh ab [LAYOUT...]   # every package in .ab_base and this one, full size,
#                                                 # in turn twice (about 2.5 min a package); LAYOUT:
#                                                 # bench_pipeline's layout flags (default CFG2 + EP2 all2all)
# Carry .whl (the diffusers wheel, benchmarks/README.md) and, for "check", "agreement", "ab" and "profile", .ab_base
# (make_baseline_package.sh: another commit's package; "check" and "agreement" want the previous one, whose outputs
# this one must match). Logs and JSON go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/.ab_base PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
S=/tmp/scratch  # latents and per-run JSON: $OUT brings back at most 8 files
rm -rf "$S"; mkdir -p "$OUT" "$S"
FULL_LOG=$OUT/full_${1:-check}.log  # every run's whole output; the console gets the lines that matter
# At exit the per-run JSON files become one, $OUT/${1:-check}.json.
trap 'kill ${CLOCKS_PID:-} 2> /dev/null; python3 -c "import glob, json, os, sys; fs = sorted(glob.glob(\"$S/*.json\")); fs and json.dump({os.path.basename(f)[:-5]: json.load(open(f)) for f in fs}, open(sys.argv[1], \"w\"), indent=1)" "$OUT/${1:-check}.json"' EXIT
exec > >(tee -a "$OUT/run_gpu_pipeline_${1:-check}.log") 2>&1  # what a killed call printed stays under $OUT
# Every run is bounded: a hang costs its own limit, not the whole call's.
B="timeout 300 python3 benchmarks/bench_pipeline.py"
T2="timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/bench_pipeline.py"
EP="--enable-expert-parallel"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

CFG2_EP2="--cfg-parallel-size 2 $EP --all2all-backend all2all"
# Each GPU's power, SM clock and clock-event reasons every 200 ms into $OUT/gpu_clocks_<stage>.csv, for
# gpu_clocks.py (per timed run); older drivers name the reasons clocks_throttle_reasons.
sample_clocks() {
  local reasons=clocks_event_reasons.active
  nvidia-smi --query-gpu=$reasons --format=csv,noheader > /dev/null 2>&1 || reasons=clocks_throttle_reasons.active
  nvidia-smi --query-gpu=timestamp,index,power.draw,clocks.sm,$reasons --format=csv,noheader,nounits -lms 200 \
    > "$OUT/gpu_clocks_$1.csv" 2>&1 &
  CLOCKS_PID=$!
}
clocks_per_run() {  # clocks_per_run STAGE: stop sampling, the table per timed run
  kill "$CLOCKS_PID" 2> /dev/null; wait "$CLOCKS_PID" 2> /dev/null
  python3 benchmarks/gpu_clocks.py "$OUT/gpu_clocks_$1.csv" "$S"/*.json
}
case "${1:-check}" in
check)
  # fp32, TF32 off, tiny checkpoint: the previous commit on one GPU, this one on one and two GPUs (limit 1e-4).
  TINY="--model tiny --height 256 --width 256 --steps 4 --dtype float32 --no-timing"
  export NVIDIA_TF32_OVERRIDE=0
  $B --package omni_ep_base $TINY --save-output "$S/tiny_base.pt" 2>&1 | tee -a "$FULL_LOG" | tail -1
  $B $TINY --compare-output "$S/tiny_base.pt" --rtol 1e-4 2>&1 | tee -a "$FULL_LOG" | grep -E "vs |Error"
  for layout in "--cfg-parallel-size 2 --all2all-backend all2all" "--tensor-parallel-size 2 --all2all-backend allgather_reducescatter" \
                "--ulysses-degree 2 --all2all-backend all2all"; do
    $T2 $TINY $layout $EP --compare-output "$S/tiny_base.pt" --rtol 1e-4 2>&1 | tee -a "$FULL_LOG" | grep -E "SP=|vs |Error"
  done
  ;;
agreement)
  # Real width, 4 layers, bf16: one GPU; CFG2 + EP2 and TP2 + EP2 vs the previous commit's on two GPUs and vs one
  # GPU; ulysses 2 + EP2 vs one GPU; then fp32 on one GPU (TF32 off) vs bf16 on one GPU: the bf16 floor. 512x512
  # (image_base_size 512: the released 1024 snaps every size to its 1024-pixel buckets) and 10 steps: the fp32 run
  # alone took 258 s.
  R4="--model real-dummy --layers 4 --image-base-size 512 --height 512 --width 512 --steps 10 --no-timing"
  $B $R4 --save-output "$S/real4_1gpu.pt" 2>&1 | tee -a "$FULL_LOG" | tail -1; echo "[${SECONDS} s]"
  # (.ab_base older than the dummy VAE drawn per name, commit 8e9f01d: only the latents compare, not the images.)
  $T2 --package omni_ep_base $R4 $CFG2_EP2 --save-output "$S/real4_cfg2_base.pt" 2>&1 | tee -a "$FULL_LOG" | tail -1
  $T2 $R4 $CFG2_EP2 --compare-output "$S/real4_cfg2_base.pt" "$S/real4_1gpu.pt" 2>&1 | tee -a "$FULL_LOG" | grep -E "SP=|vs |Error"
  TP2_EP2="--tensor-parallel-size 2 $EP --all2all-backend all2all"
  $T2 --package omni_ep_base $R4 $TP2_EP2 --save-output "$S/real4_tp2_base.pt" 2>&1 | tee -a "$FULL_LOG" | tail -1
  $T2 $R4 $TP2_EP2 --compare-output "$S/real4_tp2_base.pt" "$S/real4_1gpu.pt" 2>&1 | tee -a "$FULL_LOG" | grep -E "SP=|vs |Error"
  $T2 $R4 --ulysses-degree 2 $EP --all2all-backend all2all --compare-output "$S/real4_1gpu.pt" 2>&1 | tee -a "$FULL_LOG" | grep -E "SP=|vs |Error"
  echo "[${SECONDS} s]"
  NVIDIA_TF32_OVERRIDE=0 $B $R4 --dtype float32 --compare-output "$S/real4_1gpu.pt" 2>&1 | tee -a "$FULL_LOG" | grep -E "vs |Error"
  echo "[${SECONDS} s]"
  ;;
agreement_fp32)
  # Real width, 4 layers, fp32 (TF32 off; fits one GPU), the Triton experts included: the EP2 layouts vs one GPU
  # (limit 1e-4). 4 steps: 10 steps at 512x512 took 258 s on one GPU.
  R4="--model real-dummy --layers 4 --image-base-size 512 --height 512 --width 512 --steps 4 --no-timing --dtype float32"
  export NVIDIA_TF32_OVERRIDE=0
  $B $R4 --save-output "$S/real4_fp32.pt" 2>&1 | tee -a "$FULL_LOG" | tail -1; echo "[${SECONDS} s]"
  for layout in "--cfg-parallel-size 2 --all2all-backend all2all" "--tensor-parallel-size 2 --all2all-backend allgather_reducescatter"; do
    $T2 $R4 $layout $EP --compare-output "$S/real4_fp32.pt" --rtol 1e-4 2>&1 | tee -a "$FULL_LOG" | grep -E "SP=|vs |Error"
    echo "[${SECONDS} s]"
  done
  ;;
layouts)
  # CFG2 + EP2 eager (the CUDA graph gains nothing there: 11.96 vs 11.93 s in commit 69ef6bf's run), TP2 + EP2 with
  # the cached steps replayed as a CUDA graph, TP2 without EP eager (graph: 13.71 vs 13.66 s).
  FULL="--model real-dummy --layers 32 --height 1024 --width 1024 --steps 50"
  ONLY=" ${*:2} "  # layouts [NAME...]: only those
  sample_clocks layouts
  run() { name=$1; shift; [ "$ONLY" = "  " ] || [[ $ONLY == *" $name "* ]] || return 0
          echo "== $name"; $T2 $FULL "$@" --json "$S/pipeline_2xh200_$name.json" 2>&1 | tee -a "$FULL_LOG" | tail -3; }
  run cfg2_ep2_all2all --cfg-parallel-size 2 $EP --all2all-backend all2all
  run cfg2_ep2_allgather_reducescatter_graph --cfg-parallel-size 2 $EP --all2all-backend allgather_reducescatter --cuda-graph
  run tp2_ep2_all2all_graph --tensor-parallel-size 2 $EP --all2all-backend all2all --cuda-graph
  run tp2_ep2_allgather_reducescatter_graph --tensor-parallel-size 2 $EP --all2all-backend allgather_reducescatter --cuda-graph
  run tp2_no_ep --tensor-parallel-size 2
  # Placement balanced by the loads the balanced stage recorded (32 layers, 64 experts, dummy weights).
  BAL="--expert-placement balanced --expert-loads benchmarks/results/expert_loads_real_dummy_2xh200.json"
  run cfg2_ep2_all2all_balanced $CFG2_EP2 $BAL
  run tp2_ep2_all2all_graph_balanced --tensor-parallel-size 2 $EP --all2all-backend all2all --cuda-graph $BAL
  clocks_per_run layouts
  ;;
nccl_collectives)
  # The model's collectives alone (bench_collectives.py, [4097, 4096] bf16 per rank) under NCCL settings, and
  # what NCCL saw of the machine (NCCL_DEBUG=INFO: transports, channels, protocols) in $OUT/nccl_debug.log.
  C="timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/bench_collectives.py"
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,GRAPH,TUNING $C --iters 3 > "$OUT/nccl_debug.log" 2>&1
  sed -E 's/^.*NCCL INFO //' "$OUT/nccl_debug.log" | grep -E "NCCL version|via |nChannels|Channel 00|NVLS|P2P|proto|Pattern" \
    | sort | uniq -c | head -40
  i=0
  for setting in "" "NCCL_PROTO=Simple" "NCCL_MIN_NCHANNELS=16 NCCL_MIN_P2P_NCHANNELS=16" \
                 "NCCL_PROTO=Simple NCCL_MIN_NCHANNELS=16 NCCL_MIN_P2P_NCHANNELS=16" \
                 "NCCL_MIN_NCHANNELS=32 NCCL_MIN_P2P_NCHANNELS=32" "NCCL_P2P_LEVEL=SYS" \
                 "NCCL_P2P_LEVEL=SYS NCCL_PROTO=Simple NCCL_MIN_NCHANNELS=16 NCCL_MIN_P2P_NCHANNELS=16"; do
    i=$((i + 1)); echo "== ${setting:-default}"
    env $setting $C --json "$S/nccl_collectives_$i.json" 2>&1 | tee -a "$FULL_LOG" | grep -v -E "^W|\*{5}|OMP_NUM"
  done
  ;;
balanced)
  # Expert placement "balanced": the expert loads of one 50-step image (another prompt than the timed one's)
  # recorded under CFG2 + EP2, then linear / balanced / balanced / linear for CFG2 + EP2 all2all (eager) and
  # TP2 + EP2 all2all (CUDA graph) with each GPU's clocks and power per run, and the profile of CFG2 + EP2
  # balanced (about 8 min).
  FULL="--model real-dummy --layers 32 --height 1024 --width 1024 --steps 50"
  LOADS=$OUT/expert_loads_real_dummy_2xh200.json
  $T2 $FULL $CFG2_EP2 --no-timing --record-expert-loads "$LOADS" 2>&1 | tee -a "$FULL_LOG" | grep -E "expert loads|Error"
  BAL="--expert-placement balanced --expert-loads $LOADS"
  sample_clocks balanced
  for layout in cfg2_ep2_all2all tp2_ep2_all2all_graph; do
    flags=$([ $layout = cfg2_ep2_all2all ] && echo "$CFG2_EP2" || echo "--tensor-parallel-size 2 $EP --all2all-backend all2all --cuda-graph")
    i=0
    for placement in linear balanced balanced linear; do
      i=$((i + 1)); echo "== $layout $placement ($i)"
      $T2 $FULL $flags $([ $placement = balanced ] && echo "$BAL") --json "$S/balanced_${layout}_${i}_$placement.json" 2>&1 \
        | tee -a "$FULL_LOG" | tail -1
    done
  done
  clocks_per_run balanced
  timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/profile_step.py $FULL --steps 12 --from-step 3 $CFG2_EP2 $BAL \
    --json "$OUT/profile_2xh200_cfg2_ep2_all2all_balanced.json" 2>&1 | tee -a "$FULL_LOG" | grep -E "window|experts  |nccl  |NCCL"
  ;;
fp8_kernels)
  # The FP8 experts on GPU 0: the GPU tests, then bf16 vs FP8 at EP2's E_local 32 (and 64: one GPU) with the
  # cuBLAS bf16 and FP8 ceilings, in one process.
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -s -m gpu tests/gpu -k fp8 2>&1 | tee -a "$FULL_LOG" | grep -E "^FP8|passed|failed|Error"
  CUDA_VISIBLE_DEVICES=0 timeout 400 python3 benchmarks/bench_moe.py --tokens 8194 16388 --experts 32 64 \
    --contenders triton triton_fp8 --json "$OUT/moe_fp8_h200.json" --table "$OUT/moe_fp8_h200.md" 2>&1 \
    | tee -a "$FULL_LOG" | tail -14
  ;;
fp8)
  # FP8 experts (quantization fp8; not exact). Real width, 4 layers, 512x512, 10 steps, bf16: one GPU exact,
  # one GPU FP8 and CFG2 + EP2 FP8 vs it (latents, image PSNR), after the GPU tests of the FP8 experts. Full size:
  # CFG2 + EP2 all2all FP8 and exact, TP2 + EP2 all2all graph FP8, FP8 on one GPU (the whole model on one H200),
  # TP2 without EP (the ratios' base).
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -s -m gpu tests/gpu -k fp8 2>&1 | tee -a "$FULL_LOG" \
    | grep -E "passed|failed|Error"
  R4="--model real-dummy --layers 4 --image-base-size 512 --height 512 --width 512 --steps 10 --no-timing"
  $B $R4 --save-output "$S/real4_1gpu.pt" 2>&1 | tee -a "$FULL_LOG" | tail -1; echo "[${SECONDS} s]"
  $B $R4 --quantization fp8 --save-output "$S/real4_1gpu_fp8.pt" --compare-output "$S/real4_1gpu.pt" 2>&1 \
    | tee -a "$FULL_LOG" | grep -E "vs |Error"
  $T2 $R4 $CFG2_EP2 --quantization fp8 --compare-output "$S/real4_1gpu_fp8.pt" "$S/real4_1gpu.pt" 2>&1 \
    | tee -a "$FULL_LOG" | grep -E "SP=|vs |Error"; echo "[${SECONDS} s]"
  FULL="--model real-dummy --layers 32 --height 1024 --width 1024 --steps 50"
  sample_clocks fp8
  run() { name=$1; shift; echo "== $name"; $T2 $FULL "$@" --json "$S/pipeline_2xh200_$name.json" 2>&1 | tee -a "$FULL_LOG" | tail -3; }
  run cfg2_ep2_all2all_fp8 $CFG2_EP2 --quantization fp8
  run cfg2_ep2_all2all $CFG2_EP2
  run tp2_ep2_all2all_graph_fp8 --tensor-parallel-size 2 $EP --all2all-backend all2all --cuda-graph --quantization fp8
  echo "== 1gpu_fp8"
  $B $FULL --quantization fp8 --json "$S/pipeline_h200_1gpu_fp8.json" 2>&1 | tee -a "$FULL_LOG" | tail -3
  run tp2_no_ep --tensor-parallel-size 2
  clocks_per_run fp8
  ;;
fp8_profile)
  # The kernel-time breakdown of CFG2 + EP2 all2all with FP8 experts (cached steps 3..11), then FP8 with placement
  # linear / balanced / balanced / linear (the committed loads file) with each GPU's clocks (about 6 min).
  FULL="--model real-dummy --layers 32 --height 1024 --width 1024 --steps 50"
  timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/profile_step.py $FULL --steps 12 --from-step 3 $CFG2_EP2 \
    --quantization fp8 --json "$OUT/profile_2xh200_cfg2_ep2_all2all_fp8.json" 2>&1 | tee -a "$FULL_LOG" | tail -22
  BAL="--expert-placement balanced --expert-loads benchmarks/results/expert_loads_real_dummy_2xh200.json"
  sample_clocks fp8_profile
  i=0
  for placement in linear balanced balanced linear; do
    i=$((i + 1)); echo "== cfg2_ep2_all2all_fp8 $placement ($i)"
    $T2 $FULL $CFG2_EP2 --quantization fp8 $([ $placement = balanced ] && echo "$BAL") \
      --json "$S/fp8_cfg2_ep2_all2all_${i}_$placement.json" 2>&1 | tee -a "$FULL_LOG" | tail -1
  done
  clocks_per_run fp8_profile
  ;;
fp8_graph)
  # The FP8 experts' and the Gluon kernels' GPU tests, then CFG2 + EP2 all2all FP8 balanced with the cached steps as
  # a CUDA graph, eager, and a graph again (about 4 min).
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu tests/gpu -k "fp8 or gluon" 2>&1 | tee -a "$FULL_LOG" \
    | grep -E "passed|failed|Error"
  FULL="--model real-dummy --layers 32 --height 1024 --width 1024 --steps 50"
  BAL="--expert-placement balanced --expert-loads benchmarks/results/expert_loads_real_dummy_2xh200.json"
  i=0
  for graph in --cuda-graph "" --cuda-graph; do
    i=$((i + 1)); echo "== cfg2_ep2_all2all_fp8_balanced ${graph:-eager} ($i)"
    $T2 $FULL $CFG2_EP2 --quantization fp8 $BAL $graph --json "$S/fp8_graph_${i}.json" 2>&1 | tee -a "$FULL_LOG" | tail -1
  done
  ;;
distil)
  # Instruct-Distil (dummy weights, 32 layers, 1024x1024, bf16, 8 steps): s/image with the VAE decode, peak memory
  # per rank. One row per prompt, so no CFG parallel: TP2 + EP2 on one prompt, DP2 + EP2 on two (one per rank).
  DISTIL="--model real-dummy --variant instruct-distil --layers 32 --height 1024 --width 1024 --steps 8"
  run() { name=$1; shift; echo "== distil $name"; $T2 $DISTIL "$@" --json "$S/distil_2xh200_$name.json" 2>&1 | tee -a "$FULL_LOG" | tail -3; }
  run tp2_ep2_allgather_reducescatter --tensor-parallel-size 2 $EP --all2all-backend allgather_reducescatter
  run tp2_ep2_all2all --tensor-parallel-size 2 $EP --all2all-backend all2all
  run dp2_ep2_allgather_reducescatter --data-parallel-size 2 $EP --all2all-backend allgather_reducescatter --num-prompts 2
  run dp2_ep2_all2all --data-parallel-size 2 $EP --all2all-backend all2all --num-prompts 2
  run u2_ep2_all2all --ulysses-degree 2 $EP --all2all-backend all2all
  run r2_ep2_all2all --ring-degree 2 $EP --all2all-backend all2all
  ;;
ab)
  # Other commits' packages (make_baseline_package.sh COMMIT NAME, one per NAME) and this one, side by side: the
  # bases then this one, then the reverse order.
  LAYOUT="${*:2}"
  FULL="--model real-dummy --layers 32 --height 1024 --width 1024 --steps 50 ${LAYOUT:-$CFG2_EP2}"
  BASES=$(cd .ab_base && ls -d omni_ep_*/ | tr -d /)
  for pkg in $BASES; do echo "$pkg: $(cat .ab_base/$pkg.COMMIT)"; done
  for i in 1 2; do
    for pkg in $([ $i = 1 ] && echo $BASES omni_ep || echo omni_ep $(echo $BASES | tr ' ' '\n' | tac)); do
      echo "== $pkg ($i)"
      $T2 $FULL --package $pkg --json "$S/ab_${pkg}_$i.json" 2>&1 | tee -a "$FULL_LOG" | tail -1
    done
  done
  ;;
profile)
  # The steady state: cached steps 3..11 (before: the previous commit's package, .ab_base), of the layout NAME
  # (flags LAYOUT, e.g. "tp2_ep2_all2all --tensor-parallel-size 2 --enable-expert-parallel --all2all-backend all2all").
  NAME=${2:-cfg2_ep2_all2all}; LAYOUT="${*:3}"
  if [ -n "${2:-}" ] && [ -z "$LAYOUT" ]; then echo "profile $NAME: give its layout flags after the name" >&2; exit 2; fi
  P="timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/profile_step.py --model real-dummy --layers 32 --height 1024
     --width 1024 --steps 12 --from-step 3 ${LAYOUT:-$CFG2_EP2}"
  $P --package omni_ep_base --json "$S/profile_2xh200_${NAME}_before.json" 2>&1 | tee -a "$FULL_LOG" | tail -20
  $P --json "$S/profile_2xh200_${NAME}.json" 2>&1 | tee -a "$FULL_LOG" | tail -20
  ;;
esac
