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
# with Cloud Storage FUSE on every worker, and passes gs://BUCKET/PATH to g2e as the mounted
# path. That holds for --workdir and for every `--config.KEY=gs://...` (or `--config.KEY
# gs://...`) after `--`, e.g. the checkpoint and the data:
#   -- --config.model_dir=gs://my-bucket/Qwen2-VL-2B-Instruct \
#      --config.data.eval_dir=gs://my-bucket/MMEB-eval \
#      --config.data.eval_image_root=gs://my-bucket/MMEB-eval
# A bucket is mounted one of two ways, by what g2e does with the key that names it:
#   /gcs/BUCKET     read-write, metadata caches off (gcsfuse --implicit-dirs
#                   --rename-dir-limit=200000 --metadata-cache-ttl-secs=0
#                   --metadata-cache-negative-ttl-secs=0): directories made by other workers
#                   are seen at once, and checkpoint directories can be renamed into place.
#                   For --workdir and every key not listed below.
#   /gcs-ro/BUCKET  read-only, metadata cached for the mount's lifetime (gcsfuse
#                   --implicit-dirs -o ro --metadata-cache-ttl-secs=-1
#                   --stat-cache-max-size-mb=-1 --type-cache-max-size-mb=-1
#                   --kernel-list-cache-ttl-secs=-1 --metadata-cache-negative-ttl-secs=0): each
#                   file is looked up in Cloud Storage once per worker, not once per open,
#                   which is what reading millions of small images needs. For the keys g2e
#                   only reads: model_dir, adapter_dir, data.train_dir, data.train_image_root,
#                   data.eval_dir, data.eval_image_root, data.tfds_dir.
# A bucket named by both kinds is mounted both ways, and each key gets its own mount, e.g.
# --workdir=gs://b/run --config.model_dir=gs://b/qwen gives /gcs/b/run and /gcs-ro/b/qwen.
# Other paths must exist on every worker. The slice's service account needs read/write access
# to the buckets mounted read-write (roles/storage.objectUser), read access to the others
# (roles/storage.objectViewer); mounts stay until the VM restarts, and a later `run` reuses
# them. The read-only mounts treat their buckets as unchanging: a missing file is not
# remembered (one uploaded later is found), but after replacing or deleting data, unmount it
# on every worker (`sudo umount /gcs-ro/BUCKET`; the next `run` mounts it afresh). Their caches
# grow with the files looked up (about 1.7 KB of worker memory each).
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
GCS_ROOT=/gcs          # read-write mounts, $GCS_ROOT/BUCKET on every worker (see Buckets)
GCS_RO_ROOT=/gcs-ro    # read-only, metadata-cached mounts, $GCS_RO_ROOT/BUCKET
# Read-write: directories other workers made are seen (implicit dirs, no metadata caching), and
# a checkpoint directory written under a temporary name can be renamed into place.
GCSFUSE_FLAGS="--implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0"
GCSFUSE_FLAGS+=" --metadata-cache-negative-ttl-secs=0"
# Read-only: nothing changes under a run, so file attributes, types and directory listings are
# kept for the mount's lifetime, without a size limit; a missing path is not remembered.
GCSFUSE_RO_FLAGS="--implicit-dirs -o ro --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1"
GCSFUSE_RO_FLAGS+=" --type-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1"
GCSFUSE_RO_FLAGS+=" --metadata-cache-negative-ttl-secs=0"
# The config keys g2e only reads (checkpoints and data): their buckets are mounted read-only.
READ_ONLY_KEYS=(model_dir adapter_dir data.train_dir data.train_image_root data.eval_dir
  data.eval_image_root data.tfds_dir)
MOUNT_POINTS=()        # what `run` mounts: $GCS_ROOT/BUCKET or $GCS_RO_ROOT/BUCKET, in order

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

# Sets MOUNTED to where gs://BUCKET/PATH ($1) is on the workers, under the mount root $2
# ($GCS_ROOT or $GCS_RO_ROOT), and adds ROOT/BUCKET to the mount points to make.
mount_path() {
  local url="$1" root="$2" bucket
  bucket="${url#gs://}"
  bucket="${bucket%%/*}"
  [[ "$bucket" =~ ^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$ ]] ||
    die "'$url' does not start with gs://BUCKET/ and a valid bucket name"
  [[ " ${MOUNT_POINTS[*]} " == *" $root/$bucket "* ]] || MOUNT_POINTS+=("$root/$bucket")
  MOUNTED="$root/${url#gs://}"
}

if [[ "$COMMAND" == run || "$COMMAND" == up ]]; then
  mount_path "$WORKDIR" "$GCS_ROOT"
  WORKDIR="$MOUNTED"
  for i in "${!G2E_ARGS[@]}"; do
    key=""
    if [[ "${G2E_ARGS[i]}" =~ ^--config\.([A-Za-z0-9_.]+)=(gs://.*)$ ]]; then
      key="${BASH_REMATCH[1]}"
      url="${BASH_REMATCH[2]}"
    elif [[ "${G2E_ARGS[i]}" == gs://* ]]; then   # the value of `--config.KEY gs://...`
      url="${G2E_ARGS[i]}"
      if ((i > 0)) && [[ "${G2E_ARGS[i - 1]}" =~ ^--config\.([A-Za-z0-9_.]+)$ ]]; then
        key="${BASH_REMATCH[1]}"
      fi
    else
      continue
    fi
    root="$GCS_ROOT"   # a key g2e may write to, or a URL no key names
    [[ -z "$key" || " ${READ_ONLY_KEYS[*]} " != *" $key "* ]] || root="$GCS_RO_ROOT"
    mount_path "$url" "$root"
    G2E_ARGS[i]="${G2E_ARGS[i]%"$url"}$MOUNTED"
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
  local quoted point flags steps
  quoted="$(printf ' %q' "${args[@]}")"
  # -e and pipefail on the worker so a failing mount or run fails the ssh, and gcloud with it.
  # shellcheck disable=SC2016
  steps='set -euo pipefail; command -v gcsfuse >/dev/null || { echo "gcsfuse is missing on '\
'$(hostname): run launch/tpu_vm.sh install" >&2; exit 1; }; '
  for point in "${MOUNT_POINTS[@]}"; do   # no quoting needed: mount_path checked the names
    flags="$GCSFUSE_FLAGS"
    [[ "$point" != "$GCS_RO_ROOT"/* ]] || flags="$GCSFUSE_RO_FLAGS"
    # A mount left by an earlier run is reused; a dead one (gcsfuse killed) is replaced.
    steps+="mountpoint -q $point || { sudo umount -l $point 2>/dev/null || true; "
    steps+="sudo mkdir -p $point && sudo chown \"\$(id -u):\$(id -g)\" $point && "
    steps+="gcsfuse $flags ${point##*/} $point; }; "
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
