# The GPU check's steps, sourced by benchmarks/gpu_check.sh (which runs them, records each
# one's status and seconds, and provides run, run_checked, PYTHON, WHEEL_FILES, problems,
# NEEDS and LIMIT). A step is a function step_NAME, listed in STEPS in the order they run;
# NEEDS[NAME] names earlier steps that must have ended ok for it to run; LIMIT[NAME] caps its
# seconds. Commands are argument arrays handed to run / run_checked: nothing is eval'ed.
# shellcheck shell=bash disable=SC2034  # the variables are read by gpu_check.sh

RUN_DIR=/tmp/minitron_gpu_check/runs
SITE=/tmp/site  # the wheels install here; the machine's own packages stay as they are
DEVICE=cuda
TEACHER_PRECISION=fp8
TRAIN_STEPS=20
DISTILL_STEPS=10
KD_STEP_ARGS=(--configs 1x1 --hidden 4096 --heads 32 --groups 8 --layers 4 --vocab 128256 --seq 4096
              --micro-batch 1 --microbatches 4 --dtype bfloat16 --device cuda)
if [[ ${REHEARSE:-0} == 1 ]]; then  # gpu_check.sh --rehearse: the same steps on CPU, at tiny sizes
    RUN_DIR=/tmp/minitron_gpu_check/rehearsal_runs
    SITE=/tmp/minitron_gpu_check/rehearsal_site
    DEVICE=cpu
    TEACHER_PRECISION=bf16  # FP8 GEMMs need compute capability 8.9 (distill refuses them on CPU)
    TRAIN_STEPS=4  # the same code paths (save, eval, resume bookkeeping) in fewer steps
    DISTILL_STEPS=2
    KD_STEP_ARGS=(--configs 1x1 --hidden 256 --heads 4 --groups 2 --layers 2 --vocab 4096 --seq 128
                  --micro-batch 1 --microbatches 2 --repeats 1 --dtype bfloat16 --device cpu)
fi
# The teacher's architecture is for train only: prune and distill load run dirs, whose model.yaml
# is the architecture (a different model.* key given with them is refused).
MODEL=(model=tiny model.num_layers=2)
SMALL=(seq_length=128 "device=$DEVICE" data=stdlib evaluate.samples=16 evaluate.micro_batch_size=4)
# The test files with GPU tests (Triton KD kernels at speed, Transformer Engine builds where
# TE is installed): collecting only these keeps the other files' imports out of the way.
mapfile -t GPU_TESTS < <(grep -rlE --include='*.py' '^[[:space:]]*@pytest\.mark\.gpu' tests | sort)

for script in benchmarks/gpu_bench.py benchmarks/kd_step.py tests/conftest.py minitron_megatron/cli/app.py; do
    [[ -f $script ]] || problems+=("$script not found: run from the repository root")
done
[[ ${#GPU_TESTS[@]} -gt 0 ]] || problems+=("no file under tests/ has a @pytest.mark.gpu test")

export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export MINITRON_NO_PROGRESS=1 CUDA_DEVICE_MAX_CONNECTIONS=1

STEPS=(install gpu_tests gpu_bench kd_step train prune distill)
NEEDS[prune]=train
NEEDS[distill]="train prune"
# Caps against a hang, not estimates; the runner also stops each at what --budget has left.
LIMIT=([install]=120 [gpu_tests]=180 [gpu_bench]=180 [kd_step]=240 [train]=120 [prune]=120 [distill]=150)
# Skipped by a rehearsal (with this reason): what only a GPU can measure.
CUDA_ONLY=([gpu_bench]="copy bandwidth, Triton KD kernel timings and FP8 GEMMs are GPU measurements")

step_install() {
    run rm -rf "$SITE"
    run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${WHEEL_FILES[@]}"
}

step_gpu_tests() {
    run "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
}

step_gpu_bench() {
    # Copy bandwidth; the Triton KD kernel and the fused-linear loss against it and against
    # materialised logits; BF16 vs FP8 GEMMs at Llama-3.1-8B's layer shapes.
    run_checked "$PYTHON" benchmarks/gpu_bench.py
}

step_kd_step() {
    # One KD step against its parts, TP1 PP1, a Llama-8B-wide 4-layer teacher in bf16.
    run_checked "$PYTHON" benchmarks/kd_step.py "${KD_STEP_ARGS[@]}"
}

step_train() {
    run rm -rf "$RUN_DIR"
    run "$PYTHON" -m minitron_megatron.train "${MODEL[@]}" "${SMALL[@]}" "train.steps=$TRAIN_STEPS" "train.eval_interval=$TRAIN_STEPS" \
        "save=$RUN_DIR/teacher"
}

step_prune() {
    run "$PYTHON" -m minitron_megatron.prune "${SMALL[@]}" "load=$RUN_DIR/teacher" prune.target.hidden_size=64 \
        prune.importance.calibration_samples=16 "save=$RUN_DIR/pruned"
}

step_distill() {
    run "$PYTHON" -m minitron_megatron.distill "${SMALL[@]}" "teacher.load=$RUN_DIR/teacher" \
        "student.load=$RUN_DIR/pruned" "teacher.precision=$TEACHER_PRECISION" "distill.steps=$DISTILL_STEPS" "distill.eval_interval=$DISTILL_STEPS" \
        "save=$RUN_DIR/student"
}
