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
#            (python3.11 comes from apt; ~/g2e is replaced); install Cloud Storage FUSE
#            (gcsfuse, from Google's apt repository) unless the image already has it
#   run      mount the Cloud Storage buckets the run names on every worker (see Buckets), then
#            run `python -m g2e.main --config=CONFIG --config.workdir=/gcs/BUCKET/PATH
#            G2E_FLAGS` on all workers at once (--worker=all), streaming their output here; each
#            worker also keeps its output in ~/g2e-run.log. On a pod slice g2e.distributed
#            detects the TPU VM and calls jax.distributed.initialize() itself; process 0 writes
#            logs and reports.
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
#                            writes there (through the mount, see Buckets) and it outlives the
#                            VM [G2E_WORKDIR] (required for run)
#   --delete-after           with `up`: delete the slice when the run ends, also on failure
#                            [TPU_DELETE_AFTER=1]
#   --dry-run                print the commands instead of running them [DRY_RUN=1]
# Everything after `--` goes to g2e.main, e.g. -- --config.train.steps=100; a gs:// URL there
# is translated to the mounted path like --workdir (see Buckets).
#
# Buckets: g2e reads and writes with local file I/O, so `run` mounts each bucket it is given
# with Cloud Storage FUSE on every worker at /gcs/BUCKET (gcsfuse --implicit-dirs
# --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 --metadata-cache-negative-ttl-secs=0:
# directories made by other workers are seen at once, and checkpoint directories can be
# renamed into place), and passes gs://BUCKET/PATH to g2e as /gcs/BUCKET/PATH. That holds for
# --workdir and for every `--config.KEY=gs://...` after `--`, e.g. the checkpoint and the data:
#   -- --config.model_dir=gs://my-bucket/Qwen2-VL-2B-Instruct \
#      --config.data.eval_dir=gs://my-bucket/MMEB-eval \
#      --config.data.eval_image_root=gs://my-bucket/MMEB-eval
# Other paths must exist on every worker. The slice's service account needs read/write access
# to the buckets (roles/storage.objectUser); mounts stay until the VM restarts, and a later
# `run` reuses them.
#
# Example (a 4-host v4-32 slice):
#   launch/tpu_vm.sh up --name=g2e --zone=us-central2-b --accelerator-type=v4-32 \
#     --workdir=gs://my-bucket/g2e/2b --delete-after -- --config.train.steps=1500
set -euo pipefail

LAUNCHER=tpu_vm.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${TPU_SPOT:-0}"
DELETE_AFTER="${TPU_DELETE_AFTER:-0}"
COMMAND=""
GCS_ROOT=/gcs   # buckets are mounted at $GCS_ROOT/BUCKET on every worker
# Directories other workers made are seen (implicit dirs, no metadata caching), and a
# checkpoint directory written under a temporary name can be renamed into place.
GCSFUSE_FLAGS="--implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0"
GCSFUSE_FLAGS+=" --metadata-cache-negative-ttl-secs=0"
BUCKETS=()      # the buckets `run` mounts

# This launcher's own flags and its command (see common.sh for the shared ones).
parse_flag() {
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --delete-after) DELETE_AFTER=1 ;;
    create | install | run | up | delete)
      [[ -z "$COMMAND" ]] || die "two commands given: $COMMAND and $1"
      COMMAND="$1" ;;
    *) return 1 ;;
  esac
}

parse_args "$@"

[[ -n "$COMMAND" ]] || die "give a command: create, install, run, up or delete (see --help)"
[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
if [[ "$COMMAND" == run || "$COMMAND" == up ]]; then
  [[ "$WORKDIR" == gs://?* ]] || die "--workdir (or G2E_WORKDIR) must be a gs://bucket/path" \
    "URL, got '$WORKDIR': the workers share it and it outlives the VM"
fi

# Sets MOUNTED to where gs://BUCKET/PATH ($1) is on the workers, $GCS_ROOT/BUCKET/PATH, and
# adds BUCKET to the buckets to mount.
mount_path() {
  local url="$1" bucket
  bucket="${url#gs://}"
  bucket="${bucket%%/*}"
  [[ "$bucket" =~ ^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$ ]] ||
    die "'$url' does not start with gs://BUCKET/ and a valid bucket name"
  [[ " ${BUCKETS[*]} " == *" $bucket "* ]] || BUCKETS+=("$bucket")
  MOUNTED="$GCS_ROOT/${url#gs://}"
}

if [[ "$COMMAND" == run || "$COMMAND" == up ]]; then
  mount_path "$WORKDIR"
  WORKDIR="$MOUNTED"
  for i in "${!G2E_ARGS[@]}"; do
    if [[ "${G2E_ARGS[i]}" =~ ^(--config\.[A-Za-z0-9_.]+=)(gs://.*)$ ]]; then
      flag="${BASH_REMATCH[1]}"
      mount_path "${BASH_REMATCH[2]}"
      G2E_ARGS[i]="$flag$MOUNTED"
    elif [[ "${G2E_ARGS[i]}" == gs://* ]]; then   # the value of `--config.KEY gs://...`
      mount_path "${G2E_ARGS[i]}"
      G2E_ARGS[i]="$MOUNTED"
    fi
  done
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
    # Cloud Storage FUSE from Google's apt repository, as its installation guide does it.
    'command -v gcsfuse >/dev/null || { '\
'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg '\
'| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && '\
'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '\
'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '\
'| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && '\
'sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }'
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
  local quoted bucket point steps
  quoted="$(printf ' %q' "${args[@]}")"
  # -e and pipefail on the worker so a failing mount or run fails the ssh, and gcloud with it.
  # shellcheck disable=SC2016
  steps='set -euo pipefail; command -v gcsfuse >/dev/null || { echo "gcsfuse is missing on '\
'$(hostname): run launch/tpu_vm.sh install" >&2; exit 1; }; '
  for bucket in "${BUCKETS[@]}"; do
    point="$GCS_ROOT/$bucket"   # bucket names need no quoting: mount_path checked them
    # A mount left by an earlier run is reused; a dead one (gcsfuse killed) is replaced.
    steps+="mountpoint -q $point || { sudo umount -l $point 2>/dev/null || true; "
    steps+="sudo mkdir -p $point && sudo chown \"\$(id -u):\$(id -g)\" $point && "
    steps+="gcsfuse $GCSFUSE_FLAGS $bucket $point; }; "
  done
  run "${TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all \
    --command="${steps}cd ~/g2e && ~/g2e-venv/bin/python$quoted 2>&1 | tee ~/g2e-run.log"
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
