# Two commands on a fresh machine (Python 3.11, git, make): `make dev` runs the service, `make test` passes
# the whole suite. Both install what they need: uv into .tools/, then the locked dependencies into .venv/.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
export UV_PYTHON_DOWNLOADS := never
PYTEST_ARGS ?=

.PHONY: dev test bench lint sync image-check deploy-check

$(CURDIR)/.tools/bin/uv:
	python3 -m venv .tools && .tools/bin/pip install --quiet uv

.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --all-groups --all-extras
	touch $@

sync: .venv/.synced

dev: sync
	$(UV) run --frozen preorder dev

test: sync
	$(UV) run --frozen pytest $(PYTEST_ARGS)

bench: sync
	$(UV) run --frozen python -m bench $(BENCH_ARGS)

# Builds the Dockerfile with podman and tries the image against embedded PostgreSQL and Redis (deploy/image_check.py).
image-check: sync
	$(UV) run --frozen python deploy/image_check.py $(IMAGE_CHECK_ARGS)

lint: sync
	$(UV) run --frozen ruff check src tests deploy bench
	$(UV) run --frozen mypy

# promtool: the Prometheus config and alert rules checked, and the rules' unit tests run (deploy/check.sh).
deploy-check:
	bash deploy/check.sh
