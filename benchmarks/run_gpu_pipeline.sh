#!/usr/bin/env bash
# One device call for the pipeline on one GPU: the CLI on CUDA, then bench_pipeline.py on the tiny checkpoint
# and on a real-width 4-layer dummy model at 1024x1024. Needs the diffusers wheel in .whl/ (see benchmarks/README.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMNI_EP_CACHE=/tmp/omni_cache
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
python3 examples/text_to_image/text_to_image.py --num-inference-steps 10 --output "$OUT/tiny_cuda.png" 2>&1 | grep -v "it/s" | tee "$OUT/cli_tiny_cuda.log"
python3 benchmarks/bench_pipeline.py --model tiny --height 256 --width 256 --steps 10 --json "$OUT/pipeline_tiny.json" 2>&1 | tee "$OUT/pipeline_tiny.log"
python3 benchmarks/bench_pipeline.py --model real-dummy --layers 4 --num-experts 64 --height 1024 --width 1024 --steps 10 \
    --json "$OUT/pipeline_real4.json" 2>&1 | tee "$OUT/pipeline_real4.log"
