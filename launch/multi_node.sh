#!/usr/bin/env bash
# Several machines: run this on every node with the same NNODES and RDZV_ENDPOINT (host:port of node 0).
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0:29500 ./launch/multi_node.sh --strategy fsdp2 --device cuda
# Add MAX_RESTARTS=3 to let torchrun restart the job from its newest checkpoint after a failure.
set -euo pipefail
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT (host:port of node 0)}"
exec torchrun \
    --nnodes="$NNODES" \
    --nproc_per_node="${NPROC:-1}" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$RDZV_ENDPOINT" \
    --rdzv_id="${RDZV_ID:-elra}" \
    --max_restarts="${MAX_RESTARTS:-0}" \
    "$(dirname "$0")/train.py" "$@"
