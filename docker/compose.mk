# Container targets, included by the top-level Makefile (`-include docker/compose.mk`).
#   make docker-engine   install and start Docker + Compose v2 (Debian host, root; idempotent)
#   make images          build base + gateway + CPU worker + Prometheus images, nothing pulled
#   make test-compose    images, then the real `docker compose up` test (tests/compose/)
COMPOSE_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: docker-engine images test-compose

docker-engine:
	bash docker/install-engine.sh

images: docker-engine
	bash docker/build-images.sh

test-compose: images
	TESSERA_COMPOSE_TEST=1 $(COMPOSE_PYTHON) -m pytest tests/compose -v -rs -p no:cacheprovider

# The Ray launcher on a local Ray cluster (127.0.0.1): two CPU workers as actors, gateway, kill.
.PHONY: test-ray
test-ray:
	TESSERA_RAY_TEST=1 $(COMPOSE_PYTHON) -m pytest tests/ray -v -rs -p no:cacheprovider
