#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Keep a training run alive on a Spot/preemptible slice: recreate, reinstall and restart it after
# every preemption, until the trainer marks the run done.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<HELP
Usage: $SCRIPT --name NAME --zone ZONE --accelerator TYPE --version RUNTIME
       --config FILE --workdir gs://BUCKET/RUN [create, setup and train options] [options]

Every --interval seconds:
  1. gsutil -q stat WORKDIR/DONE: the trainer writes it after its last checkpoint -> exit 0.
  2. gcloud compute tpus tpu-vm describe --format='value(state)':
     READY, CREATING and the like: nothing to do (the training runs, or the slice is on its way);
     PREEMPTED, TERMINATED, or no such slice: delete.sh (unless missing), create.sh, setup.sh,
     train.sh, with the same options every time. The trainer resumes from the latest
     checkpoint in WORKDIR. If one of those steps fails, the next check starts over, whatever
     the state. After --max-restarts such recoveries, the next one gives up: exit 1.
Start it with no slice at all and its first recovery creates and starts everything, or start
it once the run is going. It watches the slice, not the trainer: a trainer that crashed on a
READY slice stays down (see logs.sh). In copy mode the checkout is packed once, at start, and
every recovery ships that same snapshot.

  --interval SECONDS  between checks (default: 300)
  --max-restarts N    recoveries allowed, the first creation included (default: 10)
  --done-marker NAME  the object under WORKDIR that marks the run done (default: DONE)
  --delete-when-done  delete the slice once the marker is there
Passed to create.sh: --accelerator, --version, --spot, --preemptible, --create-arg
Passed to setup.sh:  --source, --tarball, --git, --ref, --python, --after-install
Passed to train.sh:  --config, --workdir, --config.a.b=VALUE, --env, -- ARGS
(see their --help). With --dry-run: print the checks, then the commands of one recovery.

$COMMON_HELP
HELP
}

INTERVAL=300
MAX_RESTARTS=10
DONE_MARKER=DONE
DELETE_WHEN_DONE=0
SCHEDULING=()
CREATE_ARGS=()
SOURCE=""
TARBALL=""
GIT_URL=""
SETUP_ARGS=()
CONFIG=""
WORKDIR=""
TRAIN_ARGS=()
parse_flag() {
    case $1 in
        --interval | --interval=*) take_value "$@" && INTERVAL=$VALUE ;;
        --max-restarts | --max-restarts=*) take_value "$@" && MAX_RESTARTS=$VALUE ;;
        --done-marker | --done-marker=*) take_value "$@" && DONE_MARKER=$VALUE ;;
        --delete-when-done) DELETE_WHEN_DONE=1 && TAKEN=1 ;;
        --spot | --preemptible) SCHEDULING+=("$1") && TAKEN=1 ;;
        --create-arg | --create-arg=*) take_value "$@" && CREATE_ARGS+=(--create-arg "$VALUE") ;;
        --source | --source=*) take_value "$@" && SOURCE=$VALUE ;;
        --tarball | --tarball=*) take_value "$@" && TARBALL=$VALUE ;;
        --git | --git=*) take_value "$@" && GIT_URL=$VALUE ;;
        --ref | --ref=* | --python | --python=* | --after-install | --after-install=*)
            take_value "$@" && SETUP_ARGS+=("${1%%=*}" "$VALUE")
            ;;
        --config | --config=*) take_value "$@" && CONFIG=$VALUE ;;
        --workdir | --workdir=*) take_value "$@" && WORKDIR=$VALUE ;;
        --config.*) TRAIN_ARGS+=("$1") && TAKEN=1 ;;
        --env | --env=*) take_value "$@" && TRAIN_ARGS+=(--env "$VALUE") ;;
        --) TRAIN_ARGS+=("$@") && TAKEN=$# ;;
        *) parse_slice_flag "$@" ;;
    esac
}
parse_args "$@"

# Check everything now, not at the first preemption hours later.
require_location
require_slice_type
require CONFIG --config
require WORKDIR --workdir
[[ $WORKDIR == gs://* ]] || usage_error "--workdir must be gs://...: a recreated slice keeps nothing else"
[[ $INTERVAL =~ ^[0-9]+$ ]] || usage_error "--interval must be a number of seconds, got '$INTERVAL'"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || usage_error "--max-restarts must be a number, got '$MAX_RESTARTS'"
[[ -n $DONE_MARKER ]] || usage_error "--done-marker must not be empty"
WORKDIR=${WORKDIR%/}
DONE_URL=$WORKDIR/$DONE_MARKER

common_forward
CREATE=("$LAUNCH_DIR/create.sh" "${FORWARD[@]}" --accelerator "$ACCELERATOR" --version "$RUNTIME_VERSION"
    "${SCHEDULING[@]}" "${CREATE_ARGS[@]}")
SETUP=("$LAUNCH_DIR/setup.sh" "${FORWARD[@]}" "${SETUP_ARGS[@]}")
TRAIN=("$LAUNCH_DIR/train.sh" "${FORWARD[@]}" --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")
DELETE=("$LAUNCH_DIR/delete.sh" "${FORWARD[@]}")
DESCRIBE=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" '--format=value(state)')
if [[ -n $GIT_URL ]]; then
    [[ -z $SOURCE$TARBALL ]] || usage_error "--git excludes --source and --tarball"
    SETUP+=(--git "$GIT_URL")
elif [[ -n $TARBALL ]]; then
    [[ -z $SOURCE ]] || usage_error "--source and --tarball exclude each other"
    SETUP+=(--tarball "$TARBALL")
fi
# Let each script check its own options now (a usage error exits 2 here, not at a preemption).
# --dry-run goes first: anything after a -- is for the trainer.
check() {
    "$1" --dry-run "${@:2}" >/dev/null
}
check "${CREATE[@]}"
check "${TRAIN[@]}"
if [[ -z $GIT_URL && -z $TARBALL ]]; then
    # Copy mode: pack the checkout once, so that every recovery ships the same code.
    check "${SETUP[@]}" --source "${SOURCE:-$REPO_ROOT}"
    TARBALL=${TMPDIR:-/tmp}/longrope_jax-$TPU_NAME-babysit.tgz
    pack_source "${SOURCE:-$REPO_ROOT}" "$TARBALL"
    SETUP+=(--tarball "$TARBALL")
else
    check "${SETUP[@]}"
    if ((!DRY_RUN)) && [[ -n $TARBALL && ! -f $TARBALL ]]; then
        usage_error "--tarball $TARBALL: no such file"
    fi
fi

if ((DRY_RUN)); then
    cmd_line gsutil -q stat "$DONE_URL"
    cmd_line "${DESCRIBE[@]}"
    "${DELETE[@]}"
    "${CREATE[@]}"
    "${SETUP[@]}"
    "${TRAIN[@]}"
    exit 0
fi

ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT

# The slice's state, MISSING when gcloud says there is no such slice, UNKNOWN when it fails
# otherwise (network, auth, quota...): that must never delete a healthy slice.
slice_state() {
    local state
    if state=$("${DESCRIBE[@]}" 2>"$ERR"); then
        echo "${state:-UNKNOWN}"
    elif grep -qiE 'NOT_FOUND|not found' "$ERR"; then
        echo MISSING
    else
        log "describe failed: $(tr '\n' ' ' <"$ERR")"
        echo UNKNOWN
    fi
}

recover() {
    if [[ $1 != MISSING ]]; then
        "${DELETE[@]}" || log "delete failed; trying to create anyway"
    fi
    "${CREATE[@]}" && "${SETUP[@]}" && "${TRAIN[@]}"
}

restarts=0
failed=0
log "watching $TPU_NAME ($ZONE) every ${INTERVAL}s until $DONE_URL exists, at most $MAX_RESTARTS recoveries"
while true; do
    if gsutil -q stat "$DONE_URL"; then
        log "$DONE_URL exists: the run is done"
        if ((DELETE_WHEN_DONE)); then
            "${DELETE[@]}" || log "could not delete $TPU_NAME; delete it with launch/delete.sh"
        fi
        exit 0
    fi
    state=$(slice_state)
    case $state in
        PREEMPTED | TERMINATED | MISSING) needs_recovery=1 ;;
        *) needs_recovery=$failed ;;
    esac
    if ((needs_recovery)) && [[ $state != UNKNOWN ]]; then
        if ((restarts >= MAX_RESTARTS)); then
            log "state $state and $restarts of $MAX_RESTARTS recoveries used: giving up"
            exit 1
        fi
        restarts=$((restarts + 1))
        log "state $state: recovery $restarts of $MAX_RESTARTS (delete, create, setup, train)"
        if recover "$state"; then
            failed=0
            log "recovery $restarts done: training restarted"
        else
            failed=1
            log "recovery $restarts failed; the next check starts over"
        fi
    else
        log "state $state"
    fi
    sleep "$INTERVAL"
done
