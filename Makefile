# UltraFed: every target installs what it needs first (a pinned .venv in the repo root).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean-runs

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-lock.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, torchvision, timm, cv2, prefect, mlflow, great_expectations, dvc, flwr"
	touch $(STAMP)

setup: $(STAMP)

## Quick start 1: the main job on the embedded default (synthetic cohort, no servers).
demo: $(STAMP)
	$(BIN)/ultrafed demo

## Quick start 2: every test (unit, flow, federation on loopback, real data where present).
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1200 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not federation" tests

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-runs:
	rm -rf .ultrafed mlflow/mlflow.db mlflow/artifacts data manifests runs
