#!/usr/bin/env bash
# The GPU check, as one command on a machine with one CUDA GPU and no network.
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--dry-run]
#
# Run from the repository root. DIR (default .whl) holds the cp312 wheels of every
# package the machine lacks (it has Python 3.12, torch and Triton): make it here with
#   ../shared/scripts/wheelhouse-py312.sh .whl hydra-core omegaconf antlr4-python3-runtime \
#       sentencepiece safetensors tqdm pyyaml tokenizers
# Steps: install the wheels into /tmp/site (no index, no deps); `pytest -m gpu` over the
# files that have GPU tests (Triton KD kernels at speed, Transformer Engine builds where
# TE is installed; the other files need packages the GPU machine lacks, e.g. transformers);
# benchmarks/gpu_bench.py (copy bandwidth, the Triton KD kernel and the fused-linear loss
# against it and against materialised logits, BF16 vs FP8 GEMMs at Llama-3.1-8B's layer
# shapes); benchmarks/kd_step.py (one KD step against its parts, TP1 PP1, a Llama-8B-wide
# 4-layer teacher in bf16); a tiny train -> prune -> distill at device=cuda. It fits one 8-minute call.
# --dry-run checks the inputs (the wheels named below, the scripts, python3) and prints
# the commands without running them; the CPU test suite runs it.
set -euo pipefail

WHEELS=.whl
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) echo "error: unknown argument $1 (use --wheels DIR, --dry-run)" >&2; exit 2 ;;
    esac
done

# Wheels the GPU machine does not have (file-name prefixes, as pip names wheels).
REQUIRED=(megatron_core hydra_core omegaconf antlr4_python3_runtime sentencepiece safetensors tqdm psutil einops)

problems=()
command -v python3 >/dev/null || problems+=("python3 is not on PATH")
for script in benchmarks/gpu_bench.py benchmarks/kd_step.py tests/conftest.py minitron_megatron/cli/app.py; do
    [[ -f $script ]] || problems+=("$script not found: run from the repository root")
done
if [[ ! -d $WHEELS ]]; then
    problems+=("--wheels $WHEELS: no such directory (make it with shared/scripts/wheelhouse-py312.sh)")
else
    for name in "${REQUIRED[@]}"; do
        count=$(find "$WHEELS" -maxdepth 1 -iname "${name}-*.whl" | wc -l)
        if [[ $count -eq 0 ]]; then problems+=("--wheels $WHEELS: no ${name}-*.whl"); fi
        if [[ $count -gt 1 ]]; then problems+=("--wheels $WHEELS: $count versions of $name (keep one)"); fi
    done
fi
if [[ ${#problems[@]} -gt 0 ]]; then
    printf 'error: %s\n' "${problems[@]}" >&2
    exit 2
fi

RUN=/tmp/minitron_gpu_check
KD_STEP="kd_step.py --configs 1x1 --hidden 4096 --heads 32 --groups 8 --layers 4 --vocab 128256 --seq 4096 --micro-batch 1 --microbatches 4 --dtype bfloat16 --device cuda"
SMALL=(model=tiny model.num_layers=2 model.seq_length=128 device=cuda data=stdlib
       evaluate.samples=16 evaluate.micro_batch_size=4)
steps=(
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS/*.whl"
    "python3 -m pytest -q -m gpu $(grep -rl 'mark.gpu' tests | sort | tr '\n' ' ')"
    "python3 benchmarks/gpu_bench.py"
    "python3 benchmarks/$KD_STEP"
    "rm -rf $RUN"
    "python3 -m minitron_megatron.train ${SMALL[*]} train.steps=20 train.eval_interval=20 save=$RUN/teacher"
    "python3 -m minitron_megatron.prune ${SMALL[*]} load=$RUN/teacher prune.target.hidden_size=64 prune.importance.calibration_samples=16 save=$RUN/pruned"
    "python3 -m minitron_megatron.distill ${SMALL[*]} teacher.load=$RUN/teacher student.load=$RUN/pruned teacher.precision=fp8 distill.steps=10 distill.eval_interval=10 save=$RUN/student"
)

export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export MINITRON_NO_PROGRESS=1 CUDA_DEVICE_MAX_CONNECTIONS=1
for step in "${steps[@]}"; do
    echo "+ $step"
    if [[ $DRY_RUN == 0 ]]; then
        eval "$step"
    fi
done
if [[ $DRY_RUN == 1 ]]; then
    python3 benchmarks/gpu_bench.py --check >/dev/null
    python3 benchmarks/$KD_STEP --check >/dev/null
    echo "dry run: inputs ok, ${#steps[@]} steps"
fi
