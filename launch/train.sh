#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start `longrope-jax train` on every worker at once, detached, logging to a file on each worker.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<HELP
Usage: $SCRIPT --name NAME --zone ZONE --config FILE --workdir DIR [--config.a.b=VALUE ...]
       [options] [-- MORE TRAINER ARGS]

Run on every worker at once (--worker=all; jax.distributed finds the other workers by itself):
  cd ~/$REMOTE_REPO && setsid nohup longrope-jax train --config FILE --workdir DIR [overrides]
with stdout and stderr appended to ~/$REMOTE_LOGS/train.log and the pid in ~/$REMOTE_LOGS/train.pid.
Refuses to start on a worker where that pid is still a running trainer (stop.sh first). The
trainer resumes from the latest checkpoint in DIR, so the same command restarts a run.

  --config FILE       config file, relative to the repo root, e.g. configs/llama2_7b_yarn_64k.py
  --workdir DIR       checkpoints and logs: use gs://BUCKET/RUN (a worker's own disk is
                      neither shared by the workers nor kept when a slice is recreated)
  --config.a.b=VALUE  a config override, passed on as one word (repeatable)
  --env NAME=VALUE    an environment variable for the trainer (repeatable),
                      e.g. --env LIBTPU_INIT_ARGS='--xla_tpu_enable_async_all_gather=true'
  -- ARGS             everything after -- goes to the trainer as is (so --dry-run goes
                      before it)

$COMMON_HELP
HELP
}

CONFIG=""
WORKDIR=""
OVERRIDES=()
ENVS=()
parse_flag() {
    case $1 in
        --config | --config=*) take_value "$@" && CONFIG=$VALUE ;;
        --config.*=*) OVERRIDES+=("$1") && TAKEN=1 ;;
        --config.*) usage_error "override $1 needs a value in the same word: $1=VALUE" ;;
        --workdir | --workdir=*) take_value "$@" && WORKDIR=$VALUE ;;
        --env | --env=*)
            take_value "$@"
            [[ $VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants NAME=VALUE, got '$VALUE'"
            ENVS+=("$VALUE")
            ;;
        --) OVERRIDES+=("${@:2}") && TAKEN=$# ;;
        *) return 1 ;;
    esac
}
parse_args "$@"

require_location
require CONFIG --config
require WORKDIR --workdir
if [[ $WORKDIR != gs://* ]]; then
    log "warning: --workdir $WORKDIR is not on GCS: each worker writes its own, and a recreated slice loses it"
fi

# By its absolute path: stop.sh finds strays by "$HOME/longrope_venv/bin/longrope-jax train".
trainer="\"\$HOME/$REMOTE_VENV/bin/longrope-jax\" $(cmd_line train --config "$CONFIG" --workdir "$WORKDIR" "${OVERRIDES[@]}")"
if ((${#ENVS[@]})); then
    trainer="$(cmd_line env "${ENVS[@]}") $trainer"
fi

log_file=../$REMOTE_LOGS/train.log
pid_file=../$REMOTE_LOGS/train.pid
# One line of POSIX sh, run on every worker from the home directory.
remote="set -eu; mkdir -p $REMOTE_LOGS"
remote+="; cd $REMOTE_REPO || { echo \"\$(hostname): no ~/$REMOTE_REPO; run launch/setup.sh first\" >&2; exit 1; }"
remote+="; if [ -f $pid_file ] && pid=\$(cat $pid_file) && grep -qa longrope-jax \"/proc/\$pid/cmdline\" 2>/dev/null"
remote+="; then echo \"\$(hostname): longrope-jax train already runs as pid \$pid; stop it first (launch/stop.sh)\" >&2; exit 1; fi"
remote+="; echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname) start\" >> $log_file"
remote+="; setsid nohup $trainer >> $log_file 2>&1 < /dev/null & echo \$! > $pid_file"
remote+="; echo \"\$(hostname): started pid \$(cat $pid_file), log ~/$REMOTE_LOGS/train.log\""
ssh_workers all "$remote"
