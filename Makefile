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
STAMP := $(VENV)/.setup-stamp

.PHONY: help setup test test-slow lint format typecheck audit validate tasks clean \
	base-model baseline eval train train-agent dash mlflow bench screenshots

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import torch, transformers, trl, peft, mlflow, textual, sqlite_utils; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
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

bench: $(STAMP)  ## benchmarks (pytest-benchmark): rollout engine and trainer, ratios in one run
	$(PY) -m pytest tests/bench -m slow -p no:cacheprovider --benchmark-disable-gc

screenshots: $(STAMP)  ## SVG screenshots of every dashboard view: make screenshots RUN=runs/<name>
	$(PY) -m tui.screenshots $(RUN) --out docs/screenshots

AGENT ?= python examples/aircraft_agent.py

train-agent: $(STAMP)  ## train your own agent via the rollout server: make train-agent TASK=… [AGENT="python my_agent.py"] [ARGS="key=value …"]
	$(MTRL) train --task $(TASK) $(if $(wildcard $(RECIPE)),--recipe $(RECIPE),) --agent-cmd "$(AGENT)" $(ARGS)
