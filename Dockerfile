# megatron-speech on NVIDIA's PyTorch container, which brings CUDA torch, Transformer Engine, NCCL and (on most
# releases) apex: all kept exactly as shipped. This file adds megatron-core==0.16.1, this package and its small
# pure-Python dependencies.
#
# Build (any machine with Docker and access to nvcr.io; this project's CI has no Docker engine and only lints it):
#   docker build -t megatron-speech:latest .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3 -t megatron-speech:latest .
#     pick a release whose "Driver Requirements" (NGC release notes) your nodes meet; megatron-core is tested on
#     NGC's PyTorch containers, Python 3.10-3.12
# Check on a GPU machine:
#   docker run --rm --gpus all megatron-speech:latest python -m megatron_speech.pretrain --config configs/xl.yaml \
#       --dry-run --world-size 32
#   docker run --rm --gpus all megatron-speech:latest python -c "import megatron_speech.models.wav2vec2.layer_spec as s; print(s.te_available())"
# On Slurm with pyxis/enroot: turn the image into a squashfs file on shared storage once, then point the sbatch
# scripts at it (they add --container-image/--container-mounts/--container-workdir to every srun):
#   enroot import -o /shared/images/megatron-speech.sqsh dockerd://megatron-speech:latest
#   CONTAINER_IMAGE=/shared/images/megatron-speech.sqsh CONTAINER_MOUNTS=/shared:/shared \
#       sbatch launch/pretrain_xl_4x8.sbatch data.prefix=/shared/data/en
# or by hand, one task per GPU:
#   srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --container-image=/shared/images/megatron-speech.sqsh \
#       --container-mounts=/shared:/shared --no-container-mount-home \
#       python -m megatron_speech.pretrain --config configs/xl.yaml data.prefix=/shared/data/en
# The sbatch scripts set --container-workdir to the submitting checkout: `python -m` then runs that checkout's
# code (the working directory comes first on sys.path) with this image's libraries; without it, the copy
# installed here runs, from /workspace/megatron-speech (configs/ is there too).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline

WORKDIR /workspace/megatron-speech

# 1. Libraries (a layer that survives code changes). The container pins its own stack through PIP_CONSTRAINT:
#    it stays set, so nothing here can replace torch/TE/apex. megatron-core goes in with --no-deps: its
#    `torch>=2.6` could otherwise send pip to PyPI for a torch (NGC versions read like "2.6.0a0+...", a
#    pre-release that does not satisfy ">=2.6"); its own runtime needs (numpy, packaging) are listed below.
#    Never `pip install apex` (PyPI's apex is an unrelated web toolkit) nor transformer-engine from PyPI.
#    The others float as in pyproject.toml, inside the container's constraints (pinning them here could
#    contradict those constraints on another base release).
# hadolint ignore=DL3013
RUN python -c "import torch; print(torch.__version__)" > /opt/torch-version.txt \
    && pip install --no-deps "megatron-core==0.16.1" \
    && pip install numpy packaging psutil soundfile soxr wandb pyyaml tqdm matplotlib \
        rapidfuzz pyctcdecode "transformers>=4.40" safetensors \
    && (pip install kenlm || echo "kenlm did not build: evaluate --lm is unavailable, beam search without an LM works")

# 2. This package, without dependency resolution (same reason), then prove the container's torch is untouched.
COPY . .
RUN pip install --no-deps --no-build-isolation . \
    && test "$(python -c 'import torch; print(torch.__version__)')" = "$(cat /opt/torch-version.txt)" \
    && python -c "import importlib.metadata as m; print('megatron-core', m.version('megatron-core'), '| megatron-speech', m.version('megatron-speech'))"

# One task per GPU under srun (launch/common.sh explains why): no ENTRYPOINT wrapper in the way of signals.
CMD ["python", "-m", "megatron_speech.pretrain", "--help"]
