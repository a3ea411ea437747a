#!/usr/bin/env bash
# Runs g2e on a Cloud TPU VM or a multi-host TPU pod slice.
#
# Usage:
#   launch/tpu_vm.sh [--dry-run] COMMAND [FLAGS] [-- G2E_FLAGS...]
#
# Commands:
#   create   create the TPU VM / pod slice (gcloud compute tpus tpu-vm create)
#   install  copy this checkout (`git archive HEAD`: commit your changes first) to every worker,
#            and install it with the [tpu] extra into a Python 3.11 virtualenv, ~/g2e-venv
#            (python3.11 comes from apt; ~/g2e is replaced)
#   run      run `python -m g2e.main --config=CONFIG --config.workdir=WORKDIR G2E_FLAGS` on all
#            workers at once (--worker=all), streaming their output here; each worker also keeps
#            its output in ~/g2e-run.log. On a pod slice g2e.distributed detects the TPU VM and
#            calls jax.distributed.initialize() itself; process 0 writes logs and reports.
#   up       create, install and run; with --delete-after, delete the slice when the run ends
#   delete   delete the TPU VM / pod slice
#
# Flags (the environment variable in brackets is the default; a flag wins over its variable):
#   --name=NAME              TPU VM name [TPU_NAME] (required)
#   --zone=ZONE              zone, e.g. us-central2-b [TPU_ZONE] (required)
#   --project=PROJECT        Google Cloud project [TPU_PROJECT; else gcloud's core/project]
#   --accelerator-type=TYPE  v4-8, v5litepod-8, v6e-8 (one host); v4-32, v5litepod-16 (several
#                            hosts) [TPU_ACCELERATOR_TYPE, default v4-8]
#   --version=VERSION        TPU software version [TPU_RUNTIME_VERSION, default
#                            tpu-ubuntu2204-base; v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e
#                            for v6e]
#   --spot                   use spot capacity [TPU_SPOT=1]
#   --config=CONFIG          g2e config, relative to the checkout [G2E_CONFIG, default
#                            configs/mmeb.py; configs/mmeb.py:7b for the 7B recipe]
#   --workdir=GS_URL         gs://bucket/path for checkpoints, results and exports: every worker
#                            writes there and it outlives the VM [G2E_WORKDIR] (required for run)
#   --delete-after           with `up`: delete the slice when the run ends, also on failure
#                            [TPU_DELETE_AFTER=1]
#   --dry-run                print the commands instead of running them [DRY_RUN=1]
# Everything after `--` goes to g2e.main unchanged, e.g. -- --config.train.steps=100.
# The config's model_dir and data paths must be readable on every worker.
#
# Example (a 4-host v4-32 slice):
#   launch/tpu_vm.sh up --name=g2e --zone=us-central2-b --accelerator-type=v4-32 \
#     --workdir=gs://my-bucket/g2e/2b --delete-after -- --config.train.steps=1500
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${TPU_SPOT:-0}"
CONFIG="${G2E_CONFIG:-configs/mmeb.py}"
WORKDIR="${G2E_WORKDIR:-}"
DELETE_AFTER="${TPU_DELETE_AFTER:-0}"
DRY_RUN="${DRY_RUN:-0}"
COMMAND=""
G2E_ARGS=()

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

# Prints a command so that it can be pasted into a shell.
print_command() {
  local words=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$arg")
    elif [[ "$arg" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      words+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}'")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

# Runs a command, or only prints it with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    print_command "$@"
  else
    echo "+ $(print_command "$@")" >&2
    "$@"
  fi
}

while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --delete-after) DELETE_AFTER=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; G2E_ARGS=("$@"); break ;;
    create | install | run | up | delete)
      [[ -z "$COMMAND" ]] || die "two commands given: $COMMAND and $1"
      COMMAND="$1" ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$COMMAND" ]] || die "give a command: create, install, run, up or delete (see --help)"
[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
if [[ "$COMMAND" == run || "$COMMAND" == up ]]; then
  [[ "$WORKDIR" == gs://?* ]] || die "--workdir (or G2E_WORKDIR) must be a gs://bucket/path" \
    "URL, got '$WORKDIR': the workers share it and it outlives the VM"
fi

TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || LOCATION+=(--project="$PROJECT")
ARCHIVE="${TMPDIR:-/tmp}/g2e-src-$NAME.tar.gz"

create() {
  local flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ "$SPOT" != 1 ]] || flags+=(--spot)
  run "${TPU[@]}" create "$NAME" "${LOCATION[@]}" "${flags[@]}"
}

install() {
  # In single quotes: ~ and $HOME expand on the worker, not here.
  # shellcheck disable=SC2016,SC2088
  local steps=(
    'set -euo pipefail'
    'sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv'
    'rm -rf ~/g2e && mkdir -p ~/g2e && tar -xzf ~/g2e-src.tar.gz -C ~/g2e'
    '[[ -x ~/g2e-venv/bin/python ]] || python3.11 -m venv ~/g2e-venv'
    '~/g2e-venv/bin/pip install -q -U pip && ~/g2e-venv/bin/pip install -q -e "$HOME/g2e[tpu]"'
  )
  local setup
  setup="$(printf '%s; ' "${steps[@]}")"
  run git -C "$REPO" archive --format=tar.gz --output="$ARCHIVE" HEAD
  run "${TPU[@]}" scp "$ARCHIVE" "$NAME:g2e-src.tar.gz" "${LOCATION[@]}" --worker=all
  run "${TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all --command="${setup%; }"
}

run_g2e() {
  local args=(-m g2e.main --config="$CONFIG" --config.workdir="$WORKDIR" "${G2E_ARGS[@]}")
  local quoted
  quoted="$(printf ' %q' "${args[@]}")"
  # pipefail on the worker so a failing run fails the ssh, and gcloud fails with it.
  run "${TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all \
    --command="set -o pipefail; cd ~/g2e && ~/g2e-venv/bin/python$quoted 2>&1 | tee ~/g2e-run.log"
}

delete() {
  run "${TPU[@]}" delete "$NAME" "${LOCATION[@]}" --quiet
}

case "$COMMAND" in
  create) create ;;
  install) install ;;
  run) run_g2e ;;
  delete) delete ;;
  up)
    if [[ "$DELETE_AFTER" == 1 ]]; then
      if [[ "$DRY_RUN" == 1 ]]; then trap delete EXIT; else trap 'delete || true' EXIT; fi
    fi
    create
    install
    run_g2e
    ;;
esac
