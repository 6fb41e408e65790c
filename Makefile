# Two entry points for a fresh machine (CPU): `make demo` runs the main job, `make test` runs the test suite.
# Both set up .venv first. On GPU nodes install torch for your CUDA first, then `pip install -e .`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
NPROC   ?= 2

.PHONY: setup demo test test-fast lint slurm-up slurm-down clean

setup: $(STAMP)

# torch is pinned to the CPU build here: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

runs/tiny-model/config.json: | $(STAMP)
	$(BIN)/dtrain tiny-model runs/tiny-model

# The main job: a tiny Llama trained with ZeRO-3 + CPU offload on 2 gloo ranks over the bundled sample data.
demo: $(STAMP) runs/tiny-model/config.json
	$(BIN)/dtrain check configs/tiny-full-zero3.yaml --nproc $(NPROC)
	$(BIN)/dtrain train configs/tiny-full-zero3.yaml --nproc $(NPROC)

# The whole suite. The Slurm tests install, start and stop a real single-node cluster themselves
# (slurm/testcluster/start, stop): nothing to set up by hand.
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slurm and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
