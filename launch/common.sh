# shellcheck shell=bash disable=SC2034  # the variables set here are used by the scripts that source it
# Helpers shared by the launch/ scripts. Sourced, never run: argument parsing, quoting, `run`,
# and the layout the scripts give every TPU worker.

set -euo pipefail

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "launch/: needs bash 4.4 or newer (this is $BASH_VERSION; on macOS: brew install bash)" >&2
    exit 1
fi

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
SCRIPT=$(basename "$0")

# On every worker, relative to the login user's home (where `tpu-vm ssh --command` starts).
REMOTE_REPO=longrope_jax      # the code: replaced wholesale by setup.sh
REMOTE_VENV=longrope_venv     # the venv: `pip install -e '.[tpu]'` of REMOTE_REPO
REMOTE_LOGS=longrope_logs     # train.log (appended to by every start) and train.pid

# Settings every script shares: env vars give defaults, flags override them.
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
DRY_RUN=0

die() {
    echo "$SCRIPT: error: $*" >&2
    exit 1
}

usage_error() {
    echo "$SCRIPT: error: $*" >&2
    echo "Try '$SCRIPT --help'." >&2
    exit 2
}

log() {
    echo "[$SCRIPT $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*" >&2
}

# Quote one word for a POSIX shell, as Python's shlex.quote does: bare when it is made only of
# safe characters, otherwise in single quotes with each ' written as '"'"'.
shquote() {
    local s=$1 q="'\"'\"'"
    if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
        printf '%s' "$s"
    else
        printf "'%s'" "${s//\'/$q}"
    fi
}

# Print a command on one line, every word quoted, so it can be copied into a shell.
cmd_line() {
    local out="" word
    for word in "$@"; do
        out+="${out:+ }$(shquote "$word")"
    done
    printf '%s\n' "$out"
}

# Run a command, echoing it to stderr first; with --dry-run, print it to stdout and run nothing.
run() {
    if ((DRY_RUN)); then
        cmd_line "$@"
    else
        printf '+ %s\n' "$(cmd_line "$@")" >&2
        "$@"
    fi
}

# take_value "$@": the value of a `--flag VALUE` or `--flag=VALUE` option at $1. Sets VALUE, and
# TAKEN to how many words it used (for `shift "$TAKEN"`).
take_value() {
    if [[ $1 == *=* ]]; then
        VALUE=${1#*=}
        TAKEN=1
    elif (($# >= 2)); then
        VALUE=$2
        TAKEN=2
    else
        usage_error "$1 needs a value"
    fi
}

# The flags every script takes. Returns 1 when $1 is not one of them. Each script defines usage().
parse_common_flag() {
    case $1 in
        --name | --name=*) take_value "$@" && TPU_NAME=$VALUE ;;
        --zone | --zone=*) take_value "$@" && ZONE=$VALUE ;;
        --project | --project=*) take_value "$@" && PROJECT=$VALUE ;;
        --dry-run) DRY_RUN=1 && TAKEN=1 ;;
        -h | --help) usage && exit 0 ;;
        *) return 1 ;;
    esac
}

# The slice type flags of create.sh and babysit.sh. Returns 1 when $1 is not one of them.
parse_slice_flag() {
    case $1 in
        --accelerator | --accelerator=*) take_value "$@" && ACCELERATOR=$VALUE ;;
        --version | --version=*) take_value "$@" && RUNTIME_VERSION=$VALUE ;;
        *) return 1 ;;
    esac
}

# parse_flag "$@": a script's own options. A script that has some redefines it to take the option
# at $1, setting TAKEN to the words it used as take_value does (TAKEN=$# ends the parsing), or to
# return 1 when $1 is not one of them. This one knows none.
parse_flag() {
    return 1
}

# parse_args "$@": read a script's whole command line, in order: each option goes to parse_flag,
# then to the common flags; anything else is a usage error (exit 2).
parse_args() {
    while (($#)); do
        parse_flag "$@" || parse_common_flag "$@" || usage_error "unknown argument: $1"
        shift "$TAKEN"
    done
}

COMMON_HELP="Common options (every script):
  --name NAME         TPU VM (slice) name                    [env TPU_NAME]
  --zone ZONE         e.g. us-central2-b                     [env ZONE]
  --project PROJECT   GCP project (default: gcloud's)        [env PROJECT]
  --dry-run           print the commands, one per line and shell-quoted; run nothing
  -h, --help          this help"

# require VAR FLAG [ENV]: usage error (exit 2) unless $VAR is set.
require() {
    local var=$1 flag=$2 env=${3:-}
    [[ -n ${!var} ]] || usage_error "$flag is required${env:+ (or set $env)}"
}

# Check the common settings and set LOCATION, the zone/project flags of every gcloud command.
require_location() {
    require TPU_NAME --name TPU_NAME
    require ZONE --zone ZONE
    LOCATION=("--zone=$ZONE")
    if [[ -n $PROJECT ]]; then
        LOCATION+=("--project=$PROJECT")
    fi
}

# Check the slice type settings of create.sh and babysit.sh (after require_location).
require_slice_type() {
    require ACCELERATOR --accelerator ACCELERATOR
    require RUNTIME_VERSION --version RUNTIME_VERSION
}

# ssh_workers WORKER COMMAND: run a shell command line on one worker (0, 1, ...) or on all.
ssh_workers() {
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" "--worker=$1" --quiet "--command=$2"
}

# Options forwarded to another launch/ script (babysit.sh calls the others).
common_forward() {
    FORWARD=(--name "$TPU_NAME" --zone "$ZONE")
    if [[ -n $PROJECT ]]; then
        FORWARD+=(--project "$PROJECT")
    fi
    if ((DRY_RUN)); then
        FORWARD+=(--dry-run)
    fi
}

# pack_source DIR TARBALL: the checkout at DIR as a .tgz, without venv, runs, checkpoints, git, caches.
pack_source() {
    [[ -f $1/setup.cfg && -d $1/longrope_jax ]] ||
        usage_error "--source $1 is not a longrope_jax checkout (no setup.cfg and longrope_jax/ there)"
    run env COPYFILE_DISABLE=1 tar -czf "$2" \
        --exclude=./.venv --exclude=./runs --exclude=./checkpoints --exclude=./.git --exclude=./build --exclude=./dist \
        --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache -C "$1" .
}
