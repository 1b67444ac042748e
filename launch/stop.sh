#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Stop the training processes on every worker.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<HELP
Usage: $SCRIPT --name NAME --zone ZONE [--grace SECONDS] [options]

On every worker: SIGTERM the process group that train.sh started (pid in
~/$REMOTE_LOGS/train.pid; on SIGTERM the trainer saves a checkpoint of the current step and
exits), SIGKILL it if it still runs after the grace period, then SIGKILL any other
longrope-jax train from ~/$REMOTE_VENV and remove /tmp/libtpu_lockfile, so the TPU is free
for the next start. The slice keeps running (delete.sh deletes it).

  --grace SECONDS     how long to wait for the checkpoint after SIGTERM (default: 300;
                      0 kills at once)

$COMMON_HELP
HELP
}

GRACE=300
parse_flag() {
    case $1 in
        --grace | --grace=*) take_value "$@" && GRACE=$VALUE ;;
        *) return 1 ;;
    esac
}
parse_args "$@"

require_location
[[ $GRACE =~ ^[0-9]+$ ]] || usage_error "--grace must be a number of seconds, got '$GRACE'"

pid_file=$REMOTE_LOGS/train.pid
# One line of POSIX sh, run on every worker from the home directory. A zombie's cmdline is empty,
# so grep tells a live trainer. The pkill pattern has [l] so as not to match this shell's own
# command line.
remote="set -u; if [ -f $pid_file ]; then pid=\$(cat $pid_file)"
remote+="; if grep -qa longrope-jax \"/proc/\$pid/cmdline\" 2>/dev/null; then kill -s TERM -- \"-\$pid\" 2>/dev/null || kill -s TERM \"\$pid\""
remote+="; i=0; while grep -qa longrope-jax \"/proc/\$pid/cmdline\" 2>/dev/null && [ \$i -lt $GRACE ]; do sleep 1; i=\$((i + 1)); done"
remote+="; kill -s KILL -- \"-\$pid\" 2>/dev/null || true; fi; rm -f $pid_file; fi"
remote+="; pkill -KILL -f \"\$HOME/[l]ongrope_venv/bin/longrope-jax train\" || true; rm -f /tmp/libtpu_lockfile"
remote+="; echo \"\$(hostname): stopped\""
ssh_workers all "$remote"
