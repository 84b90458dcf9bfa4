#!/usr/bin/env bash
# The GPU check, in one call, <= 8 min on one H200: everything CPU-only tests cannot see.
#   1. tests/gpu: BitLinear CUDA numerics against float64, the kernel and dtype `auto` picks;
#   2. bench/bitlinear.py on CUDA at Llama-3.1-8B shapes (4096 -> 14336 -> 4096, 4096 tokens): int8 vs bf16;
#   3. a 1-GPU ZeRO-3 NCCL run of configs/tiny.yaml with the shared teacher (ReLoRA merges every 8 steps: the reset
#      draws A from a CPU generator); precompute on the GPU; a run from
#      those shards; a run killed after step 10 and resumed, whose steps 11-20 must match the straight run's;
#   4. convert_to_ternary --verify of the shared-teacher run.
# On a machine without network, first run bench/gpu_wheels.sh on a CPU machine and bring .whl/ along.
#   bash bench/gpu_check.sh            (OUT=dir for the log and results; GPU_CHECK_DEVICE=cpu to rehearse on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
RUNS=runs/gpu-check-runs
mkdir -p "$OUT" && rm -rf "$RUNS" && mkdir -p "$RUNS"
PY=${PY:-python3}
if [ -d .whl ] && ! "$PY" -c "import deepspeed, omegaconf, webdataset" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "${GPU_CHECK_DEVICE:-cuda}" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
  NPROC=(--num_gpus 1)
else
  NPROC=(--num_gpus 1)  # a CPU rehearsal of the same flow (gloo); the CUDA-only tests are not collected there
fi
step() { echo; echo "== $*"; }
train() {  # train OUTPUT_DIR [overrides...]; SCRIPT=tests/_fault_train.py injects MEGADISTIL_FAULT_* faults
  local dir=$1; shift
  "$PY" -m deepspeed.launcher.runner "${NPROC[@]}" --master_port 29517 "${SCRIPT:-launch/train.py}" \
    --ds_config ds_configs/zero3.json --config configs/tiny.yaml train.output_dir="$dir" \
    model.student=$RUNS/tiny-llama data.text="[$RUNS/tiny-llama/corpus.txt]" train.max_steps=20 train.save_every=10 \
    relora.reset_every=8 "$@"  # ReLoRA merges at steps 9 and 17: one before the kill at 10, one after the resume
}

step "environment"
"$PY" - <<'PY'
import torch, transformers, deepspeed
from megadistil.bitnet import hardware
dev = "cuda" if torch.cuda.is_available() else "cpu"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
print(hardware(dev).describe(), "-> kernel", hardware(dev).kernel.value)
# The machine's packages against pyproject's ranges (the image's torch and transformers must lie in them).
import importlib.metadata as md, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
with open("pyproject.toml", "rb") as f:
    requirements = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
have = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
version = {r.name: have.get(canonicalize_name(r.name)) for r in requirements}
outside = [f"{r.name} {version[r.name] or 'not installed'} (pyproject: {r.specifier})" for r in requirements
           if version[r.name] is None or not r.specifier.contains(version[r.name], prereleases=True)]
assert not outside, "outside pyproject's ranges: " + ", ".join(outside)
print("every dependency lies in pyproject's ranges")
PY

step "1. tests/gpu"
"$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/test_kernels.py tests/test_bitnet.py

step "2. BitLinear at Llama-3.1-8B shapes"
if [ "${GPU_CHECK_DEVICE:-cuda}" = cuda ]; then
  "$PY" bench/bitlinear.py --device cuda --tokens 4096 --dims 4096x14336 --gemm-size 8192 --all --repeat 5 \
    --out "$OUT/bitlinear_cuda.json"
else
  "$PY" bench/bitlinear.py --tokens 256 --dims 256x1024 --gemm-size 256 --repeat 1 --out "$OUT/bitlinear_rehearsal.json"
fi

step "3a. a tiny Llama-3.1-shaped model"
"$PY" tools/make_tiny_llama.py --out $RUNS/tiny-llama
step "3b. 1-rank ZeRO-3 run, shared teacher"
train $RUNS/shared
step "3c. precompute teacher shards on the device"
"$PY" tools/precompute_teacher.py --teacher $RUNS/tiny-llama --text $RUNS/tiny-llama/corpus.txt \
  --out $RUNS/shards --seq-len 128 --top-k 16 --no-progress
step "3d. a run from the shards"
train $RUNS/from-shards data.shards=$RUNS/shards "data.text=[]" teacher.kind=shards
step "3e. killed after step 10, then resumed"
SCRIPT=tests/_fault_train.py MEGADISTIL_FAULT_KILL_AFTER_STEP=10 train $RUNS/resumed && { echo "the killed run did not die"; exit 1; } || true
train $RUNS/resumed
"$PY" - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
def losses(run):
    return {m["step"]: m["loss"] for m in map(json.loads, (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines()) if "loss" in m}
straight, resumed = losses("shared"), losses("resumed")
diff = max(abs(straight[s] - resumed[s]) for s in range(11, 21))
print(f"resume: steps 11-20 max |loss difference| vs the straight run = {diff:.3g}")
assert sorted(resumed) == list(range(1, 21)), sorted(resumed)
assert diff <= 1e-3, "a resumed run must continue the straight run (bitwise on CPU; cuBLAS may reorder sums)"
PY
step "4. convert + verify"
"$PY" tools/convert_to_ternary.py --checkpoint $RUNS/shared --output $RUNS/ternary --verify --overwrite
cp $RUNS/*/run.json "$OUT/" 2>/dev/null || true
for run in shared from-shards resumed; do tail -n 1 $RUNS/$run/metrics.jsonl > "$OUT/last_record_$run.json"; done
echo; echo "gpu_check: all steps passed"
