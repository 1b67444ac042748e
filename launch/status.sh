#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Show a slice's state and health.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<HELP
Usage: $SCRIPT --name NAME --zone ZONE [options]

Print the slice's state (READY, CREATING, PREEMPTED, ...), health and type:
gcloud compute tpus tpu-vm describe.

$COMMON_HELP
HELP
}

parse_args "$@"

require_location
run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" \
    '--format=table(name.basename(),acceleratorType,state,health)'
