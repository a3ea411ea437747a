#!/usr/bin/env bash
# Runs g2e on one host with one or several GPUs: a single process sees all of them, and the
# ('data', 'fsdp', 'tensor') mesh of the config spans them (no jax.distributed needed).
# For several nodes use launch/slurm.sbatch.
#
# Usage:
#   launch/gpu.sh [--dry-run] [FLAGS] [-- G2E_FLAGS...]
#
# Flags (the environment variable in brackets is the default; a flag wins over its variable):
#   --config=CONFIG    g2e config [G2E_CONFIG, default configs/mmeb.py]
#   --workdir=DIR      checkpoints, results and exports, a local directory (a bucket only
#                      through a gcsfuse mount) [G2E_WORKDIR, default: the config's]
#   --gpus=IDS         which GPUs, e.g. 0,1,2,3 [G2E_GPUS, else CUDA_VISIBLE_DEVICES, else all]
#   --venv=DIR         virtualenv to run from [G2E_VENV, default .venv in the checkout]
#   --install          first create the virtualenv with python3.11 and pip install -e '.[gpu]'
#                      [G2E_INSTALL=1]
#   --mem-fraction=F   share of each GPU's memory JAX may take up front
#                      [XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.9]
#   --dry-run          print the commands instead of running them [DRY_RUN=1]
# Everything after `--` goes to g2e.main unchanged, e.g. -- --config.train.steps=100.
#
# Example (4 GPUs):
#   launch/gpu.sh --install --gpus=0,1,2,3 --workdir=/data/g2e/2b -- --config.mesh.fsdp=4
set -euo pipefail

LAUNCHER=gpu.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
GPUS="${G2E_GPUS:-${CUDA_VISIBLE_DEVICES:-}}"
VENV="${G2E_VENV:-$REPO/.venv}"
INSTALL="${G2E_INSTALL:-0}"
MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

# This launcher's own flags (see common.sh for the shared ones).
parse_flag() {
  case "$1" in
    --gpus=*) GPUS="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --mem-fraction=*) MEM_FRACTION="${1#*=}" ;;
    *) return 1 ;;
  esac
}

parse_args "$@"

refuse_url_workdir "a directory" "(gcsfuse --implicit-dirs BUCKET DIR)"
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "--gpus (or G2E_GPUS / CUDA_VISIBLE_DEVICES) must list GPU ids like 0,1,2,3, got '$GPUS'"

if [[ "$INSTALL" == 1 ]]; then
  [[ -x "$VENV/bin/python" ]] || run python3.11 -m venv "$VENV"
  run "$VENV/bin/pip" install -q -e "${REPO}[gpu]"
fi

environment=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
[[ -z "$GPUS" ]] || environment=(CUDA_VISIBLE_DEVICES="$GPUS" "${environment[@]}")
run cd "$REPO"
main=(-m g2e.main --config="$CONFIG")
[[ -z "$WORKDIR" ]] || main+=(--config.workdir="$WORKDIR")
run env "${environment[@]}" "$VENV/bin/python" "${main[@]}" "${G2E_ARGS[@]}"
