#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Install longrope_jax and its venv on every worker of a slice.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<HELP
Usage: $SCRIPT --name NAME --zone ZONE [--source DIR | --tarball FILE | --git URL [--ref REF]] [options]

Put the code on every worker (~/$REMOTE_REPO, replaced wholesale) and install it into a venv
(~/$REMOTE_VENV): pip install -e '.[tpu]'. Stop a running training first (stop.sh).

Where the code comes from (default: --source, this checkout):
  --source DIR        pack DIR into a .tgz (without .venv, runs, checkpoints, .git, caches),
                      scp it to all workers and unpack it there (default: $REPO_ROOT)
  --tarball FILE      ship this .tgz (made by an earlier run) instead of packing again
  --git URL           git clone URL on every worker instead (the workers need access to it)
  --ref REF           with --git: check out this commit, tag or branch (a commit is reproducible)
Other options:
  --python PY         interpreter for the venv, 3.11 or newer (default: python3.11; when it
                      is missing, apt-get installs PY and PY-venv)
  --after-install CMD a shell command to run last on every worker, in ~/$REMOTE_REPO, e.g. to
                      fetch the initial weights (packing leaves out checkpoints/):
                      --after-install 'gsutil -m cp -r gs://B/Llama-2-7b-hf checkpoints/'

$COMMON_HELP
HELP
}

SOURCE=""
TARBALL=""
GIT_URL=""
GIT_REF=""
PYTHON=python3.11
AFTER=""
parse_flag() {
    case $1 in
        --source | --source=*) take_value "$@" && SOURCE=$VALUE ;;
        --tarball | --tarball=*) take_value "$@" && TARBALL=$VALUE ;;
        --git | --git=*) take_value "$@" && GIT_URL=$VALUE ;;
        --ref | --ref=*) take_value "$@" && GIT_REF=$VALUE ;;
        --python | --python=*) take_value "$@" && PYTHON=$VALUE ;;
        --after-install | --after-install=*) take_value "$@" && AFTER=$VALUE ;;
        *) return 1 ;;
    esac
}
parse_args "$@"

require_location
if [[ -n $GIT_URL && -n $SOURCE$TARBALL ]]; then
    usage_error "--git excludes --source and --tarball"
elif [[ -n $SOURCE && -n $TARBALL ]]; then
    usage_error "--source and --tarball exclude each other"
elif [[ -n $GIT_REF && -z $GIT_URL ]]; then
    usage_error "--ref needs --git"
fi
[[ $PYTHON =~ ^python3(\.[0-9]+)?$ ]] || usage_error "--python must be a name like python3.11, got '$PYTHON'"

new=$REMOTE_REPO.new
py=$PYTHON
apt="sudo env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600"
# One line of POSIX sh, run on every worker from the home directory.
remote="set -eu"
remote+="; if ! $py -c \"import ensurepip, venv\" >/dev/null 2>&1; then $apt update && $apt install $py $py-venv; fi"
remote+="; $py -c \"import sys; sys.exit(sys.version_info < (3, 11))\" || { echo \"$py is older than 3.11\" >&2; exit 1; }"
remote+="; rm -rf $new"
if [[ -n $GIT_URL ]]; then
    remote+="; git clone -q $(shquote "$GIT_URL") $new"
    if [[ -n $GIT_REF ]]; then
        remote+="; git -C $new -c advice.detachedHead=false checkout -q $(shquote "$GIT_REF")"
    fi
else
    if [[ -z $TARBALL ]]; then
        TARBALL=${TMPDIR:-/tmp}/longrope_jax-$TPU_NAME.tgz
        pack_source "${SOURCE:-$REPO_ROOT}" "$TARBALL"
    elif ((!DRY_RUN)) && [[ ! -f $TARBALL ]]; then
        usage_error "--tarball $TARBALL: no such file"
    fi
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$REMOTE_REPO.tgz" "${LOCATION[@]}" --worker=all --quiet
    remote+="; mkdir $new; tar -xzf $REMOTE_REPO.tgz -C $new; rm -f $REMOTE_REPO.tgz"
fi
remote+="; rm -rf $REMOTE_REPO; mv $new $REMOTE_REPO"
remote+="; $py -m venv $REMOTE_VENV; $REMOTE_VENV/bin/pip install -q --upgrade pip"
remote+="; cd $REMOTE_REPO; ../$REMOTE_VENV/bin/pip install -q -e \".[tpu]\""
if [[ -n $AFTER ]]; then
    remote+="; ( $AFTER )"
fi
remote+="; echo \"\$(hostname): longrope_jax installed in ~/$REMOTE_VENV\""
ssh_workers all "$remote"
