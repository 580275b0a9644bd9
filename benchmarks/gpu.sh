#!/usr/bin/env bash
# The CUDA checks in one command: optimizer step cost on the GPU (float32 and
# bfloat16, against Adam/AdamW foreach and fused), the main job on one GPU
# under torchrun with nccl, and half-precision training with ElraGradScaler.
# Without a CUDA device it says so and exits 0 having run nothing.
#     bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch' || { echo "torch is not importable by $(command -v python)"; exit 1; }
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: nothing to run (the CPU benchmarks are benchmarks/*.py)"
    exit 0
fi
python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
python benchmarks/step_cost.py --device cuda --dtype float32
python benchmarks/step_cost.py --device cuda --dtype bfloat16
out=$(mktemp -d)
torchrun --standalone --nproc_per_node=1 launch/train.py --strategy ddp --device cuda --epochs 5 --checkpoint-dir "$out/ckpt"
torchrun --standalone --nproc_per_node=1 launch/train.py --strategy fsdp2 --device cuda --epochs 5
for dtype in float16 bfloat16; do
    python examples/half_precision.py --device cuda --dtype "$dtype" --epochs 5
done
rm -rf "$out"
