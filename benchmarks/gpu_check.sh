#!/usr/bin/env bash
# The GPU check, as one command on a machine with one CUDA GPU and no network.
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--status FILE] [--budget SECONDS] [--dry-run]
#                           [--python EXE] [--plan FILE] [--rehearse]
#
# Run from the repository root. DIR (default .whl) holds the wheels of benchmarks/gpu_wheels.txt
# (what the machine lacks: megatron-core, Hydra, ...): make it on a machine with network with
#   benchmarks/wheelhouse.sh .whl
# The steps are in benchmarks/gpu_check_plan.sh (--plan FILE substitutes another plan; the tests
# use a tiny one through this same runner): install the wheels, `pytest -m gpu`,
# benchmarks/gpu_bench.py, benchmarks/kd_step.py, a tiny train -> prune -> distill at device=cuda.
#
# Every step runs whatever the steps before it did, except a step whose NEEDS did not end ok or
# one the time budget no longer has room for: those are skipped, with the reason. Each step runs
# under a time limit (its LIMIT, at most what is left of --budget, default 540 s, so the table
# comes out within a 10-minute call). Its output goes to the console and to a log in
# gpu_check_logs/ beside FILE. At the end, a table of steps, status (ok / FAILED rc=N /
# skipped: why) and seconds; the same as JSON in FILE (default $OUT/gpu_check.json when OUT is
# set, else /tmp/minitron_gpu_check/status.json), rewritten after every step, so a run killed
# from outside leaves what it had measured.
# Exit status: 0 every step ok; 1 a step failed or was skipped; 2 bad inputs (nothing ran).
#
# --rehearse runs the check on CPU as the GPU machine would run it, before any GPU time is spent
# (CI does: .ci/run): --python names a Python 3.12 holding at least the GPU machine's packages
# (.venv-py3.12/bin/python); benchmarks/rehearsal_env.py makes from it a fresh venv that sees only
# the machine's package set (benchmarks/gpu_machine.txt), and every step runs in it with the same
# wheels, installed the same way, at device=cpu, every collective checked for a tensor a GPU run
# would hold on the host (MINITRON_CHECK_COLLECTIVES=1, runtime/device_guard.py). Steps a plan
# marks CUDA_ONLY are skipped with their reason and do not fail it; exit 0 when every other
# step passed. A missing wheel, an import of a package the machine lacks or a collective on a
# host tensor fails here, not on the GPU (tests/test_gpu_check.py shows each).
#
# --dry-run checks the inputs (python, the wheels against gpu_wheels.txt: names and versions,
# one each; the plan's scripts), runs each benchmark's own argument check (--check) and prints
# every step's commands without running them. The CPU test suite runs it.
set -uo pipefail

WHEELS=.whl
PLAN=benchmarks/gpu_check_plan.sh
PYTHON=python3
BUDGET=540
DRY_RUN=0
REHEARSE=0
STATUS_FILE=${OUT:+$OUT/gpu_check.json}
STATUS_FILE=${STATUS_FILE:-/tmp/minitron_gpu_check/status.json}

usage_error() {
    echo "error: $1 (use --wheels DIR, --status FILE, --budget SECONDS, --dry-run, --python EXE, --plan FILE, --rehearse)" >&2
    exit 2
}
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY_RUN=1; shift; continue ;;
        --rehearse) REHEARSE=1; shift; continue ;;
        --wheels | --status | --budget | --python | --plan)
            [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value" ;;
        *) usage_error "unknown argument $1" ;;
    esac
    case $1 in
        --wheels) WHEELS=$2 ;;
        --status) STATUS_FILE=$2 ;;
        --budget) BUDGET=$2 ;;
        --python) PYTHON=$2 ;;
        --plan) PLAN=$2 ;;
    esac
    shift 2
done
[[ $BUDGET =~ ^[0-9]+$ ]] || usage_error "--budget $BUDGET: give whole seconds"
LOG_DIR=$(dirname "$STATUS_FILE")/gpu_check_logs
mkdir -p "$LOG_DIR" || exit 2

# ---------------------------------------------------------------- the rehearsal's machine

export REHEARSE
if [[ $REHEARSE == 1 ]]; then
    if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        usage_error "--rehearse needs --python to be a Python 3.12 holding the GPU machine's packages (e.g. .venv-py3.12/bin/python), not $PYTHON"
    fi
    echo "=== the GPU machine's Python, from $PYTHON"
    if ! rehearsal=$("$PYTHON" benchmarks/rehearsal_env.py "$(dirname "$STATUS_FILE")/rehearsal_env"); then
        echo "error: benchmarks/rehearsal_env.py could not build the rehearsal's environment" >&2
        exit 2
    fi
    printf '%s\n' "$rehearsal"
    PYTHON=$(tail -n 1 <<<"$rehearsal")
    export MINITRON_CHECK_COLLECTIVES=1
fi

# ---------------------------------------------------------------- what a plan's steps call

# run CMD...: one command of a step (a program, not a shell function), printed first. Runs
# under the step's time limit (timeout(1): 124 when it fires), or in a dry run is only printed.
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    [[ $DRY_RUN == 1 ]] && return 0
    timeout --kill-after=15 "$STEP_LIMIT" "$@"
}

# run_checked CMD...: as run, for a script that takes --check (parse the arguments, print the
# plan, exit): the dry run runs it so, and a bad argument fails here rather than on the GPU.
run_checked() {
    if [[ $DRY_RUN == 1 ]]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
        "$@" --check >/dev/null
        return
    fi
    run "$@"
}

# ---------------------------------------------------------------- inputs

problems=()
WHEEL_FILES=()
if ! "$PYTHON" -c "" 2>/dev/null; then
    problems+=("--python $PYTHON does not run")
elif [[ ! -f benchmarks/gpu_wheels.py ]]; then
    problems+=("benchmarks/gpu_wheels.py not found: run from the repository root")
elif wheel_list=$("$PYTHON" benchmarks/gpu_wheels.py --check "$WHEELS"); then  # names its problems
    mapfile -t WHEEL_FILES <<<"$wheel_list"
else
    problems+=("--wheels $WHEELS does not hold the wheels of benchmarks/gpu_wheels.txt (make it with benchmarks/wheelhouse.sh)")
fi

STEPS=()
declare -A NEEDS=() LIMIT=() CUDA_ONLY=()
if [[ ! -f $PLAN ]]; then
    problems+=("--plan $PLAN: no such file")
else
    # shellcheck source=benchmarks/gpu_check_plan.sh
    source "$PLAN" || problems+=("--plan $PLAN: it failed to load")
fi
declare -A seen=()
for name in "${STEPS[@]}"; do
    declare -F "step_$name" >/dev/null || problems+=("--plan $PLAN: step $name has no function step_$name")
    for need in ${NEEDS[$name]:-}; do
        [[ -n ${seen[$need]:-} ]] || problems+=("--plan $PLAN: step $name needs $need, which is not an earlier step")
    done
    seen[$name]=1
done
[[ ${#STEPS[@]} -gt 0 ]] || problems+=("--plan $PLAN: no STEPS")

if [[ ${#problems[@]} -gt 0 ]]; then
    printf 'error: %s\n' "${problems[@]}" >&2
    exit 2
fi

# ---------------------------------------------------------------- the steps

now_us() {
    local t=$EPOCHREALTIME
    echo "${t//[.,]/}"
}
seconds_since() {  # seconds since a now_us value, one decimal
    local us=$(($(now_us) - $1))
    printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
}

declare -A STATUS=() SECONDS_TAKEN=() LOG=()
json_string() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}
write_status() {  # the JSON status file, replaced whole (plain bash: no interpreter needed)
    local name ok=true sep=""
    {
        printf '{"steps": ['
        for name in "${STEPS[@]}"; do
            [[ ${STATUS[$name]:-} == ok || ${STATUS[$name]:-} == "skipped: CUDA only"* ]] || ok=false
            printf '%s\n  {"step": %s, "status": %s, "seconds": %s, "log": %s}' "$sep" "$(json_string "$name")" \
                "$(json_string "${STATUS[$name]:-not run}")" "${SECONDS_TAKEN[$name]:-0}" \
                "$(json_string "${LOG[$name]:-}")"
            sep=,
        done
        printf '],\n "ok": %s, "dry_run": %s, "rehearsal": %s, "budget_s": %s, "plan": %s}\n' "$ok" \
            "$([[ $DRY_RUN == 1 ]] && echo true || echo false)" "$([[ $REHEARSE == 1 ]] && echo true || echo false)" \
            "$BUDGET" "$(json_string "$PLAN")"
    } >"$STATUS_FILE.tmp" && mv -f "$STATUS_FILE.tmp" "$STATUS_FILE"
}

rm -f "$LOG_DIR"/[0-9][0-9]-*.log
export PYTHONUNBUFFERED=1  # step output reaches the console and the log as it happens
started=$(now_us)
index=0
for name in "${STEPS[@]}"; do
    index=$((index + 1))
    reason=""
    for need in ${NEEDS[$name]:-}; do
        [[ ${STATUS[$need]} == ok ]] || reason="needs $need (${STATUS[$need]})"
    done
    left=$((BUDGET - ($(now_us) - started) / 1000000))
    if [[ $REHEARSE == 1 && -n ${CUDA_ONLY[$name]:-} ]]; then
        reason="CUDA only: ${CUDA_ONLY[$name]}"
    elif [[ -z $reason && $DRY_RUN == 0 && $left -lt 10 ]]; then
        reason="the --budget of $BUDGET s is spent"
    fi
    if [[ -n $reason ]]; then
        STATUS[$name]="skipped: $reason"
        echo "=== $name: ${STATUS[$name]}"
        write_status
        continue
    fi
    STEP_LIMIT=${LIMIT[$name]:-$left}
    [[ $STEP_LIMIT -le $left ]] || STEP_LIMIT=$left
    LOG[$name]=$LOG_DIR/$(printf '%02d' "$index")-$name.log
    STATUS[$name]=running
    write_status
    echo "=== $name"
    step_started=$(now_us)
    # A subshell: a step's `exit`, `cd` or variables end with it; set -e ends it at its first
    # failing command.
    (
        set -e
        "step_$name"
    ) 2>&1 | tee "${LOG[$name]}"
    rc=${PIPESTATUS[0]}
    SECONDS_TAKEN[$name]=$(seconds_since "$step_started")
    if [[ $rc == 0 ]]; then
        STATUS[$name]=ok
    elif [[ $DRY_RUN == 0 && ($rc == 124 || $rc == 137) && ${SECONDS_TAKEN[$name]%.*} -ge $STEP_LIMIT ]]; then
        STATUS[$name]="FAILED rc=$rc (timed out at $STEP_LIMIT s)"
    else
        STATUS[$name]="FAILED rc=$rc"
    fi
    write_status
done

echo
[[ $DRY_RUN == 1 ]] && echo "dry run (nothing ran but the benchmarks' --check):"
width=4
for name in "${STEPS[@]}"; do
    [[ ${#name} -le $width ]] || width=${#name}
done
printf '%-*s  %-52s %8s\n' "$width" step status seconds
failed=0
for name in "${STEPS[@]}"; do
    printf '%-*s  %-52s %8s\n' "$width" "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]:--}"
    [[ ${STATUS[$name]} == ok || ${STATUS[$name]} == "skipped: CUDA only"* ]] || failed=1
done
echo "status: $STATUS_FILE, logs: $LOG_DIR/"
if [[ $DRY_RUN == 1 && $failed == 0 ]]; then
    echo "dry run: inputs ok, ${#STEPS[@]} steps"
fi
exit "$failed"
