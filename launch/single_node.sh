#!/usr/bin/env bash
# One machine, NPROC processes (default 2): ./launch/single_node.sh [train.py arguments]
set -euo pipefail
NPROC=${NPROC:-2}
exec torchrun --standalone --nproc_per_node="$NPROC" "$(dirname "$0")/train.py" "$@"
