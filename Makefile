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

.PHONY: help setup test test-slow lint format typecheck audit validate tasks clean \
	base-model baseline eval train train-agent dash mlflow bench screenshots

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)  ## create .venv, install torch (CPU pin) and the package with dev extras
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import torch, transformers, trl, peft, mlflow, textual, sqlite_utils; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"

test:  ## the default test run (no slow tests)
	$(PY) -m pytest

test-slow:  ## the slow end-to-end tests only
	$(PY) -m pytest -m slow

lint:  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:  ## ruff format + autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck:  ## mypy on the library packages
	$(VENV)/bin/mypy

tasks:  ## list the bundled tasks
	$(MTRL) tasks

validate:  ## check every task (splits, reference TSR 1.000, turn budget)
	$(MTRL) validate --all

audit:  ## reward audits: make audit TASK=… [REWARD=module:function] [ROLLOUTS=file]
	$(MTRL) audit --task $(TASK) --reward $(REWARD) $(if $(ROLLOUTS),--rollouts $(ROLLOUTS),)

clean:  ## remove caches (not the venv)
	rm -rf .pytest_cache .ruff_cache .mypy_cache .benchmarks

MODEL ?= default
RUN ?=
RECIPE ?= recipes/default.toml
ARGS ?=

base-model:  ## rebuild the embedded default model from scratch into the cache (~24 min on 2 cores)
	$(PY) -m mtrl_local.models.default --force

baseline:  ## the base model on the test split: make baseline TASK=…
	$(MTRL) baseline --task $(TASK)

eval:  ## evaluate a model: make eval TASK=… MODEL=dir|default
	$(MTRL) eval --task $(TASK) --model $(MODEL)

train:  ## baseline → RL → final evaluation: make train TASK=… [RECIPE=…] [ARGS="key=value …"]
	$(MTRL) train --task $(TASK) $(if $(wildcard $(RECIPE)),--recipe $(RECIPE),) $(ARGS)

dash:  ## the terminal dashboard: make dash [RUN=runs/<name>]
	$(MTRL) dash $(RUN)

mlflow:  ## the MLflow UI on 127.0.0.1 for a run: make mlflow RUN=runs/<name>
	@test -n "$(RUN)" || (echo "make mlflow RUN=runs/<name>"; exit 2)
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(abspath $(RUN))/mlflow.db

bench:  ## benchmarks (pytest-benchmark): rollout engine and trainer, ratios in one run
	$(PY) -m pytest tests/bench -m slow -p no:cacheprovider --benchmark-disable-gc

screenshots:  ## SVG screenshots of every dashboard view: make screenshots RUN=runs/<name>
	$(PY) -m tui.screenshots $(RUN) --out docs/screenshots

AGENT ?= python examples/aircraft_agent.py

train-agent:  ## train your own agent via the rollout server: make train-agent TASK=… [AGENT="python my_agent.py"] [ARGS="key=value …"]
	$(MTRL) train --task $(TASK) $(if $(wildcard $(RECIPE)),--recipe $(RECIPE),) --agent-cmd "$(AGENT)" $(ARGS)
