#!/usr/bin/env bash
# Batched per-image delta optimisation on one GPU: ProGAN 256x256 (random weights), bf16 autocast,
# channels-last, a large batch, torch.compile, against the paper's batch-1 fp32 loop on a few images.
# Prints image-steps/s for both, the speed-up and the final losses of the shared images.
#   bash bench/gpu.sh            (PY=python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# eager first (always works), then compiled (skipped with a note if compilation fails)
"$PY" bench/bench_reconstruct.py --device cuda --resolution 256 --batch 64 --loop-images 4 --steps 100 \
    --bf16 --channels-last
"$PY" bench/bench_reconstruct.py --device cuda --resolution 256 --batch 64 --loop-images 4 --steps 100 \
    --bf16 --channels-last --compile || echo "torch.compile run failed: see above; eager numbers stand"
