# Two entry points for a fresh machine (CPU): `make demo` runs the main job, `make test` runs the test suite.
# Both set up .venv first. On GPU nodes install torch for your CUDA first, then `pip install -e .`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
NPROC   ?= 2

.PHONY: setup libaio demo test test-all test-fast lint slurm-up slurm-down clean

setup: $(STAMP)

# DeepSpeed's ops are JIT-compiled on first use (shm_comm ~60 s, cpu_adam ~85 s on 2 cores). Each target below
# builds the ones its runs load, once, into this machine type's cache (dtrain/ops.py), so that no rank compiles:
# the demo the ops of its config (none: torch AdamW, and no rank loads shm_comm), the tests shm_comm (the op
# tests/test_ops.py builds and copies), test-all also CPU Adam and NVMe offload (async_io + pin_memory; they need
# Debian's libaio-dev, installed here if missing: CI runs as root).
# Built ops are found in ~1 s.
libaio:
	@dpkg -s libaio-dev >/dev/null 2>&1 || { command -v apt-get >/dev/null && \
		{ apt-get install -y -q --no-install-recommends libaio-dev || \
		  { apt-get update -q && apt-get install -y -q --no-install-recommends libaio-dev; }; } || \
		echo "libaio-dev not installed: NVMe offload will not run (install it with your package manager)"; }

# torch is pinned to the CPU build here: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# pytest, ruff and the optional loggers the tests exercise (wandb, mlflow): the demo does without them.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test]"
	touch $(TEST_STAMP)

runs/tiny-model/config.json: | $(STAMP)
	$(BIN)/dtrain tiny-model runs/tiny-model

# The main job: a tiny Llama trained with ZeRO-3 + CPU offload on 2 gloo ranks over the bundled sample data.
demo: setup runs/tiny-model/config.json
	$(BIN)/python -m dtrain.ops build configs/tiny-full-zero3.yaml
	$(BIN)/dtrain check configs/tiny-full-zero3.yaml --nproc $(NPROC)
	$(BIN)/dtrain train configs/tiny-full-zero3.yaml --nproc $(NPROC)

# The whole suite. The Slurm tests install, start and stop a real single-node cluster themselves
# (slurm/testcluster/start, stop): nothing to set up by hand.
test: $(TEST_STAMP)
	$(BIN)/python -m dtrain.ops build shm_comm
	$(BIN)/python -m pytest -q -rs -m "not long" $(PYTEST_ARGS)

# Everything, the `long` runs included (production path, fault trials, 2-node failure scenarios): ~2x make test.
test-all: $(TEST_STAMP) libaio
	$(BIN)/python -m dtrain.ops build shm_comm cpu_adam pin_memory async_io
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(BIN)/python -m dtrain.ops build shm_comm
	$(BIN)/python -m pytest -q -m "not slurm and not slow" $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
