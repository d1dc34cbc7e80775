"""The evaluation harness: a model on a held-out split, read by the strict scorer (DESIGN §1, §9).

Steps 3, 4 and 7 of the iteration loop: run the model (and, beside it, the base model) on every
case of a split with ``n_samples`` samples per case, then read the trajectories with the **strict
scorer**, never with the training reward. The reward is still computed and reported (its mean,
its pass@k, and how often it disagrees with the strict score) because a reward that credits what
the evaluation does not is the first thing to look for when training goes wrong.

Choices, and why:

* Success for pass@k is ``strict ≥ success_threshold`` per sample, with the strict score
  recomputed here from the messages (not read from ``Trajectory.strict`` or the reward's
  metrics): the evaluation stays independent of whatever the reward function reports. The same
  estimator on ``reward ≥ success_threshold`` is reported as ``reward_pass_at_k``.
* Scores count every trajectory, an environment failure scoring 0 (it is also reported as
  ``failure_rate``, so it is not mistaken for a model problem); behaviour statistics (turns, tool
  calls, truncation) describe the episodes that ran, like the engine's ``rollout/*`` metrics.
* The library logs and returns an :class:`EvalReport`; only the CLI prints
  (:func:`format_table` builds the table it prints).
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

from rich.table import Table

from mtrl_local.errors import UserError
from mtrl_local.eval_metrics import (  # re-exported: part of the harness's public API
    first_turn_tool_call_ok,
    pass_at_k,
    summarize,
    val_metrics,
)
from mtrl_local.trajectory import Trajectory
from rewards.strict import strict_score

logger = logging.getLogger(__name__)

#: File names inside an evaluation's output directory.
REPORT_FILE = "report.json"
ROLLOUTS_FILE = "rollouts.jsonl"
BASE_ROLLOUTS_FILE = "rollouts-base.jsonl"

#: The model spec that means "the bundled default model" (built on first use).
DEFAULT_MODEL = "default"


@dataclass
class EvalConfig:
    """One evaluation run. Field names follow the rollout/training configs where they overlap."""

    task: str
    """Registered task name (``mtrl tasks`` lists them)."""
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
    """Per-turn token budget (``val_sampling_params.sampling_max_tokens``): a turn cut here has
    finish reason ``length`` and counts in ``truncated_frac``."""
    max_turns: int | None = None
    """Agent-loop turn limit; ``None`` uses the task's own (``ceil(1.5 × reference turns)``)."""
    success_threshold: float = 1.0
    """A sample succeeds when its strict score (and, for ``reward_pass_at_k``, its reward) is at
    least this."""
    seed: int = 0
    """Seed for sampling and environments: the same seed gives the same trajectories."""
    reward: str = "rewards.dense:dense_reward"
    """Training reward (``module:function``) computed alongside, for comparison only."""
    max_batch: int = 64
    """Episodes generated together (a batching knob; results do not depend on it)."""
    evaluate_base_model: bool = False
    """Also evaluate the base model and report it beside this one."""
    base_model: str | None = None
    """The base model's path (or ``"default"``); set implies ``evaluate_base_model``. ``None``
    with ``evaluate_base_model``: the base recorded in a LoRA adapter, else the default model."""
    max_cases: int | None = None
    """Only the first ``max_cases`` cases of the split (quick looks and tests); ``None`` = all."""
    device: str = "auto"
    """Where the model runs: ``auto`` (CUDA when available), ``cpu``, ``cuda``…"""

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise UserError(f"eval: n_samples must be >= 1, got {self.n_samples}")
        if self.temperature < 0:
            raise UserError(f"eval: temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"eval: top_p must be in (0, 1], got {self.top_p}")
        if self.sampling_max_tokens < 1:
            raise UserError(
                f"eval: sampling_max_tokens must be >= 1, got {self.sampling_max_tokens}"
            )
        if self.max_turns is not None and self.max_turns < 1:
            raise UserError(f"eval: max_turns must be >= 1, got {self.max_turns}")
        if self.max_cases is not None and self.max_cases < 1:
            raise UserError(f"eval: max_cases must be >= 1, got {self.max_cases}")


# -- pass@k ----------------------------------------------------------------------------------------
# -- models ----------------------------------------------------------------------------------------
@dataclass
class Policy:
    """A model ready to sample through the rollout engine, and the name it gets in reports.

    :func:`evaluate` builds one from a path or a ``(model, tokenizer)`` pair; pass one directly to
    evaluate something that is not a transformers model (a vLLM backend, a scripted backend).
    """

    backend: Any
    tokenizer: Any
    name: str = "model"


#: What :func:`evaluate` takes as a model: a path, ``"default"``, ``(model, tokenizer)``, a Policy.
ModelSpec = str | Path | tuple[Any, Any] | Policy


def check_model_path(spec: str | Path) -> str:
    """``spec`` if it names a model (``"default"`` or a model directory); else a UserError.

    Cheap on purpose (no torch, no loading): the CLI calls it before anything else so a typo is
    one line, not a traceback after minutes of loading.
    """
    if str(spec) == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"model '{spec}': no such directory")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserError(
            f"model '{spec}': not a model directory (no config.json or adapter_config.json)"
        )
    return str(path)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_pretrained(spec: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a model directory, or of the default model (built if missing)."""
    from mtrl_local.models.default import default_model_path, load_model

    path = default_model_path(build=True) if spec == DEFAULT_MODEL else Path(spec)
    return load_model(path)


def load_policy(spec: ModelSpec, config: EvalConfig) -> Policy:
    """A :class:`Policy` for ``spec`` on ``config.device`` (transformers backend)."""
    if isinstance(spec, Policy):
        return spec
    from mtrl_local.rollout.transformers_backend import TransformersBackend

    if isinstance(spec, tuple):
        (model, tokenizer), name = spec, type(spec[0]).__name__
    else:
        name = check_model_path(spec)
        model, tokenizer = _load_pretrained(name)
    model.eval()
    backend = TransformersBackend(
        model, tokenizer, device=_resolve_device(config.device), max_batch=config.max_batch
    )
    return Policy(backend, tokenizer, name)


def base_model_spec(model: ModelSpec, config: EvalConfig) -> str | None:
    """Which base model to evaluate beside ``model``, or ``None`` for none.

    ``config.base_model`` if set; else, with ``evaluate_base_model``, the base a LoRA adapter
    directory records (``adapter_config.json``: ``base_model_name_or_path``) when that is a local
    directory, and the default model otherwise.
    """
    if config.base_model is not None:
        return config.base_model
    if not config.evaluate_base_model:
        return None
    if isinstance(model, (str, Path)) and (Path(model) / "adapter_config.json").is_file():
        recorded = json.loads((Path(model) / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if isinstance(recorded, str) and Path(recorded).is_dir():
            return recorded
    return DEFAULT_MODEL


# -- running ---------------------------------------------------------------------------------------
def generate(
    policy: Policy,
    task: Any,
    cases: Sequence[Any],
    config: EvalConfig,
    reward_fn: Any,
    *,
    progress: bool = False,
) -> list[Trajectory]:
    """``config.n_samples`` trajectories per case from the rollout engine (case-major), each with
    its reward (the engine runs ``reward_fn``) and its strict score.
    """
    from mtrl_local.rollout.backend import SamplingParams
    from mtrl_local.rollout.engine import RolloutEngine

    engine = RolloutEngine(
        policy.backend, policy.tokenizer, max_batch=config.max_batch, progress=progress
    )
    sampling = SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.sampling_max_tokens,
        seed=config.seed,
    )
    trajectories = engine.run(
        task,
        list(cases),
        n_samples=config.n_samples,
        sampling=sampling,
        max_turns=config.max_turns,
        seed=config.seed,
        policy_version=0,
        reward_fn=reward_fn,
    )
    for traj in trajectories:
        # The engine sets it too; the evaluation does not rely on another module's reading.
        traj.strict = strict_score(traj.messages, traj.ground_truth)
    return trajectories


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

    ``results`` lists the base model first when there is one. ``trajectories`` (by label) stay in
    memory only; on disk they are the rollouts files named in each result.
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


def default_out_dir(task: str, root: str | Path = "runs") -> Path:
    """``runs/eval-<task>-<YYYYmmdd-HHMMSS>``: one directory per evaluation, never overwritten."""
    return Path(root) / f"eval-{task}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _write_rollouts(path: Path, trajectories: Sequence[Trajectory]) -> str:
    from mtrl_local.rollouts import write_rollouts

    rows = [t.to_json() for t in trajectories if t.messages]
    if len(rows) < len(trajectories):
        # A rollouts line needs messages; an episode that failed before its first turn has none.
        logger.warning(
            "%s: %d trajectories without messages left out", path, len(trajectories) - len(rows)
        )
    write_rollouts(path, rows)
    return str(path)


def evaluate(
    model_or_path: ModelSpec,
    config: EvalConfig,
    *,
    out_dir: str | Path | None = None,
    label: str | None = None,
    progress: bool = False,
) -> EvalReport:
    """Evaluate a model (and its base, if asked) on ``config.split`` of ``config.task``.

    ``model_or_path``: a model directory, ``"default"``, a ``(model, tokenizer)`` pair or a
    :class:`Policy`. ``label`` names it in the report (default ``tuned`` beside a base model,
    else ``model``). With ``out_dir``, writes ``report.json``, ``rollouts.jsonl`` (this model) and
    ``rollouts-base.jsonl`` (the base) there; the rollouts files are valid inputs to the reward
    audit (``mtrl audit --rollouts``).
    """
    from rewards.loading import load_reward
    from sopbench import get_task

    task = get_task(config.task)
    cases = task.cases(config.split)  # type: ignore[arg-type]
    if config.max_cases is not None:
        cases = cases[: config.max_cases]
    if not cases:
        raise UserError(f"eval: task {config.task} has no {config.split} cases")
    reward_fn = load_reward(config.reward)
    base = base_model_spec(model_or_path, config)
    runs: list[tuple[str, ModelSpec, str]] = []
    if base is not None:
        runs.append(("base", check_model_path(base), BASE_ROLLOUTS_FILE))
    if isinstance(model_or_path, (str, Path)):
        check_model_path(model_or_path)  # before the base model's run, not after it
    runs.append((label or ("tuned" if base is not None else "model"), model_or_path, ROLLOUTS_FILE))
    if config.temperature == 0.0 and config.n_samples > 1:
        logger.warning(
            "eval: n_samples=%d at temperature 0 gives identical samples", config.n_samples
        )

    out = Path(out_dir) if out_dir is not None else None
    report = EvalReport(config.task, config.split, asdict(config), [])
    for run_label, spec, filename in runs:
        start = time.perf_counter()
        policy = load_policy(spec, config)
        logger.info(
            "eval %s (%s): %s %s, %d cases x %d samples",
            run_label,
            policy.name,
            config.task,
            config.split,
            len(cases),
            config.n_samples,
        )
        trajectories = generate(policy, task, cases, config, reward_fn, progress=progress)
        summary = summarize(trajectories, task, config.success_threshold, config.n_samples)
        rollouts = _write_rollouts(out / filename, trajectories) if out is not None else None
        result = ModelResult(run_label, policy.name, summary, rollouts, time.perf_counter() - start)
        report.results.append(result)
        report.trajectories[run_label] = trajectories
        logger.info(
            "eval %s: tsr %.3f  pass@1 %.3f  completion %.3f  field_acc %.3f  (%.1fs)",
            run_label,
            summary["tsr"],
            summary["pass_at_1"],
            summary["completion_rate"],
            summary["field_acc"],
            result.wall_s,
        )
    if out is not None:
        logger.info("eval report: %s", report.save(out / REPORT_FILE))
    return report


# -- the table -------------------------------------------------------------------------------------
#: Rows of :func:`format_table`: (row label, summary key, format). ``{n}`` is the sample count.
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("cases", "n_cases", "int"),
    ("samples per case", "n_samples", "int"),
    ("TSR (strict)", "tsr", "frac"),
    ("pass@1 (strict)", "pass_at_1", "frac"),
    ("pass@{n} (strict)", "pass_at_{n}", "frac"),
    ("reward pass@1", "reward_pass_at_1", "frac"),
    ("reward pass@{n}", "reward_pass_at_{n}", "frac"),
    ("reward mean", "reward_mean", "float"),
    ("completion rate", "completion_rate", "frac"),
    ("field accuracy", "field_acc", "frac"),
    ("turns mean", "turns_mean", "float"),
    ("hit max_turns", "max_turns_frac", "frac"),
    ("tool calls mean", "tool_calls_mean", "float"),
    ("tool-error share", "tool_errors_frac", "frac"),
    ("truncated share", "truncated_frac", "frac"),
    ("env failure share", "failure_rate", "frac"),
    ("1st turn well-formed call", "first_turn_tool_call_frac", "frac"),
    ("reward ≠ strict", "reward_strict_disagree_frac", "frac"),
)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "int":
        return str(int(value))
    return f"{float(value):.3f}"


def format_table(reports: EvalReport | Sequence[EvalReport], title: str | None = None) -> Table:
    """A rich Table: one row per metric, one column per evaluated model (base before tuned).

    With exactly two columns a ``Δ`` column (second − first) is added. Per-field accuracies
    follow the field-accuracy row. The caller prints it; the library never does.
    """
    reports = [reports] if isinstance(reports, EvalReport) else list(reports)
    columns = [(rep, res) for rep in reports for res in rep.results]
    if not columns:
        raise ValueError("format_table: no results")
    first = reports[0]
    table = Table(title=title or f"evaluation: {first.task} ({first.split} split)")
    table.add_column("metric", no_wrap=True)
    for _, res in columns:
        table.add_column(res.label, justify="right")
    delta = len(columns) == 2
    if delta:
        table.add_column("Δ", justify="right")

    def add(label: str, values: list[Any], kind: str) -> None:
        cells = [_fmt(v, kind) for v in values]
        if delta:
            a, b = values
            cells.append("—" if a is None or b is None or kind == "int" else f"{b - a:+.3f}")
        table.add_row(label, *cells)

    fields: list[str] = []
    for _, res in columns:
        fields += [f for f in res.summary.get("field_acc_by_field", {}) if f not in fields]
    ns = [res.summary["n_samples"] for _, res in columns]
    for row_label, key, kind in TABLE_ROWS:
        if "{n}" in key and all(n == 1 for n in ns):
            continue  # pass@n is pass@1
        values = [res.summary.get(key.format(n=n)) for (_, res), n in zip(columns, ns, strict=True)]
        add(row_label.format(n="n" if len(set(ns)) > 1 else ns[0]), values, kind)
        if key == "tsr":  # per outcome (the task's decision field), most common first
            by_outcome = [res.summary.get("tsr_by_outcome") or {} for _, res in columns]
            outcome = next((r.summary.get("outcome_field") for _, r in columns), None)
            for value in dict.fromkeys(v for b in by_outcome for v in b):
                n = max(b.get(value, {}).get("trajectories", 0) for b in by_outcome)
                label = f"  where {outcome or 'outcome'} = {value} ({n})"
                add(label, [b.get(value, {}).get("tsr") for b in by_outcome], "frac")
        if key == "field_acc":  # the per-field breakdown right under the aggregate
            for name in fields:
                by_field = [res.summary.get("field_acc_by_field", {}) for _, res in columns]
                add(f"  {name}", [f.get(name) for f in by_field], "frac")
    return table


__all__ = [
    "EvalConfig",
    "EvalReport",
    "ModelResult",
    "Policy",
    "base_model_spec",
    "check_model_path",
    "default_out_dir",
    "evaluate",
    "first_turn_tool_call_ok",
    "format_table",
    "generate",
    "load_policy",
    "pass_at_k",
    "summarize",
    "val_metrics",
]
