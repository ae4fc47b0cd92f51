# shellcheck shell=bash
# Shared by the launch/*.sbatch scripts (sourced, never run): find the repository, activate .venv,
# stage LMDBs on node-local scratch, record what ran, run a trainer under srun and requeue it when it
# exits 75 (checkpoint written after SIGUSR1/SIGTERM).
#
# Signals: SIGUSR1 (`#SBATCH --signal=B:USR1@...`) and SIGTERM to the batch shell are passed on to the
# trainers as SIGUSR1 (srun forwards SIGUSR1 to its tasks but turns a SIGTERM into SIGKILL of them); the
# shell then waits for them to checkpoint and requeues the job. SLURM's preemption (PreemptMode=REQUEUE
# with a GraceTime) and `scancel --signal=TERM JOB` signal the tasks directly, which works the same.
# `scancel --signal=TERM --full` also signals srun itself, which then kills its tasks at once: avoid it.
#
# Environment read here (all optional):
#   ENKI_HOME              the repository; the sbatch scripts default it to where they were submitted from
#   ENKI_VENV              virtual environment to activate (default $ENKI_HOME/.venv when it exists)
#   ENKI_COPY_TO_SCRATCH=1 copy --train_database/--test_database to node-local scratch first (once per node)
#   ENKI_SCRATCH           scratch folder for that copy (default $TMPDIR, else /tmp); removed at exit
#   ENKI_TRAINER           python script run instead of the default trainer (a custom or stub trainer
#                          taking the same flags; the tests use a stub)
#   ENKI_SNAPSHOT_GIT=0    do not record `git describe`/`git diff` in the launch snapshot
# Exit codes of the trainers this file knows: 75 = preempted with a checkpoint written (requeued here).
# They are enki_seg/exit_codes.py's (PREEMPTED; BAD_INPUT for enki_die), written out because this file
# is sourced before Python is set up; tests/test_launch.py checks that the two agree.

ENKI_PREEMPTED_EXIT_CODE=75
enki_trainer_pid=""
enki_signal_pending=""
enki_scratch_dir=""

enki_log() { echo "[launch $(date +%H:%M:%S)] $*" >&2; }
enki_die() { enki_log "error: $*"; exit 2; }

# enki_init: activate the environment and install the signal handlers; call once, first.
enki_init() {
    [ -n "${ENKI_HOME:-}" ] || enki_die "ENKI_HOME is not set"
    [ -f "$ENKI_HOME/launch/common.sh" ] || enki_die "ENKI_HOME=$ENKI_HOME is not the repository"
    local venv="${ENKI_VENV:-$ENKI_HOME/.venv}"
    if [ -f "$venv/bin/activate" ]; then
        set +u  # activate scripts read unset variables
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
        set -u
    fi
    export PYTHONUNBUFFERED=1  # log lines reach the job's output file as they are written
    # With `#SBATCH --signal=B:USR1@...` SLURM signals this shell only; pass the signal on to srun,
    # which forwards it to every task. A SIGTERM to this shell (`scancel --batch --signal=TERM`, a
    # preemption that signals the batch step) would otherwise end it at once, leaving no one to requeue.
    trap 'enki_forward_signal USR1' USR1
    trap 'enki_forward_signal TERM' TERM
    trap 'enki_cleanup' EXIT
}

enki_forward_signal() {
    local sig="$1"
    if [ -n "$enki_trainer_pid" ] && kill -0 "$enki_trainer_pid" 2>/dev/null; then
        # always as SIGUSR1: srun answers SIGTERM by SIGKILLing its tasks (the trainers treat both alike)
        enki_log "received SIG$sig: forwarding SIGUSR1 to the trainer (it checkpoints and exits $ENKI_PREEMPTED_EXIT_CODE)"
        kill -USR1 "$enki_trainer_pid" 2>/dev/null || true
    else
        enki_log "received SIG$sig before the trainer started: the job will be requeued"
        enki_signal_pending="$sig"
    fi
}

enki_on_all_nodes() {  # run a command once per node of the job (just here outside SLURM)
    if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
        srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 \
            --kill-on-bad-exit=1 "$@"
    else
        "$@"
    fi
}

enki_cleanup() {
    if [ -n "$enki_scratch_dir" ]; then
        enki_log "removing the scratch copies in $enki_scratch_dir"
        timeout 120 bash -c "$(declare -f enki_on_all_nodes); enki_on_all_nodes rm -rf $(printf %q "$enki_scratch_dir")" \
            >/dev/null 2>&1 || enki_log "could not remove $enki_scratch_dir"
        enki_scratch_dir=""
    fi
}

# enki_config_value CONFIG KEY: the value of KEY in a JSON/YAML config file (empty when absent)
enki_config_value() {
    [ -n "$1" ] && [ -f "$1" ] || return 0
    python - "$1" "$2" <<'EOF'
import json, sys
try:
    import yaml
    values = yaml.safe_load(open(sys.argv[1])) or {}
except ImportError:  # JSON configs still work without PyYAML
    values = json.load(open(sys.argv[1]))
value = values.get(sys.argv[2]) if isinstance(values, dict) else None
print("" if value is None else value)
EOF
}

# enki_flag_value NAME ARGS...: the value of --NAME in ARGS (both `--NAME V` and `--NAME=V`)
enki_flag_value() {
    local name="--$1"; shift
    while [ "$#" -gt 0 ]; do
        case "$1" in
            "$name") echo "${2:-}"; return 0 ;;
            "$name"=*) echo "${1#*=}"; return 0 ;;
        esac
        shift
    done
}

# enki_replace_flag NAME VALUE ARGS...: prints ARGS (NUL-separated) with --NAME set to VALUE
enki_replace_flag() {
    local name="--$1" value="$2" found=""; shift 2
    while [ "$#" -gt 0 ]; do
        case "$1" in
            "$name") printf '%s\0%s\0' "$name" "$value"; found=1; shift 2; continue ;;
            "$name"=*) printf '%s\0%s\0' "$name" "$value"; found=1; shift; continue ;;
        esac
        printf '%s\0' "$1"
        shift
    done
    [ -n "$found" ] || printf '%s\0%s\0' "$name" "$value"
}

# enki_stage_databases CONFIG: with ENKI_COPY_TO_SCRATCH=1, copy the train/test LMDBs (from the flags
# in ENKI_ARGS, else from CONFIG) to node-local scratch on every node and point ENKI_ARGS at the copies.
enki_stage_databases() {
    [ "${ENKI_COPY_TO_SCRATCH:-0}" = 1 ] || return 0
    local config="$1" name source target
    # keyed by job id, so a requeued job (same id) gets the same paths and resumes without a settings change
    enki_scratch_dir="${ENKI_SCRATCH:-${TMPDIR:-/tmp}}/enki-${SLURM_JOB_ID:-$$}"
    for name in train_database test_database; do
        source="$(enki_flag_value "$name" "${ENKI_ARGS[@]}")"
        [ -n "$source" ] || source="$(enki_config_value "$config" "$name")"
        [ -n "$source" ] || continue
        [ -d "$source" ] || enki_die "--$name $source does not exist"
        target="$enki_scratch_dir/${name%_database}/$(basename "$source")"
        enki_log "copying $source to $target on ${SLURM_JOB_NUM_NODES:-1} node(s)"
        # shellcheck disable=SC2016  # $1/$2 expand in the inner shell
        enki_on_all_nodes bash -c 'rm -rf "$2" && mkdir -p "$(dirname "$2")" && cp -r "$1" "$2"' _ "$source" "$target" \
            || enki_die "copying $source to node-local scratch failed"
        mapfile -d '' ENKI_ARGS < <(enki_replace_flag "$name" "$target" "${ENKI_ARGS[@]}")
    done
}

# enki_default_reader_count CONFIG: add --reader_count from the CPUs of the task when neither the flags
# nor CONFIG set it: (CPUs per task - 1 for the trainer) / GPUs of the task, at least 1.
enki_default_reader_count() {
    local config="$1"
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] || return 0
    [ -z "$(enki_flag_value reader_count "${ENKI_ARGS[@]}")" ] || return 0
    [ -z "$(enki_config_value "$config" reader_count)" ] || return 0
    local gpus="${SLURM_GPUS_ON_NODE:-1}"
    [ "$gpus" -ge 1 ] 2>/dev/null || gpus=1
    local readers=$(( (SLURM_CPUS_PER_TASK - 1) / gpus ))
    [ "$readers" -ge 1 ] || readers=1
    ENKI_ARGS+=(--reader_count "$readers")
}

# enki_launch_dir OUTPUT_DIR: OUTPUT_DIR/launch/<job id>-<restart count>, the record of this start
# enki_snapshot OUTPUT_DIR CONFIG COMMAND...: record this launch there
enki_launch_dir() { echo "$1/launch/${SLURM_JOB_ID:-local-$$}-${SLURM_RESTART_COUNT:-0}"; }

enki_snapshot() {
    local output_dir="$1" config="$2"; shift 2
    local folder
    folder="$(enki_launch_dir "$output_dir")"
    mkdir -p "$folder"
    [ -n "$config" ] && [ -f "$config" ] && cp "$config" "$folder/"
    printf '%q ' "$@" >"$folder/command.txt"
    echo >>"$folder/command.txt"
    { env | grep '^SLURM' | sort; } >"$folder/slurm_env.txt" || true
    if [ "${ENKI_SNAPSHOT_GIT:-1}" != 0 ] && command -v git >/dev/null; then
        # GIT_OPTIONAL_LOCKS=0: never write the index of a checkout someone may be using
        GIT_OPTIONAL_LOCKS=0 git -C "$ENKI_HOME" describe --always --dirty >"$folder/git_describe.txt" 2>/dev/null \
            || echo unknown >"$folder/git_describe.txt"
        GIT_OPTIONAL_LOCKS=0 git -C "$ENKI_HOME" diff HEAD >"$folder/git_diff.patch" 2>/dev/null || true
    else
        echo unknown >"$folder/git_describe.txt"
    fi
    enki_log "launch recorded in $folder"
}

enki_requeue_and_exit() {
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        enki_log "preempted outside SLURM: rerun the same command to resume"
        exit "$ENKI_PREEMPTED_EXIT_CODE"
    fi
    enki_cleanup
    enki_log "requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}); it resumes from the checkpoint"
    if ! timeout 60 scontrol requeue "$SLURM_JOB_ID"; then
        enki_log "scontrol requeue failed (job cancelled, or the cluster forbids requeue): resubmit to resume"
        exit "$ENKI_PREEMPTED_EXIT_CODE"
    fi
    exit 0
}

# enki_step_code CODE EXIT_DIR: the exit code of a step from the codes its tasks recorded (launch/task.py):
# the lowest rank's failure (< 128, not 0 or 75) if any, else 75 if a task checkpointed, else CODE.
# srun alone reports the highest code, e.g. 143 for a task terminated because another one failed, and
# 0 when every task checkpointed (launch/task.py reports 75 to srun as 0 so that srun's
# --kill-on-bad-exit cannot kill the chief while it still writes its checkpoint).
enki_step_code() {
    local code="$1" exit_dir="$2" file task_code preempted=""
    if [ -z "$exit_dir" ] || [ ! -d "$exit_dir" ]; then
        echo "$code"
        return 0
    fi
    while IFS= read -r file; do
        task_code="$(cat "$exit_dir/$file")"
        if [ "$task_code" != 0 ] && [ "$task_code" != "$ENKI_PREEMPTED_EXIT_CODE" ] && [ "$task_code" -lt 128 ]; then
            echo "$task_code"
            return 0
        fi
        [ "$task_code" = "$ENKI_PREEMPTED_EXIT_CODE" ] && preempted=1
    done < <(find "$exit_dir" -maxdepth 1 -name 'task-*.code' -printf '%f\n' | sort -t- -k2 -n)
    if [ -n "$preempted" ]; then
        echo "$ENKI_PREEMPTED_EXIT_CODE"
    else
        echo "$code"
    fi
}

# enki_run_and_requeue COMMAND...: run COMMAND (usually `srun ... python trainer`) in the background so
# this shell can forward SIGUSR1 to it; exit 75 -> requeue the job and exit 0; other codes propagate.
# With ENKI_EXIT_DIR set, the code comes from the tasks' records there (enki_step_code).
enki_run_and_requeue() {
    [ -z "$enki_signal_pending" ] || enki_requeue_and_exit
    enki_log "running: $*"
    "$@" &
    enki_trainer_pid=$!
    local code=0
    while true; do
        code=0
        wait "$enki_trainer_pid" || code=$?
        # wait returns early (code > 128) when a trapped signal arrives; the command may still be running
        kill -0 "$enki_trainer_pid" 2>/dev/null || break
    done
    enki_trainer_pid=""
    code="$(enki_step_code "$code" "${ENKI_EXIT_DIR:-}")"
    if [ "$code" = "$ENKI_PREEMPTED_EXIT_CODE" ]; then
        enki_requeue_and_exit
    fi
    if [ "$code" = 0 ]; then
        enki_log "finished"
    else
        enki_log "the command failed with exit code $code"
    fi
    exit "$code"
}

# enki_train TRAINER DISTRIBUTION CONFIG OUTPUT_DIR [FLAGS...]: the body of the train_*.sbatch scripts.
# DISTRIBUTION is passed as --distribution unless empty (single node: the trainer's default).
enki_train() {
    local trainer="$1" distribution="$2"
    local config="${3:-}" output_dir="${4:-}"
    if [ -z "$config" ] || [ -z "$output_dir" ]; then
        enki_die "arguments: CONFIG.yaml OUTPUT_DIR [$trainer flags] (see the launch script's header)"
    fi
    [ -f "$config" ] || enki_die "config file $config does not exist"
    shift 4
    ENKI_ARGS=("$@")
    enki_stage_databases "$config"
    enki_default_reader_count "$config"
    [ -z "$distribution" ] || ENKI_ARGS+=(--distribution "$distribution")
    local script="${ENKI_TRAINER:-$ENKI_HOME/$trainer}"
    local command=(python -u "$script" --config "$config" --output_dir "$output_dir" "${ENKI_ARGS[@]}")
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        # one task per node (#SBATCH --ntasks-per-node=1); a task that fails ends the whole step at once;
        # launch/task.py records each task's own exit code for enki_step_code
        ENKI_EXIT_DIR="$(enki_launch_dir "$output_dir")/exit_codes"
        command=(srun --kill-on-bad-exit=1 python -u "$ENKI_HOME/launch/task.py" --exit_dir "$ENKI_EXIT_DIR" --
                 "${command[@]}")
    fi
    enki_snapshot "$output_dir" "$config" "${command[@]}"
    enki_run_and_requeue "${command[@]}"
}
