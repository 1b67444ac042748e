#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Show the training log of one worker (or of all).
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<HELP
Usage: $SCRIPT --name NAME --zone ZONE [--worker N] [--lines N] [--no-follow] [options]

Print the end of ~/$REMOTE_LOGS/train.log on a worker and keep following it (Ctrl-C to quit).

  --worker N          which worker: 0, 1, ... or all (default: 0, which logs metrics)
  --lines N           how many lines from the end to start with (default: 100)
  --no-follow         print them and return

$COMMON_HELP
HELP
}

WORKER=0
LINES=100
FOLLOW=1
parse_flag() {
    case $1 in
        --worker | --worker=*) take_value "$@" && WORKER=$VALUE ;;
        --lines | --lines=*) take_value "$@" && LINES=$VALUE ;;
        --no-follow) FOLLOW=0 && TAKEN=1 ;;
        *) return 1 ;;
    esac
}
parse_args "$@"

require_location
[[ $WORKER =~ ^([0-9]+|all)$ ]] || usage_error "--worker must be a number or all, got '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || usage_error "--lines must be a number, got '$LINES'"

tail_cmd="tail -n $LINES"
if ((FOLLOW)); then
    tail_cmd+=" -F"
fi
ssh_workers "$WORKER" "$tail_cmd $REMOTE_LOGS/train.log"
