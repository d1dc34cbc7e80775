"""The evaluation harness: models on a held-out split, read by the strict scorer.

Steps 3, 4 and 7 of the iteration loop (docs/design.md, "The loop"): run each model (a base model
beside a tuned one) on every case of a split with ``n_samples`` samples per case, and read the
episodes with the **scorer** it is handed — the strict scorer unless told otherwise — never with
the training reward. The reward is still computed and reported (its mean, its pass@k, and how
often it disagrees with the strict score) because a reward that credits what the evaluation does
not is the first thing to look for when training goes wrong.

Everything is handed in: a task object, a reward function, model directories (or models already
loaded); :mod:`mtrl_local.plugins` turns names into those at the edge. The library logs and
returns an :class:`EvalReport`; the CLI prints it.

Choices, and why:

* Success for pass@k is ``strict ≥ success_threshold`` per sample, the strict score computed once
  per episode by the engine with the scorer handed to it (``Trajectory.strict``), never read
  from the reward's metrics. The same estimator on ``reward ≥ success_threshold`` is reported as
  ``reward_pass_at_k``.
* Scores count every trajectory, an environment failure scoring 0 (it is also reported as
  ``failure_rate``, so it is not mistaken for a model problem); behaviour statistics (turns, tool
  calls, truncation) describe the episodes that ran, like the training ``rollout/*`` metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtrl_local.chat_formats import CHAT_FORMAT_NAMES
from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.env import ToolLimits
from mtrl_local.errors import UserError
from mtrl_local.eval_metrics import summarize
from mtrl_local.model_io import load_model, resolve_device
from mtrl_local.rollout.engine import RolloutEngine
from mtrl_local.rollout.sampler import Sampler, SamplingParams
from mtrl_local.rollout.transformers_sampler import TransformersSampler
from mtrl_local.rollout_files import write_rollout_file
from mtrl_local.scoring import RewardFn, Scorer, strict_score
from mtrl_local.task import Task
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)

#: File names inside an evaluation's output directory.
REPORT_FILE = "report.json"
ROLLOUTS_FILE = "rollouts.jsonl"


@dataclass
class EvalConfig:
    """How an evaluation samples. Field names follow the training config where they overlap."""

    split: str = "test"
    """Split to evaluate on: ``test`` is the held-out one, ``val`` is what training watches."""
    n_samples: int = 1
    """Samples per case (n in pass@k). pass@1 and pass@n are reported; n > 1 needs temperature > 0
    to mean anything (greedy samples are identical)."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding, the default for a reproducible evaluation."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    sampling_max_tokens: int = 512
    """Per-turn token budget: a turn cut here has finish reason ``length`` and counts in
    ``truncated_frac``."""
    max_turns: int | None = None
    """Agent-loop turn limit; ``None`` uses the task's own."""
    success_threshold: float = 1.0
    """A sample succeeds when its strict score (and, for ``reward_pass_at_k``, its reward) is at
    least this."""
    seed: int = 0
    """Seed for sampling and environments: the same seed gives the same trajectories."""
    max_batch: int = 64
    """Episodes generated together (a batching knob; results do not depend on it)."""
    max_cases: int | None = None
    """Only the first ``max_cases`` cases of the split (quick looks and tests); ``None`` = all."""
    tool_timeout_s: float | None = None
    """Seconds a tool call may run (0: inline, no timeout); ``None`` keeps the environment's."""
    max_tool_output_chars: int | None = None
    """Longest tool result the agent sees; ``None`` keeps the environment's."""
    chat_format: str = "auto"
    """How the model writes tool calls (:mod:`mtrl_local.chat_formats`); ``auto`` reads it from
    the chat template."""
    device: str = "auto"
    """Where a model loaded from a directory runs: ``auto`` (CUDA when available), ``cpu``…"""

    def __post_init__(self) -> None:
        for name, ok, rule in (
            ("n_samples", self.n_samples >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("sampling_max_tokens", self.sampling_max_tokens >= 1, ">= 1"),
            ("max_turns", self.max_turns is None or self.max_turns >= 1, ">= 1"),
            ("max_cases", self.max_cases is None or self.max_cases >= 1, ">= 1"),
            ("max_batch", self.max_batch >= 1, ">= 1"),
            ("chat_format", self.chat_format in CHAT_FORMAT_NAMES, f"one of {CHAT_FORMAT_NAMES}"),
        ):
            if not ok:
                raise UserError(f"eval: {name} must be {rule}, got {getattr(self, name)}")

    @classmethod
    def of_training(cls, cfg: MultiTurnRLConfig, split: str, max_turns: int) -> EvalConfig:
        """How a training run evaluates on ``split``: its validation sampling, its turn limit and
        tool limits; ``val`` on the first ``eval_cases`` cases, ``test`` on ``test_cases``."""
        vsp = cfg.val_sampling_params
        return cls(
            split=split,
            n_samples=vsp.n_samples,
            temperature=vsp.temperature,
            top_p=vsp.top_p,
            sampling_max_tokens=vsp.sampling_max_tokens,
            max_turns=max_turns,
            success_threshold=cfg.success_threshold,
            seed=cfg.seed,
            max_cases=cfg.eval_cases if split == "val" else cfg.test_cases,
            tool_timeout_s=cfg.tool_timeout_s,
            max_tool_output_chars=cfg.max_tool_output_chars,
            chat_format=cfg.chat_format,
        )

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.sampling_max_tokens,
            seed=self.seed,
        )


@dataclass
class LoadedModel:
    """A model ready to sample through the rollout engine, and the name it gets in reports.

    :func:`load_eval_model` builds one from a directory; build one directly to evaluate something
    that is not a transformers model (a vLLM sampler, a scripted sampler).
    """

    sampler: Sampler
    tokenizer: PreTrainedTokenizerBase
    name: str = "model"


#: What :func:`evaluate` takes as a model: a directory, ``(model, tokenizer)`` or a LoadedModel.
ModelSpec = str | Path | tuple[PreTrainedModel, PreTrainedTokenizerBase] | LoadedModel


def load_eval_model(spec: ModelSpec, config: EvalConfig) -> LoadedModel:
    """A :class:`LoadedModel` for ``spec`` on ``config.device`` (transformers sampler)."""
    if isinstance(spec, LoadedModel):
        return spec
    if isinstance(spec, tuple):
        (model, tokenizer), name = spec, type(spec[0]).__name__
    else:
        model, tokenizer = load_model(spec)
        name = str(spec)
    model.eval()
    sampler = TransformersSampler(
        model, tokenizer, device=resolve_device(config.device), max_batch=config.max_batch
    )
    return LoadedModel(sampler, tokenizer, name)


def cases_of(task: Task, config: EvalConfig) -> list[Any]:
    """The cases an evaluation runs: the split's, the first ``max_cases`` of them."""
    cases = task.cases(config.split)
    if config.max_cases is not None:
        cases = cases[: config.max_cases]
    if not cases:
        raise UserError(f"eval: task {task.name} has no {config.split} cases")
    return cases


def run_episodes(
    model: LoadedModel,
    task: Task,
    cases: Sequence[Any],
    config: EvalConfig,
    *,
    reward_fn: RewardFn | None,
    scorer: Scorer = strict_score,
    progress: bool = False,
) -> list[Trajectory]:
    """``config.n_samples`` trajectories per case (case-major), each with its reward and its
    score (the engine applies ``reward_fn`` and ``scorer`` once per episode)."""
    engine = RolloutEngine(
        model.sampler,
        model.tokenizer,
        max_batch=config.max_batch,
        progress=progress,
        tool_limits=ToolLimits(config.tool_timeout_s, config.max_tool_output_chars),
        chat_format=config.chat_format,
    )
    return engine.run(
        task,
        list(cases),
        n_samples=config.n_samples,
        sampling=config.sampling(),
        max_turns=config.max_turns,
        seed=config.seed,
        policy_version=0,
        reward_fn=reward_fn,
        scorer=scorer,
    )


@dataclass
class ModelResult:
    """One model's evaluation: its summary (see :func:`summarize`) and where its rollouts went."""

    label: str
    model: str
    summary: dict[str, Any]
    rollouts: str | None = None
    wall_s: float = 0.0


@dataclass
class EvalReport:
    """What :func:`evaluate` returns and writes as ``report.json`` (models side by side).

    ``results`` lists the models in the order given (base first). ``trajectories`` (by label)
    stay in memory only; on disk they are the rollout files named in each result.
    """

    task: str
    split: str
    config: dict[str, Any]
    results: list[ModelResult]
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))
    trajectories: dict[str, list[Trajectory]] = field(default_factory=dict, repr=False)

    def result(self, label: str) -> ModelResult:
        """The result labelled ``label`` (``KeyError`` if none)."""
        for r in self.results:
            if r.label == label:
                return r
        raise KeyError(label)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (without the in-memory trajectories)."""
        return {
            "task": self.task,
            "split": self.split,
            "created": self.created,
            "config": self.config,
            "results": [asdict(r) for r in self.results],
        }

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` (parents created); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """Read a ``report.json`` written by :meth:`save`."""
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        results = [ModelResult(**r) for r in obj["results"]]
        return cls(obj["task"], obj["split"], obj["config"], results, obj["created"])


def default_out_dir(task_name: str, root: str | Path = "runs") -> Path:
    """``runs/eval-<task>-<YYYYmmdd-HHMMSS>``: one directory per evaluation, never overwritten."""
    return Path(root) / f"eval-{task_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def write_trajectories(path: Path, trajectories: Sequence[Trajectory]) -> str:
    """The trajectories as a rollout file (those without messages cannot be a line: logged)."""
    rows = [t.to_json() for t in trajectories if t.messages]
    if len(rows) < len(trajectories):
        logger.warning(
            "%s: %d trajectories without messages left out", path, len(trajectories) - len(rows)
        )
    write_rollout_file(path, rows)
    return str(path)


def function_name(fn: Any) -> str:
    """``module:qualname`` of a function (how a reward is named in reports)."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def rollouts_file(label: str, last: bool) -> str:
    """The evaluated model's file is ``rollouts.jsonl``; the others' ``rollouts-<label>.jsonl``."""
    return ROLLOUTS_FILE if last else f"rollouts-{label.replace(' ', '-')}.jsonl"


def evaluate(
    models: Sequence[tuple[str, ModelSpec]],
    task: Task,
    config: EvalConfig,
    *,
    reward_fn: RewardFn,
    scorer: Scorer = strict_score,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> EvalReport:
    """Evaluate ``models`` (``(label, model)`` pairs, a base model first) on ``config.split``.

    With ``out_dir``, writes ``report.json`` and one rollout file per model there (the last
    model's is ``rollouts.jsonl``, the others' ``rollouts-<label>.jsonl``): valid inputs to the
    reward audit (``mtrl audit --rollouts``).
    """
    cases = cases_of(task, config)
    if config.temperature == 0.0 and config.n_samples > 1:
        logger.warning(
            "eval: n_samples=%d at temperature 0 gives identical samples", config.n_samples
        )
    out = Path(out_dir) if out_dir is not None else None
    record = {**asdict(config), "task": task.name, "reward": function_name(reward_fn)}
    report = EvalReport(task.name, config.split, record, [])
    for i, (label, spec) in enumerate(models):
        start = time.perf_counter()
        model = load_eval_model(spec, config)
        logger.info(
            "eval %s (%s): %s %s, %d cases x %d samples",
            *(label, model.name, task.name, config.split, len(cases), config.n_samples),
        )
        trajectories = run_episodes(
            model, task, cases, config, reward_fn=reward_fn, scorer=scorer, progress=progress
        )
        summary = summarize(trajectories, task, config.success_threshold, config.n_samples)
        rollouts = None
        if out is not None:
            name = rollouts_file(label, last=i == len(models) - 1)
            rollouts = write_trajectories(out / name, trajectories)
        result = ModelResult(label, model.name, summary, rollouts, time.perf_counter() - start)
        report.results.append(result)
        report.trajectories[label] = trajectories
        logger.info(
            "eval %s: tsr %.3f  pass@1 %.3f  completion %.3f  field_acc %.3f  (%.1fs)",
            *(label, summary["tsr"], summary["pass_at_1"], summary["completion_rate"]),
            *(summary["field_acc"], result.wall_s),
        )
    if out is not None:
        logger.info("eval report: %s", report.save(out / REPORT_FILE))
    return report


__all__ = [
    "REPORT_FILE",
    "ROLLOUTS_FILE",
    "EvalConfig",
    "EvalReport",
    "LoadedModel",
    "ModelResult",
    "ModelSpec",
    "cases_of",
    "default_out_dir",
    "evaluate",
    "function_name",
    "load_eval_model",
    "run_episodes",
    "write_trajectories",
]
