# pipetrain image for Dask cluster workers, the scheduler and the driver.
#
#   docker build -t pipetrain .
#   docker run --gpus device=0 --network host pipetrain dask worker tcp://HOST:8786 --resources GPU=1 --nthreads 1
#   docker run --network host pipetrain dask scheduler
#   docker run --network host -v "$PWD:/work" -w /work pipetrain pipetrain train CONFIG --scheduler tcp://HOST:8786
#
# Base: plain Python, not nvidia/cuda. The JAX CUDA wheels (the cuda13 extra) and the
# PyPI torch wheels (+cu130) bring CUDA 13, cuDNN and NCCL as pip packages, one set
# shared by both frameworks (with the cuda extra, JAX's CUDA 12 would be a second one:
# an image of 10.3 GB instead of 6.7); a CUDA base image would only add another, unused copy. The
# host needs an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit (`--gpus`).
#
# Every RUN below is checked by tests/test_dockerfile.py (read it before adding one).
ARG PYTHON_VERSION=3.11.14
FROM python:${PYTHON_VERSION}-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /opt/pipetrain
COPY pyproject.toml README.md ./
COPY pipetrain ./pipetrain
COPY models ./models

# Frameworks and Dask are pinned to the versions the test suite runs with (the
# test checks that). dumb-init is PID 1 so `docker stop` and Kubernetes' SIGTERM
# reach the Python process. The jobs run as an unprivileged user.
RUN pip install --no-cache-dir "./[torch,cuda13]" "jax==0.10.2" "torch==2.13.0" \
        "dask==2026.8.0" "distributed==2026.8.0" "dumb-init==1.2.5.post1" \
    && useradd --create-home --uid 1000 --user-group pipetrain
USER 1000:1000
WORKDIR /home/pipetrain

# `docker run IMAGE dask scheduler`, `... dask worker ...`, `... pipetrain train ...`:
# the command is the CMD, so any of the three runs under dumb-init.
ENTRYPOINT ["dumb-init", "--"]
CMD ["pipetrain", "--help"]
