#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a Cloud TPU VM slice.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<HELP
Usage: $SCRIPT --name NAME --zone ZONE --accelerator TYPE --version RUNTIME [options]

Create a TPU VM slice: gcloud compute tpus tpu-vm create.

  --accelerator TYPE  accelerator type, e.g. v4-32, v5litepod-256  [env ACCELERATOR]
  --version RUNTIME   TPU software version, e.g. tpu-ubuntu2204-base (v4),
                      v2-alpha-tpuv5-lite (v5e)                    [env RUNTIME_VERSION]
  --spot              a Spot slice (cheaper, can be preempted at any time)
  --preemptible       a preemptible slice (the older kind; at most 24 h)
  --create-arg ARG    one more argument for gcloud, as is (repeatable),
                      e.g. --create-arg=--reserved --create-arg=--network=NET

$COMMON_HELP
HELP
}

SCHEDULING=""
CREATE_ARGS=()
parse_flag() {
    case $1 in
        --spot | --preemptible)
            [[ -z $SCHEDULING || $SCHEDULING == "$1" ]] || usage_error "--spot and --preemptible exclude each other"
            SCHEDULING=$1 && TAKEN=1
            ;;
        --create-arg | --create-arg=*) take_value "$@" && CREATE_ARGS+=("$VALUE") ;;
        *) parse_slice_flag "$@" ;;
    esac
}
parse_args "$@"

require_location
require_slice_type

cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}"
    "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME_VERSION")
if [[ -n $SCHEDULING ]]; then
    cmd+=("$SCHEDULING")
fi
run "${cmd[@]}" "${CREATE_ARGS[@]}"
