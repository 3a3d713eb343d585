# Container and cluster targets, included by the top-level Makefile (`-include docker/compose.mk`;
# `setup` and the venv come from there).
#   make docker-engine   install and start Docker + Compose v2 (Debian host, root; idempotent)
#   make images          build base + gateway + CPU worker + Prometheus images, nothing pulled
#   make test-compose    images, then the real `docker compose up` test (tests/compose/)
#   make test-ray        `tessera cluster up` on a local Ray cluster (tests/ray/)
COMPOSE_PYTHON ?= .venv/bin/python

.PHONY: docker-engine images test-compose

docker-engine:
	bash docker/install-engine.sh

images: docker-engine
	bash docker/build-images.sh

test-compose: setup images
	TESSERA_COMPOSE_TEST=1 $(COMPOSE_PYTHON) -m pytest tests/compose -v -rs -p no:cacheprovider

# The Ray launcher on a local Ray cluster (127.0.0.1): two CPU workers as actors, gateway, kill.
.PHONY: test-ray
test-ray: setup
	TESSERA_RAY_TEST=1 TESSERA_DATA_DIR=$(or $(DATA_DIR),data) $(COMPOSE_PYTHON) -m pytest tests/ray -v -rs -p no:cacheprovider
