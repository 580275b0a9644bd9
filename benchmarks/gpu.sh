#!/usr/bin/env bash
# The CUDA checks in one command: the CUDA tests (every preconditioner against
# the same run on the CPU), optimizer step cost on the GPU (float32 and
# bfloat16, against Adam/AdamW foreach and fused), Muon's Newton-Schulz
# iteration by precision, the benchmark transformer with TF32 off and on, the
# main job on one GPU under torchrun (python -m torch.distributed.run) with
# nccl, and half-precision training with ElraGradScaler.
# Each check runs even when one before it failed; the failed ones are named at
# the end (exit 1). Without a CUDA device it says so and exits 0 having run nothing.
#     bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch' || { echo "torch is not importable by $(command -v python)"; exit 1; }
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: nothing to run (the CPU benchmarks are benchmarks/*.py)"
    exit 0
fi
python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
failed=()
check() {
    echo; echo "== $*"
    "$@" || failed+=("$*")
}
out=$(mktemp -d)
check python -m pytest -q -p no:cacheprovider tests/test_cuda.py
check python benchmarks/step_cost.py --device cuda --dtype float32
check python benchmarks/step_cost.py --device cuda --dtype bfloat16
check python benchmarks/orthogonalize.py --device cuda
check python benchmarks/tf32.py
check python -m torch.distributed.run --standalone --nproc_per_node=1 launch/train.py --strategy ddp --device cuda --epochs 5 --checkpoint-dir "$out/ckpt"
check python -m torch.distributed.run --standalone --nproc_per_node=1 launch/train.py --strategy fsdp2 --device cuda --epochs 5
for dtype in float16 bfloat16; do
    check python examples/half_precision.py --device cuda --dtype "$dtype" --epochs 5
done
rm -rf "$out"
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all CUDA checks passed"
