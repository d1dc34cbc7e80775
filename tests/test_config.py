"""MultiTurnRLConfig: defaults < recipe < command line, TRL aliases, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from mtrl_local.config import (
    AsyncConfig,
    MultiTurnRLConfig,
    SamplingConfig,
    load_config,
    parse_overrides,
)
from mtrl_local.errors import UserError


@pytest.mark.parametrize("model", [MultiTurnRLConfig, SamplingConfig, AsyncConfig])
def test_every_field_has_a_description(model: type[BaseModel]) -> None:
    missing = [name for name, f in model.model_fields.items() if not (f.description or "").strip()]
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
        (
            ["async_config.max_steps_off_policy=-1"],
            "async_config: field 'max_steps_off_policy' must be an integer ≥ 0",
        ),
        (["val_sampling_params=2"], "must be a table of"),
        (["val_sampling_params.nope=1"], "command line: val_sampling_params: unknown field 'nope'"),
        (["group_size=x"], "field 'group_size' must be an integer"),
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
    # cispo's ε_high is the cap on its weight (TRL's meaning): 7.0 = the 1 + 6.0 it used to be.
    cispo = load_config(None, {"loss_type": "cispo"})
    assert (cispo.epsilon_low, cispo.resolved_epsilon_high) == (1.0, 7.0)
    ppo = load_config(None, {"epsilon": "0.1"})
    assert (ppo.epsilon_low, ppo.resolved_epsilon_high) == (0.1, 0.2)


def test_bool_is_not_a_number_in_a_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("max_steps = true\n")
    with pytest.raises(
        UserError, match=f"{recipe}: field 'max_steps' must be an integer ≥ 1, got True"
    ):
        load_config(recipe)
    recipe.write_text("mlflow = 1\n")
    with pytest.raises(UserError, match="field 'mlflow' must be true or false, got 1"):
        load_config(recipe)


def test_command_line_strings_are_converted() -> None:
    cfg = load_config(
        None,
        parse_overrides(
            ["epsilon=none", "tis_cap=NULL", "mlflow=no", "bf16=yes", "lora_target_modules=a, b,"]
        ),
    )
    assert (cfg.epsilon, cfg.tis_cap) == (None, None)
    assert (cfg.mlflow, cfg.bf16) == (False, True)
    assert cfg.lora_target_modules == ["a", "b"]
    # ``none`` is None only where the type admits None.
    assert load_config(None, {"scale_rewards": "none"}).scale_rewards == "none"


def test_nested_override_keeps_the_fields_default() -> None:
    cfg = load_config(None, parse_overrides(["val_sampling_params.n_samples=2"]))
    assert (cfg.val_sampling_params.temperature, cfg.val_sampling_params.n_samples) == (0.0, 2)


def test_later_source_wins_and_tables_merge(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("group_size = 4\n[val_sampling_params]\ntemperature = 0.5\n")
    overrides = parse_overrides(["num_generations=2", "val_sampling_params.n_samples=3"])
    cfg = load_config(recipe, overrides)
    assert cfg.num_generations == 2
    assert (cfg.val_sampling_params.temperature, cfg.val_sampling_params.n_samples) == (0.5, 3)


def test_constructor_checks_cross_field_rules() -> None:
    with pytest.raises(UserError, match="must be a multiple of num_generations"):
        MultiTurnRLConfig(per_device_train_batch_size=10, num_generations=4)
    cfg = MultiTurnRLConfig()
    cfg.max_steps = 1
    assert cfg.max_steps == 1


def test_to_dict_round_trips() -> None:
    cfg = load_config(None, parse_overrides(["loss_type=cispo", "val_sampling_params.n_samples=4"]))
    data = cfg.to_dict()
    assert data["val_sampling_params"] == {
        "temperature": 0.0,
        "top_p": 1.0,
        "sampling_max_tokens": 96,
        "n_samples": 4,
    }
    assert load_config(None, data) == cfg


def test_cispo_epsilon_high_is_a_cap_of_at_least_one() -> None:
    # 0.28 is a fine ε_high for ppo (ratio ≤ 1.28) but as cispo's cap it would shrink every
    # on-policy token's weight to 0.28: refused, saying why.
    assert load_config(None, {"epsilon_high": "0.28"}).resolved_epsilon_high == 0.28
    with pytest.raises(UserError, match=r"epsilon_high .* cap on cispo's IS weight .* ≥ 1"):
        load_config(None, {"loss_type": "cispo", "epsilon_high": "0.28"})


def test_algorithm_options_default_off_and_parse() -> None:
    cfg = load_config()
    assert (cfg.importance_sampling_level, cfg.loss_aggregation) == ("token", "token_mean")
    assert (cfg.kl_estimator, cfg.is_correction, cfg.entropy_coef) == ("k3", "token_truncate", 0)
    assert (cfg.mask_truncated, cfg.dynamic_sampling, cfg.max_refill_rounds) == (False, False, 3)
    cfg = load_config(
        None,
        parse_overrides(
            [
                "importance_sampling_level=sequence",
                "loss_aggregation=dr_grpo",
                "kl_estimator=k2",
                "is_correction=sequence_mask",
                "entropy_coef=0.01",
                "mask_truncated=true",
                "dynamic_sampling=yes",
                "max_refill_rounds=0",
            ]
        ),
    )
    assert (cfg.importance_sampling_level, cfg.loss_aggregation) == ("sequence", "dr_grpo")
    assert (cfg.kl_estimator, cfg.is_correction) == ("k2", "sequence_mask")
    assert (cfg.entropy_coef, cfg.mask_truncated, cfg.dynamic_sampling) == (0.01, True, True)
    assert cfg.max_refill_rounds == 0
    for pair, message in [
        ("kl_estimator=k4", "field 'kl_estimator' must be one of k1, k2, k3"),
        ("importance_sampling_level=seq", "must be one of token, sequence"),
        ("entropy_coef=-0.1", "field 'entropy_coef' must be a finite number ≥ 0"),
        ("max_refill_rounds=-1", "field 'max_refill_rounds' must be an integer ≥ 0"),
    ]:
        with pytest.raises(UserError, match=message):
            load_config(None, parse_overrides([pair]))
