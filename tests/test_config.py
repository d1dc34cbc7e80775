"""MultiTurnRLConfig: defaults < recipe < command line, TRL aliases, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrl_local.config import MultiTurnRLConfig, field_docs, load_config, parse_overrides
from mtrl_local.errors import UserError


def test_every_field_has_a_docstring() -> None:
    docs = field_docs()
    missing = [f for f in MultiTurnRLConfig.__dataclass_fields__ if f not in docs]
    assert missing == []


def test_recipe_then_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'loss_type = "cispo"\nepsilon = 1.0\nepsilon_high = 6.0\ngroup_size = 4\n'
        "batch_size = 16\n[val_sampling_params]\nsampling_max_tokens = 64\n"
        "[async_config]\nmax_steps_off_policy = 1\n"
    )
    cfg = load_config(recipe, parse_overrides(["learning_rate=3e-4", "epsilon_high=4"]))
    assert cfg.loss_type == "cispo"
    assert (cfg.epsilon_low, cfg.resolved_epsilon_high) == (1.0, 4.0)
    assert cfg.num_generations == 4
    assert (cfg.per_device_train_batch_size, cfg.prompts_per_step) == (16, 4)
    assert cfg.learning_rate == 3e-4
    # A nested table updates the field's default: validation stays greedy.
    assert cfg.val_sampling_params.temperature == 0.0
    assert cfg.val_sampling_params.sampling_max_tokens == 64
    assert cfg.async_config.max_steps_off_policy == 1


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["loss_type=foo"], "field 'loss_type' must be one of ppo, cispo, is"),
        (["nope=1"], "unknown field 'nope'"),
        (["max_steps=1.5"], "field 'max_steps' must be an integer"),
        (["mlflow=maybe"], "field 'mlflow' must be true or false"),
        (["batch_size=10"], "must be a multiple of num_generations"),
        (["async_config.max_steps_off_policy=-1"], "max_steps_off_policy must be ≥ 0"),
        (["val_sampling_params=2"], "must be a table of"),
        (["novalue"], "expected key=value"),
    ],
)
def test_bad_values_name_the_field(pairs: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config(None, parse_overrides(pairs))


def test_bad_recipe_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("loss_type = \n")
    with pytest.raises(UserError, match=f"{bad}: not valid TOML"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("learning_rat = 1e-3\n")
    with pytest.raises(UserError, match=f"{typo}: unknown field 'learning_rat'"):
        load_config(typo)
    with pytest.raises(UserError, match="no such recipe"):
        load_config(tmp_path / "missing.toml")


def test_clip_ranges_default_per_loss() -> None:
    assert (load_config().epsilon_low, load_config().resolved_epsilon_high) == (0.2, 0.2)
    cispo = load_config(None, {"loss_type": "cispo"})
    assert (cispo.epsilon_low, cispo.resolved_epsilon_high) == (1.0, 6.0)
    ppo = load_config(None, {"epsilon": "0.1"})
    assert (ppo.epsilon_low, ppo.resolved_epsilon_high) == (0.1, 0.2)
