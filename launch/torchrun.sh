#!/usr/bin/env bash
# Launch one minitron-megatron stage under torchrun.
#
#   launch/torchrun.sh NPROC STAGE [hydra overrides...]
#
#   launch/torchrun.sh 4 prune load=runs/teacher data=stdlib parallel.tp=2 parallel.pp=2 \
#       prune.target.hidden_size=96 save=runs/pruned
#
# NPROC is processes (GPUs) on this node; STAGE is one of train, evaluate, prune,
# distill, search, run. Everything after STAGE goes to the Hydra app unchanged.
#
# One node (default): a standalone rendezvous on localhost with a free port, so
# concurrent runs on one machine do not collide.
# Several nodes: run this script once per node with the same environment:
#   NNODES       number of nodes                    (default 1)
#   NODE_RANK    this node's index, 0..NNODES-1     (required when NNODES > 1)
#   MASTER_ADDR  address of node 0, reachable by all (required when NNODES > 1)
#   MASTER_PORT  free TCP port on node 0            (default 29500)
# Other knobs:
#   OMP_NUM_THREADS  threads per process (default: this node's CPUs / NPROC)
#   PYTHON           interpreter that has torch and the package (default: python)
#   DRY_RUN=1        print the command instead of running it
# Under SLURM use launch/slurm/*.sbatch, which set these for you.
set -euo pipefail

STAGES="train evaluate prune distill search run"

usage() {
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
NPROC=$1
STAGE=$2
shift 2

if [[ ! " $STAGES " == *" $STAGE "* ]]; then
    echo "error: STAGE=$STAGE is not a stage; use one of: $STAGES" >&2
    exit 2
fi
if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NPROC=$NPROC must be a positive integer (processes on this node)" >&2
    exit 2
fi

# A checkout that is not pip-installed still runs: put its root on the path.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -d $REPO_ROOT/minitron_megatron ]]; then
    export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# torchrun would force 1 thread per process (with a warning); on CPU-only dry
# runs that starves gloo, so share the node's cores between the processes.
CPUS=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(((CPUS / NPROC) > 0 ? CPUS / NPROC : 1))}
# Megatron orders TP/SP communication and compute on one CUDA queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

NNODES=${NNODES:-1}
if [[ $NNODES -eq 1 ]]; then
    rdzv=(--standalone --nnodes 1)
else
    : "${NODE_RANK:?NODE_RANK must be set when NNODES=$NNODES > 1}"
    : "${MASTER_ADDR:?MASTER_ADDR (address of node 0) must be set when NNODES=$NNODES > 1}"
    # Static rendezvous: node ranks are exactly NODE_RANK, as in Megatron-LM's scripts.
    rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
fi

cmd=("${PYTHON:-python}" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC"
    -m "minitron_megatron.$STAGE" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
