#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete a TPU VM slice (no prompt).
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<HELP
Usage: $SCRIPT --name NAME --zone ZONE [options]

Delete the slice: gcloud compute tpus tpu-vm delete --quiet (no confirmation prompt).
Whatever is on the workers' disks goes with it; checkpoints in a gs:// workdir stay.

$COMMON_HELP
HELP
}

parse_args "$@"

require_location
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
