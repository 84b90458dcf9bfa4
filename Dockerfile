# megadistil on NVIDIA GPUs: `deepspeed launch/train.py ...` with CUDA torch, NCCL and flash-attn 2.
# Versions are pinned to the ranges in pyproject.toml; bump both together.
FROM nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04

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

# CUDA torch first, so that installing megadistil keeps it (its range admits it).
RUN pip install torch==2.5.1 --index-url "https://download.pytorch.org/whl/cu124"

WORKDIR /opt/megadistil
COPY pyproject.toml README.md LICENSE ./
COPY megadistil ./megadistil
RUN pip install ".[wandb,mpi]" \
 && pip install packaging wheel \
 && pip install "flash-attn==2.7.4.post1" --no-build-isolation

COPY launch ./launch
COPY configs ./configs
COPY ds_configs ./ds_configs
COPY tools ./tools

ENTRYPOINT ["deepspeed", "launch/train.py"]
CMD ["--ds_config", "ds_configs/zero3.json", "--config", "configs/tiny.yaml"]
