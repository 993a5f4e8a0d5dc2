# Two entry points a new user needs: `make quickstart` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
export DS_ACCELERATOR ?= cpu

.PHONY: setup quickstart test clean

$(BIN)/activate: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# torch first, pinned, so nothing else can pull a CUDA build on a CPU machine.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(BIN)/activate

setup: $(BIN)/activate

quickstart: setup
	$(BIN)/python tools/make_shards.py quickstart --out data/quickstart
	$(BIN)/deepspeed --num_gpus 2 meme_scale/train.py --config configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs data
