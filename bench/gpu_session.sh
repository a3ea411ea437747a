#!/usr/bin/env bash
# One accelerator session for g2e: real figures in under 10 minutes, each step on its own
# timeout, so a step that overruns still leaves the files of those before it. Writes to $OUT:
#   versions.txt      Python and package versions, devices, nvidia-smi
#   imports.txt       every g2e module imports (g2e.main, the benches), then the cuDNN tests
#                     (tests/models/test_attention.py -k cudnn: cuDNN attention equals XLA)
#   train_g2e.json    g2e's train step at 2B: step time, MFU (datasheet and measured GEMM
#                     peak, with and without DoRA's drop(x)@W), HFU, peak memory, compile count
#   train_torch.json  transformers + peft on the same batch, under autocast and with float32
#                     adapters (rewritten after each mode)
#   embed.json        embedding throughput, g2e against transformers (bench/bench_embed.py)
#   summary.txt       the table of both train sides (bench_train.py --report) and embed.json
#   session.log       every step's own output
#
# On the accelerator machine (the device tool; carry .whl):
#   bash bench/gpu_session.sh
# Here, the same path on the CPU at toy sizes (tests/bench/test_gpu_session.py runs it):
#   bash bench/gpu_session.sh --smoke [--out DIR]
# The accelerator image has jax, flax, optax, orbax, transformers, peft and torch but not the
# packages in WHEELS below; they travel as Python 3.12 wheels in .whl/ (git ignores it). Fill it
# here once with
#   bash bench/gpu_session.sh --fetch-wheels
# which runs: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
#   --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
#   --platform manylinux2014_x86_64 -d .whl $WHEELS
set -uo pipefail

# What g2e imports that the accelerator image lacks (grain needs array-record and portpicker).
WHEELS="grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker==1.6.0"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
SMOKE=0
OUT_DIR=${OUT:-}

while [ $# -gt 0 ]; do
    case $1 in
        --smoke) SMOKE=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --fetch-wheels)
            cd "$REPO" || exit 1
            # shellcheck disable=SC2086  # WHEELS is a list of requirements
            exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 \
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
            ;;
        *) echo "usage: $0 [--smoke] [--out DIR] | --fetch-wheels" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT_DIR" ]; then
    OUT_DIR=$(mktemp -d /tmp/g2e_gpu_session.XXXXXX)
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/session.log
cd "$REPO" || exit 1
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 HF_HUB_OFFLINE=1

# Step budgets in seconds (they sum to 540 on the accelerator, leaving a minute of slack).
if [ "$SMOKE" = 1 ]; then
    export JAX_PLATFORMS=cpu
    unset XLA_FLAGS  # one CPU device (a test runner may have asked for 8)
    TRAIN_ARGS=(--smoke --layers 1 --pairs 4 --steps 1 --warmup 1 --image_side 28 --backprop direct)
    EMBED_ARGS=(--widths tiny --layers 1 --items 4 --batch-size 2 --repeats 1)
    T_VERSIONS=60 T_IMPORTS=120 T_G2E=240 T_TORCH=240 T_EMBED=180
else
    export JAX_PLATFORMS=cuda
    TRAIN_ARGS=(--attention auto --remat full --pairs 64 --steps 5 --warmup 2)
    EMBED_ARGS=(--layers 2 --items 32 --batch-size 8 --repeats 2)
    T_VERSIONS=20 T_IMPORTS=80 T_G2E=200 T_TORCH=140 T_EMBED=80
fi

STEP_SECONDS=0
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a timeout, its output to session.log
    local name=$1 seconds=$2 start=$SECONDS rc
    shift 2
    echo "== $name (timeout ${seconds} s) $(date -u +%T)" >>"$LOG"
    timeout --kill-after=10 "$seconds" "$@" >>"$LOG" 2>&1
    rc=$?
    STEP_SECONDS=$((SECONDS - start))
    echo "== $name: exit $rc after $STEP_SECONDS s" | tee -a "$LOG"
    return "$rc"
}
section() {  # section NAME FILE: copies step NAME's part of session.log to FILE
    sed -n "/^== $1 (/,/^== $1:/p" "$LOG" >"$2"
}

# 0. The carried wheels (Python 3.12), installed apart from the accelerator image's packages.
if [ "$SMOKE" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/g2e_site.XXXXXX)
    step wheels 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH=$REPO:$SITE
fi

# 1. Versions and devices.
VERSIONS_PY='
import importlib.metadata as metadata
import sys

print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers",
             "torch", "peft", "grain", "ml-collections", "array-record", "numpy"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
import jax
import torch

print("jax devices:", jax.devices())
print("torch cuda:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
'
# shellcheck disable=SC2016  # $0 and $1 expand in the inner shell
step versions "$T_VERSIONS" bash -c \
    'date -u; uname -srm; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$0" -c "$1"' \
    "$PYTHON" "$VERSIONS_PY"
section versions "$OUT_DIR/versions.txt"

# 2. Import check, then the cuDNN attention tests (skipped, with their reason, on a CPU).
# shellcheck disable=SC2016
step imports "$T_IMPORTS" bash -c \
    '"$0" -c "import g2e.main, g2e.embedding, g2e.training.flops; print(\"imports ok\")" &&
     "$0" -m pytest -q -rs -p no:cacheprovider tests/models/test_attention.py -k cudnn' \
    "$PYTHON"
section imports "$OUT_DIR/imports.txt"

# 3. Training, g2e then torch, each with its own result file. Should g2e fail before its time
# is up (not a timeout), the rest of its time reruns it with XLA attention.
train() {  # train SECONDS SIDE ARGS...
    local seconds=$1 side=$2
    shift 2
    step "train_$side" "$seconds" "$PYTHON" bench/bench_train.py --accelerator --side "$side" \
        --result "$OUT_DIR/train_$side.json" "${TRAIN_ARGS[@]}" "$@"
}
train "$T_G2E" g2e
RC=$?
LEFT=$((T_G2E - STEP_SECONDS))
if [ "$RC" != 0 ] && [ "$RC" != 124 ] && [ "$LEFT" -gt 60 ]; then
    train "$LEFT" g2e --attention xla
fi
CHUNK=$("$PYTHON" -c "import json; r = json.load(open('$OUT_DIR/train_g2e.json')); \
print(r['chunk'] * r['devices'] if r['backprop'] == 'gradcache' else 0)" 2>/dev/null || echo 0)
train "$T_TORCH" torch --chunk "$CHUNK"

# 4. Embedding throughput, both sides.
step embed "$T_EMBED" "$PYTHON" bench/bench_embed.py --out "$(mktemp -d /tmp/g2e_embed.XXXXXX)" \
    --result "$OUT_DIR/embed.json" "${EMBED_ARGS[@]}"

# 5. The summary: both train sides (peak memory and compile count included) and embedding.
{
    "$PYTHON" bench/bench_train.py --report "$OUT_DIR"
    echo "embedding: $(cat "$OUT_DIR/embed.json" 2>/dev/null || echo 'no embed.json')"
} >"$OUT_DIR/summary.txt" 2>&1
cat "$OUT_DIR/summary.txt"
echo "gpu_session: files in $OUT_DIR"
