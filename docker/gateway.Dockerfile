# tessera gateway: the OpenAI-compatible FastAPI front (auth, prompt pipeline, routing to
# workers, metrics). No vLLM, no torch: it only talks HTTP to the workers.
#
#   docker build -f docker/gateway.Dockerfile [--build-arg BASE_IMAGE=...] \
#       [--secret id=extra_ca,src=ca.pem] .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TESSERA_DATA_DIR=/data

RUN python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 1000 tessera \
    && mkdir -p /data && chown tessera:tessera /data

# Dependencies from pyproject.toml alone, so code changes reuse this layer.
RUN --mount=type=bind,source=pyproject.toml,target=/build/pyproject.toml \
    --mount=type=bind,source=docker/requirements.py,target=/build/requirements.py \
    --mount=type=bind,source=docker/pip-install.sh,target=/build/pip-install.sh \
    --mount=type=secret,id=extra_ca \
    --mount=type=cache,target=/root/.cache/pip \
    python3 /build/requirements.py /build/pyproject.toml >/tmp/requirements.txt \
    && sh /build/pip-install.sh -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

RUN --mount=type=bind,target=/src,rw \
    --mount=type=secret,id=extra_ca \
    --mount=type=cache,target=/root/.cache/pip \
    sh /src/docker/pip-install.sh --no-deps --force-reinstall /src \
    && python3 -c "import server.app, server.cli"

USER tessera
WORKDIR /home/tessera
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
ENTRYPOINT ["tessera"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
