# megadistil on NVIDIA GPUs: `deepspeed launch/train.py ...` with CUDA torch, NCCL and flash-attn 2.
# Versions are pinned to the ranges in pyproject.toml; bump both together.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv python3-pip git ninja-build \
      openmpi-bin libopenmpi-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CUDA torch first, so that installing megadistil keeps it (its range admits it: 2.11 is its floor, tested with
# `make test-floors`); the project's tested versions are pinned so the image does not drift.
RUN pip install torch==2.11.0 --index-url "https://download.pytorch.org/whl/cu128"

WORKDIR /opt/megadistil
# The dependencies from pyproject.toml alone (an empty package stands in for the source), so that a source edit
# rebuilds the layers below only, not ~130 packages and flash-attn.
COPY pyproject.toml README.md LICENSE ./
RUN mkdir megadistil && touch megadistil/__init__.py \
 && pip install ".[wandb,mpi]" "transformers==5.25.0" "deepspeed==0.19.8" \
 && pip install packaging wheel \
 && pip install "flash-attn==2.8.3" --no-build-isolation \
 && pip uninstall -y megadistil && rm -rf megadistil build
COPY megadistil ./megadistil
RUN pip install --no-deps .

COPY launch ./launch
COPY configs ./configs
COPY ds_configs ./ds_configs
COPY tools ./tools

# docker run --gpus all --ipc=host -v /models:/models -v /data:/data -v $PWD/runs:/opt/megadistil/runs IMAGE \
#     --ds_config ds_configs/zero3.json --config configs/llama3.1-8b.yaml model.student=/models/...
# (--ipc=host: NCCL's shared memory; runs/: the configs' train.output_dir, lost with the container otherwise)
ENTRYPOINT ["deepspeed", "launch/train.py"]
CMD ["--help"]
