#!/usr/bin/env bash
# Knowledge distillation of one of our pruned students inside Megatron-LM's own pretrain_gpt.py
# loop (tag core_v0.16.1 or core_v0.19.0, the one paired with the installed megatron-core), with
# the drop-in snippet of docs/distill.md for that tag taken verbatim from the doc:
#
#   our train -> runs/teacher, our prune -> runs/pruned, our preprocess -> data/,
#   pretrain_gpt_distill.py = Megatron-LM's pretrain_gpt.py with its __main__ block replaced by
#   the snippet, torchrun of it with `--load runs/pruned/checkpoint` (the teacher comes from
#   runs/teacher/checkpoint inside the snippet), then our evaluate on the checkpoint it saved.
#
# usage: MEGATRON_LM_GIT=/path/to/Megatron-LM/.git examples/megatron_lm/distill.sh [WORK_DIR]
#   knobs (environment): TP PP (default 1 1), NPROC (2), ITERS (5), TEACHER_ARGS (the `train`
#   overrides, default "model=tiny train.steps=20"), PRUNE_ARGS (default
#   prune.target.param_budget=0.5), SAVE (1: --save, then our evaluate of it), EXTRA_ARGS (more
#   pretrain_gpt.py flags, e.g. --bf16), RUN (the run's name, default kd_tp${TP}_pp${PP}), PYTHON.
# Steps 1-3 are skipped when their outputs exist, so PP=1 / PP=2 / TP=2 runs share them.
#
# This runs on CPU over gloo. Two things exist ONLY for that, and a GPU run drops both:
# cpu/sitecustomize.py on PYTHONPATH (patches Megatron-LM's few CUDA calls in every worker, see
# its docstring) and CPU_ARGS below (NO_TE_ARGS are for any machine without Transformer Engine).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=$(mkdir -p "${1:-/tmp/minitron-megatron-lm}" && cd "${1:-/tmp/minitron-megatron-lm}" && pwd)
PYTHON=${PYTHON:-python}
TP=${TP:-1} PP=${PP:-1} NPROC=${NPROC:-2} ITERS=${ITERS:-5} SAVE=${SAVE:-1}
# The tag whose training code goes with the installed megatron-core (core_v0.16.1 with 0.16.x,
# core_v0.19.0 with 0.19.x): minitron_megatron/megatron_compat.py pairs them.
TAG=${TAG:-$(PYTHONPATH="$ROOT" $PYTHON -c 'from minitron_megatron.megatron_compat import MEGATRON_LM_TAG as t; print(t)')}
: "${MEGATRON_LM_GIT:?set MEGATRON_LM_GIT to the git dir of a Megatron-LM clone with tag $TAG}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$WORK"
mkdir -p runs data logs

# 1. A teacher and a pruned student, with our own commands.
[ -f runs/teacher/summary.json ] || $PYTHON -m minitron_megatron.train data=stdlib \
  ${TEACHER_ARGS:-model=tiny train.steps=20} save=runs/teacher
[ -f runs/pruned/summary.json ] || $PYTHON -m minitron_megatron.prune load=runs/teacher data=stdlib \
  ${PRUNE_ARGS:-prune.target.param_budget=0.5} save=runs/pruned

# 2. Training data for Megatron-LM: a Megatron indexed dataset written with the teacher's tokenizer
#    (any text works; here three standard-library modules).
if [ ! -f data/kd_text_document.idx ]; then
  STDLIB=$($PYTHON -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
  $PYTHON -m minitron_megatron.data.preprocess --input "$STDLIB"/{argparse,typing,dataclasses}.py \
    --tokenizer-model runs/teacher/tokenizer.model --output-prefix data/kd_text_document
fi

# 3. Megatron-LM's training code at the tag, without its megatron/core: the installed
#    megatron-core (the release the tag was cut from) is used, `megatron` being a namespace package.
if [ ! -f megatron-lm/pretrain_gpt.py ] || [ "$(cat megatron-lm/TAG 2>/dev/null)" != "$TAG" ]; then
  rm -rf megatron-lm && mkdir -p megatron-lm && echo "$TAG" > megatron-lm/TAG
  # Every package beside megatron/core (the tags differ: megatron/legacy went after 0.16).
  PACKAGES=$(git --git-dir "$MEGATRON_LM_GIT" ls-tree --name-only "$TAG" megatron/ | grep -v '^megatron/core$')
  # shellcheck disable=SC2086
  git --git-dir "$MEGATRON_LM_GIT" archive "$TAG" $PACKAGES pretrain_gpt.py model_provider.py gpt_builders.py \
    | tar -x -C megatron-lm
fi
# The doc has one snippet per tag (pretrain_gpt.py's __main__ block and get_batch differ).
$PYTHON "$HERE/build_script.py" megatron-lm/pretrain_gpt.py "$ROOT/docs/distill.md" megatron-lm/pretrain_gpt_distill.py \
  --tag "$TAG"

# 4. Distil in Megatron-LM's loop: the student's own arguments (its --load), data, schedule.
FLAGS=$($PYTHON -m minitron_megatron.checkpoint.megatron_lm runs/pruned --tp "$TP")  # shell-quoted
eval "STUDENT_ARGS=($FLAGS)"
RUN=${RUN:-kd_tp${TP}_pp${PP}}
CPU_ARGS=(--distributed-backend gloo --use-cpu-initialization)
# No Transformer Engine or Apex here (pip megatron-core only): the local layer spec, whose torch
# norms refuse persist_layer_norm, and none of the fused kernels. A GPU with TE drops these too.
NO_TE_ARGS=(--transformer-impl local --no-persist-layer-norm --no-gradient-accumulation-fusion
  --no-masked-softmax-fusion --no-bias-swiglu-fusion --no-rope-fusion)
rm -rf "runs/$RUN"
SAVE_ARGS=()
[ "$SAVE" = 1 ] && SAVE_ARGS=(--save "runs/$RUN/checkpoint" --save-interval "$ITERS")
# CUDA_DEVICE_MAX_CONNECTIONS=1: Megatron-LM's validate_args requires it at TP>1 on pre-Blackwell GPUs.
CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONPATH="$HERE/cpu:$WORK/megatron-lm:$PYTHONPATH" \
  $PYTHON -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29541}" \
  megatron-lm/pretrain_gpt_distill.py \
  "${STUDENT_ARGS[@]}" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --data-path data/kd_text_document --split 98,2,0 \
  --micro-batch-size 2 --global-batch-size 8 --train-iters "$ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 0 --weight-decay 0.01 --clip-grad 1.0 \
  --eval-iters 1 --eval-interval "$ITERS" --log-interval 1 --seed 1234 \
  "${SAVE_ARGS[@]}" "${CPU_ARGS[@]}" "${NO_TE_ARGS[@]}" ${EXTRA_ARGS:-} 2>&1 | tee "logs/$RUN.log"

# 5. The saved student is a plain GPT checkpoint: our evaluate reads it as a run dir.
echo null > "logs/$RUN.eval.json"
if [ "$SAVE" = 1 ]; then
  cp runs/pruned/model.yaml runs/pruned/tokenizer.model "runs/$RUN/"
  $PYTHON -m minitron_megatron.evaluate load="runs/$RUN" data=stdlib | tail -n 1 > "logs/$RUN.eval.json"
fi
# Last line: the losses Megatron-LM logged and our evaluate's summary, as one JSON object.
$PYTHON "$HERE/read_log.py" "logs/$RUN.log" | $PYTHON -c "
import json, sys
summary = json.load(sys.stdin)
summary.update(tp=$TP, pp=$PP, nproc=$NPROC, evaluate=json.load(open('logs/$RUN.eval.json')))
print(json.dumps(summary))"
