"""Out-of-range config values: one line naming the field and its range, before anything is written.

Every numeric field has a range (positive, non-negative, a fraction, a count ≥ 1, finite), and the
cross-field rules tie fields together (batch size a multiple of the group size, pass_k within it).
A value outside is refused while the recipe and the command line are read — before the run
directory exists — with a :class:`UserError` naming the source, the field and the rule; through
``mtrl train`` that is exit code 2 with nothing on disk, so the corrected command just runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrl_local.cli import main
from mtrl_local.config import load_config, parse_overrides
from mtrl_local.errors import UserError
from mtrl_local.run_dir import RunDir

FINITE = "a finite number"
POSITIVE = f"{FINITE} > 0"
NON_NEGATIVE = f"{FINITE} ≥ 0"
COUNT = "an integer ≥ 1"
NON_NEGATIVE_INT = "an integer ≥ 0"

FIELD_CASES = [
    # sampling
    ("temperature=-1", "temperature", NON_NEGATIVE),
    ("temperature=nan", "temperature", NON_NEGATIVE),
    ("temperature=inf", "temperature", NON_NEGATIVE),
    ("top_p=0", "top_p", f"{FINITE} > 0 and ≤ 1"),
    ("top_p=1.5", "top_p", f"{FINITE} > 0 and ≤ 1"),
    ("sampling_max_tokens=0", "sampling_max_tokens", COUNT),
    ("max_turns=0", "max_turns", f"{COUNT} or none"),
    # batch shape
    ("seed=-1", "seed", "an integer ≥ 0 and ≤ 4294967295"),
    ("seed=4294967296", "seed", "an integer ≥ 0 and ≤ 4294967295"),
    ("num_generations=0", "num_generations", COUNT),
    ("group_size=-2", "group_size", COUNT),
    ("batch_size=0", "batch_size", COUNT),
    ("micro_batch_tokens=0", "micro_batch_tokens", COUNT),
    ("micro_batch_rows=-1", "micro_batch_rows", NON_NEGATIVE_INT),
    ("max_steps=0", "max_steps", COUNT),
    # objective
    ("pass_k=0", "pass_k", COUNT),
    ("success_threshold=nan", "success_threshold", FINITE),
    ("success_threshold=-inf", "success_threshold", FINITE),
    ("epsilon=-0.1", "epsilon", f"{FINITE} ≥ 0 and ≤ 1 or none"),
    ("epsilon=1.5", "epsilon", f"{FINITE} ≥ 0 and ≤ 1 or none"),
    ("epsilon_high=-0.2", "epsilon_high", f"{NON_NEGATIVE} or none"),
    ("epsilon_high=inf", "epsilon_high", f"{NON_NEGATIVE} or none"),
    ("is_cap=0.5", "is_cap", f"{FINITE} ≥ 1"),
    ("tis_cap=-1", "tis_cap", f"{FINITE} ≥ 1 or none"),
    ("tis_cap=0", "tis_cap", f"{FINITE} ≥ 1 or none"),
    ("beta=-0.1", "beta", NON_NEGATIVE),
    ("beta=nan", "beta", NON_NEGATIVE),
    ("num_iterations=0", "num_iterations", COUNT),
    # optimiser
    ("learning_rate=-1", "learning_rate", POSITIVE),
    ("learning_rate=0", "learning_rate", POSITIVE),
    ("learning_rate=nan", "learning_rate", POSITIVE),
    ("learning_rate=inf", "learning_rate", POSITIVE),
    ("weight_decay=-0.01", "weight_decay", NON_NEGATIVE),
    ("warmup_steps=-1", "warmup_steps", NON_NEGATIVE_INT),
    ("max_grad_norm=-1", "max_grad_norm", POSITIVE),
    ("max_grad_norm=0", "max_grad_norm", POSITIVE),
    ("max_grad_norm=nan", "max_grad_norm", POSITIVE),
    # model adaptation
    ("lora_rank=-1", "lora_rank", NON_NEGATIVE_INT),
    ("lora_alpha=0", "lora_alpha", COUNT),
    # evaluation, checkpoints
    ("eval_steps=-1", "eval_steps", NON_NEGATIVE_INT),
    ("eval_cases=0", "eval_cases", f"{COUNT} or none"),
    ("save_steps=-1", "save_steps", NON_NEGATIVE_INT),
    # names
    ("model=", "model", "a non-empty string"),
    ("reward=", "reward", "a non-empty string"),
    ("output_dir=", "output_dir", "a non-empty string"),
]

RUN_NAME = "a directory name (not empty, no '/' or '\\', not '.' or '..') or none"

NESTED_CASES = [
    ("val_sampling_params.temperature=-0.5", "val_sampling_params", "temperature", NON_NEGATIVE),
    ("val_sampling_params.top_p=0", "val_sampling_params", "top_p", f"{FINITE} > 0 and ≤ 1"),
    (
        "val_sampling_params.sampling_max_tokens=0",
        "val_sampling_params",
        "sampling_max_tokens",
        COUNT,
    ),
    ("val_sampling_params.n_samples=0", "val_sampling_params", "n_samples", COUNT),
    (
        "async_config.max_steps_off_policy=-1",
        "async_config",
        "max_steps_off_policy",
        NON_NEGATIVE_INT,
    ),
]

CROSS_CASES = [
    (
        ["batch_size=10"],
        "config: per_device_train_batch_size (10) must be a multiple of num_generations (8)",
    ),
    (
        ["advantage_method=grpo_passk", "pass_k=9"],
        "config: pass_k (9) must be between 1 and num_generations (8) for grpo_passk",
    ),
    (
        ["fsdp=true", "async_config.max_steps_off_policy=1"],
        "config: fsdp needs synchronous rollouts (async_config.max_steps_off_policy = 0)",
    ),
    (
        ["fsdp=true", "load_in_4bit=true", "lora_rank=8"],
        "config: fsdp and load_in_4bit cannot be combined (no sharded 4-bit)",
    ),
    (
        ["load_in_4bit=true"],
        "config: load_in_4bit needs lora_rank > 0 (4-bit weights are frozen)",
    ),
    (
        ["lora_rank=8", "lora_target_modules="],
        "config: lora_rank > 0 needs lora_target_modules: at least one module name, none empty",
    ),
]


def override_value(pair: str) -> str:
    return pair.partition("=")[2]


@pytest.mark.parametrize(("pair", "key", "rule"), FIELD_CASES)
def test_out_of_range_field_is_refused(pair: str, key: str, rule: str) -> None:
    with pytest.raises(UserError) as exc:
        load_config(None, parse_overrides([pair]))
    got = repr(override_value(pair))
    assert str(exc.value) == f"command line: field '{key}' must be {rule}, got {got}"


@pytest.mark.parametrize(("pair", "table", "key", "rule"), NESTED_CASES)
def test_out_of_range_nested_field_is_refused(pair: str, table: str, key: str, rule: str) -> None:
    with pytest.raises(UserError) as exc:
        load_config(None, parse_overrides([pair]))
    got = repr(override_value(pair))
    assert str(exc.value) == f"command line: {table}: field '{key}' must be {rule}, got {got}"


@pytest.mark.parametrize("name", ["", "a/b", "../x", "/tmp/x", ".", "..", "a\\b"])
def test_run_name_is_one_directory_name(name: str) -> None:
    with pytest.raises(UserError) as exc:
        load_config(None, {"run_name": name})
    assert str(exc.value) == f"command line: field 'run_name' must be {RUN_NAME}, got {name!r}"


@pytest.mark.parametrize(("pairs", "message"), CROSS_CASES)
def test_cross_field_rule_is_refused(pairs: list[str], message: str) -> None:
    with pytest.raises(UserError) as exc:
        load_config(None, parse_overrides(pairs))
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("line", "got"),
    [
        ("max_grad_norm = -1.0", "-1.0"),
        ("learning_rate = nan", "nan"),
        ("temperature = -inf", "-inf"),
        ("[val_sampling_params]\nn_samples = 0", "0"),
    ],
)
def test_recipe_value_out_of_range_names_the_file(tmp_path: Path, line: str, got: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(line + "\n")
    with pytest.raises(UserError, match=f"^{recipe}: .*field '.*' must be .*, got {got}$"):
        load_config(recipe)


def test_recipe_with_an_integer_too_long_for_python(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("max_steps = " + "9" * 5000 + "\n")
    with pytest.raises(UserError, match=f"^{recipe}: not valid TOML"):
        load_config(recipe)


def test_values_at_the_edges_of_their_ranges_are_accepted() -> None:
    pairs = [
        "temperature=0",
        "top_p=1",
        "seed=4294967295",
        "micro_batch_rows=0",
        "epsilon=0",
        "epsilon_high=0",
        "is_cap=1",
        "tis_cap=1",
        "beta=0",
        "weight_decay=0",
        "warmup_steps=0",
        "eval_steps=0",
        "save_steps=0",
        "lora_alpha=1",
        "success_threshold=-1",
        "run_name=run-1.b",
    ]
    cfg = load_config(None, parse_overrides(pairs))
    assert (cfg.temperature, cfg.top_p, cfg.seed, cfg.epsilon, cfg.tis_cap) == (
        0.0,
        1.0,
        4294967295,
        0.0,
        1.0,
    )
    assert (cfg.save_steps, cfg.run_name) == (0, "run-1.b")


# -- through the command line ----------------------------------------------------------------------
def train(out: Path, *args: str) -> list[str]:
    """``mtrl train`` arguments that would run one quick step if the config were accepted."""
    quick = ["--no-baseline", "--no-final-eval", "--max-steps", "1", "eval_steps=0", "mlflow=false"]
    return ["train", "--task", "aircraft_inspection", "--output-dir", str(out), *quick, *args]


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("max_grad_norm=-1", "field 'max_grad_norm' must be a finite number > 0, got '-1'"),
        ("learning_rate=-1", "field 'learning_rate' must be a finite number > 0, got '-1'"),
        ("learning_rate=nan", "field 'learning_rate' must be a finite number > 0, got 'nan'"),
        ("temperature=-1", "field 'temperature' must be a finite number ≥ 0, got '-1'"),
        ("epsilon_high=-1", "field 'epsilon_high' must be a finite number ≥ 0 or none, got '-1'"),
        ("tis_cap=-1", "field 'tis_cap' must be a finite number ≥ 1 or none, got '-1'"),
        ("beta=-1", "field 'beta' must be a finite number ≥ 0, got '-1'"),
        ("batch_size=3", "per_device_train_batch_size (3) must be a multiple of num_generations"),
    ],
)
def test_train_refuses_before_creating_the_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pair: str, message: str
) -> None:
    out = tmp_path / "runs"
    assert main(train(out, pair)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtrl: error: ") and message in err[0], err
    assert not out.exists()


def test_train_refuses_a_bad_max_steps_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    assert main([*train(out), "--max-steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mtrl: error: command line: field 'max_steps' must be an integer ≥ 1, got '0'"
    assert not out.exists()


def test_resume_refuses_a_bad_override_and_leaves_the_run_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text(load_config(None, {"task": "aircraft_inspection"}).model_dump_json())
    before = sorted(p.name for p in run.path.iterdir())
    assert main(["train", "--resume", str(run.path), "learning_rate=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("field 'learning_rate' must be a finite number > 0, got '-1'")
    assert sorted(p.name for p in run.path.iterdir()) == before
