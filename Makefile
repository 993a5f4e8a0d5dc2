# The two entry points a new user needs: `make quickstart` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
DATA ?= data/quickstart
ARGS ?=
export DS_ACCELERATOR ?= cpu

.PHONY: setup quickstart test lint clean

# Without a GPU, torch comes from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build);
# a local wheel cache that already holds the CPU build wins either way (an unreachable index only warns).
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,--extra-index-url https://download.pytorch.org/whl/cpu)

$(BIN)/activate: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# torch first, pinned, so nothing else can pull a CUDA build on a CPU machine.
	$(PIP) $(TORCH_INDEX) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(BIN)/activate

setup: $(BIN)/activate

$(DATA)/meta.json: | setup
	$(BIN)/python tools/make_shards.py quickstart --out $(DATA)

$(DATA)/classifiers/mnist.pt: $(DATA)/meta.json
	$(BIN)/python tools/train_classifiers.py --shards $(DATA) --epochs 10

# 2 CPU ranks (gloo) through the DeepSpeed launcher; ARGS takes key=value overrides.
quickstart: $(DATA)/classifiers/mnist.pt
	$(BIN)/deepspeed --num_gpus 2 meme_scale/train.py --config configs/quickstart.yaml --resume auto data.root=$(DATA) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

# ruff's lint and format rules live in pyproject.toml; CI runs this before the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs data
