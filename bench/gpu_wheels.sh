#!/usr/bin/env bash
# Prepare, on a CPU machine with pip, the wheels bench/gpu_check.sh installs on a GPU machine without a network:
# what megadistil needs beyond a CUDA image with torch, transformers and accelerate (the H200 image has those,
# numpy, pyarrow, pandas, tqdm, safetensors, tokenizers, mpi4py...). Versions are the ones this checkout's .venv
# tests with. Output: .whl/ (git-ignored; ~15 MB).
#   bash bench/gpu_wheels.sh [PYTHON_VERSION (3.12)]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${1:-3.12}
OUTDIR=.whl
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pin() { for name in "$@"; do echo "$name==$(version "$name")"; done; }
# A pure-Python sdist (deepspeed builds its CUDA ops just in time): built here. (omegaconf 2.4 no longer needs antlr4.)
"$PY" -m pip wheel -q --no-deps -w "$OUTDIR" $(pin deepspeed)
# Binary or universal wheels for the GPU machine's Python.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUTDIR" \
  $(pin omegaconf webdataset braceexpand datasets dill multiprocess xxhash hjson einops gguf pydantic pydantic-core \
        annotated-types typing-inspection)
ls "$OUTDIR"
