#!/usr/bin/env bash
# The GPU half of the performance table in one call of a lent GPU machine (see
# benchmarks/README.md, "How the GPU figures were taken").
#
#   benchmarks/gpu_session.sh bundle /path/to/CV-VAE   # here, with network: fills .gpu/
#   benchmarks/gpu_session.sh run                      # there, with .gpu carried along
#
# `bundle` downloads the wheels the benchmarks need and the GPU image lacks (for its
# Python, PYVER, default 3.12), unpacks them into one tar.xz (the wheels themselves with
# the repository came to more than a call carries) and copies the official code's
# models/ beside it. `run` unpacks them into /tmp/site and runs, most wanted first, each
# under its own time limit: our bf16 codec at 17x256x256 (the decode MFU target), the
# official code on the GPU in bf16 and fp32, our bf16 codec at 17x576x1024 (two tiles),
# our fp32 codec. Logs and JSON go to $OUT (default /tmp/gpu_session).
set -u
cd "$(dirname "$0")/.."
BUNDLE=.gpu
# Versions as in the local .venv the benchmarks were written against; diffusers and
# importlib_metadata for the official code, the rest for cvvae_jax and the clip.
WHEELS="av==18.1.0 grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 dm_pix==0.4.5
portpicker==1.6.0 diffusers==0.42.1 importlib_metadata==10.2.0"

bundle() {
  local official=${1:?usage: gpu_session.sh bundle /path/to/CV-VAE}
  [ -f "$official/models/modeling_vae.py" ] || { echo "$official: no models/modeling_vae.py" >&2; exit 2; }
  local tmp
  tmp=$(mktemp -d)
  local py=python3
  [ -x .venv/bin/python ] && py=.venv/bin/python  # README's setup: the venv has pip
  # shellcheck disable=SC2086  # WHEELS is a list
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp/wheels" $WHEELS || exit 1
  mkdir -p "$tmp/site" "$BUNDLE"
  for w in "$tmp"/wheels/*.whl; do "$py" -m zipfile -e "$w" "$tmp/site" || exit 1; done
  tar -cJf "$BUNDLE/site.tar.xz" -C "$tmp/site" . || exit 1
  rm -rf "$BUNDLE/CV-VAE" && mkdir -p "$BUNDLE/CV-VAE" && cp -r "$official/models" "$BUNDLE/CV-VAE/"
  rm -rf "$tmp"
  du -sh "$BUNDLE"/*
  echo "carry [\"$BUNDLE\"] and run: bash benchmarks/gpu_session.sh run"
}

step() {  # step SECONDS NAME ARGS...: one benchmark, its log in $OUT/NAME.log
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit} s): python3 $*"
  local start=$SECONDS
  timeout "$limit" python3 "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$OUT/$name.log"
  echo "== $name: rc $rc in $((SECONDS - start)) s"
}

run() {
  [ -f "$BUNDLE/site.tar.xz" ] || { echo "no $BUNDLE/site.tar.xz: run 'bundle' here first and carry $BUNDLE" >&2; exit 2; }
  OUT=${OUT:-/tmp/gpu_session}
  mkdir -p "$OUT" /tmp/site
  tar -xJf "$BUNDLE/site.tar.xz" -C /tmp/site || exit 1
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
  step 120 codec_256_bf16 benchmarks/codec.py --shape 17x256x256 --dtype bf16 \
    --direction decode,encode --runs 5 --warmup 1 --json "$OUT/codec_256_bf16.json"
  for dtype in bf16 fp32; do
    step 90 "official_256_$dtype" benchmarks/official_cvvae.py --official-code "$BUNDLE/CV-VAE" \
      --device cuda --dtype "$dtype" --runs 5 --warmup 1 --json "$OUT/official_256_$dtype.json"
  done
  step 120 codec_576_bf16 benchmarks/codec.py --shape 17x576x1024 --dtype bf16 \
    --direction decode,encode --runs 3 --warmup 1 --json "$OUT/codec_576_bf16.json"
  step 90 codec_256_fp32 benchmarks/codec.py --shape 17x256x256 --dtype fp32 \
    --direction decode,encode --runs 3 --warmup 1 --json "$OUT/codec_256_fp32.json"
}

case "${1:-}" in
  bundle) shift; bundle "$@" ;;
  run) run ;;
  *) echo "usage: $0 bundle /path/to/CV-VAE | run" >&2; exit 2 ;;
esac
