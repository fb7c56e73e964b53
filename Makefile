# The two commands a fresh machine needs (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ACCELERATE_CONFIG ?= accelerate_configs/cpu.yaml

.PHONY: install demo test test-fast lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so pip takes the local CPU build instead of a multi-GB CUDA wheel; on a GPU machine,
# install the CUDA torch you want before `make install`.
install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"

# The main job: SFTMix (stage 1 confidence + stage 2 training) on the embedded demo.
demo: install
	$(BIN)/sftmix-trl-demo-model
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml

# The whole suite, slow tests (real SmolLM2, 2-process runs) included.
test: install
	$(BIN)/sftmix-trl-demo-model
	$(BIN)/python -m pytest tests -v --durations=15

test-fast: install
	$(BIN)/python -m pytest tests -q -m "not slow"

lint: install
	$(BIN)/ruff check sftmix_trl recipes tests benchmarks
	$(BIN)/ruff format --check sftmix_trl recipes tests benchmarks
