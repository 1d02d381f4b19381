#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that a lent GPU machine lacks, for
# scripts/device_run.sh to install there (it installs only what the machine does not have).
# The machine: x86-64, Python 3.12, no package index; it has torch, timm, transformers,
# peft, huggingface-hub, safetensors, numpy, pillow, pytest..., but not diffusers or
# PyWavelets (pywt, which `import visionpeft` needs), nor open_clip (bench_fewshot's host).
#
# Usage
#   bash scripts/device_wheels.sh [DEST]        # default DEST: .whl in the repository root
# then carry it: run(command='bash scripts/device_run.sh "$OUT"', carry=[".whl"], ...)
# Environment:
#   PYTHON               the interpreter whose installed versions are pinned (default .venv/bin/python)
#   DIFFUSERS_FALLBACK   older diffusers versions also fetched (default "0.36.0"): ours needs
#                        huggingface-hub >= 1.32, and the machine's hub version is not known
#                        here; device_run.sh installs the newest one the machine's hub allows
#
# What is fetched, each at the version installed in our venv:
#   diffusers, PyWavelets                          the two the machine lacks
#   open_clip_torch ftfy wcwidth                   open_clip and what its tokenizer imports
#                                                  (for device_run.sh's fewshot step)
#   filelock requests urllib3 idna certifi charset_normalizer regex
#                                                  what diffusers checks or imports at import
#                                                  time, in case the machine lacks one
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/.whl}
VPY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $VPY ]] || VPY=python3
FALLBACK=${DIFFUSERS_FALLBACK-0.36.0}
# the machine's interpreter and platform, whatever this one is
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$DEST"

version() { "$VPY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null; }

fetch() {  # fetch DIST==VERSION
  echo "--- $1"
  python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "$1"
}

status=0
for dist in diffusers PyWavelets open_clip_torch ftfy wcwidth filelock requests urllib3 idna certifi \
            charset_normalizer regex; do
  if v=$(version "$dist"); then
    fetch "$dist==$v" || { echo "could not download $dist==$v" >&2; status=1; }
  else
    echo "--- $dist: not installed in $VPY's environment, left out" >&2
    [[ $dist == diffusers || $dist == PyWavelets ]] && status=1
  fi
done
for v in $FALLBACK; do
  fetch "diffusers==$v" || { echo "could not download diffusers==$v (fallback)" >&2; status=1; }
done

echo "=== $DEST:"
ls -l "$DEST"
du -sh "$DEST"
exit "$status"
