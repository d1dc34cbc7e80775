"""Bad input on the command line: one line naming the file or field, exit code 2, nothing written.

Each case runs ``mtrl`` as a real subprocess, as a user would, and asserts the exact outcome: exit
code 2, no traceback, exactly one ``mtrl: error:`` line that names the culprit, and no output
file or run directory left behind.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mtrl_local.run_dir import STORE_FILENAME

MTRL = [sys.executable, "-m", "mtrl_local.cli"]
SHIPPED = Path(__file__).resolve().parents[2] / "sopbench" / "default_model" / "shipped"
ERROR_LINE = re.compile(r"^mtrl( [a-z]+)?: error: ")
NOT_UTF8 = b"\xff\xfe\x00bad \xc3\x28 bytes\n"


def mtrl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MTRL, *args], capture_output=True, text=True, cwd=cwd, timeout=900, check=False
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, no traceback, one ``mtrl[ command]: error:`` line (logging before it is allowed)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------- files that are bad


def test_recipe_not_utf8(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(NOT_UTF8)
    out = tmp_path / "runs"
    proc = mtrl(
        "train", "--recipe", str(recipe), "--task", "aircraft_inspection", "--output-dir", str(out)
    )
    assert_one_line_error(proc, str(recipe), "UTF-8")
    assert not out.exists()


def test_recipe_not_toml(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("learning_rate = = 3\n")
    proc = mtrl(
        "train",
        "--recipe",
        str(recipe),
        "--task",
        "aircraft_inspection",
        "--output-dir",
        str(tmp_path / "runs"),
    )
    assert_one_line_error(proc, str(recipe))
    assert not (tmp_path / "runs").exists()


def test_cases_file_not_utf8(tmp_path: Path) -> None:
    cases = tmp_path / "c.jsonl"
    cases.write_bytes(NOT_UTF8)
    assert_one_line_error(
        mtrl("validate", "aircraft_inspection", "--cases", str(cases)), str(cases), "UTF-8"
    )


def test_rollouts_file_not_utf8(tmp_path: Path) -> None:
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_bytes(NOT_UTF8)
    assert_one_line_error(mtrl("audit", "--rollouts", str(rollouts)), str(rollouts), "UTF-8")


@pytest.mark.parametrize("command", ["validate", "audit"])
def test_deeply_nested_json_line(tmp_path: Path, command: str) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    argv = (
        ["validate", "aircraft_inspection", "--cases", str(path)]
        if command == "validate"
        else ["audit", "--rollouts", str(path)]
    )
    assert_one_line_error(mtrl(*argv), f"{path}:1", "nested")


def test_rollouts_file_is_a_directory(tmp_path: Path) -> None:
    assert_one_line_error(mtrl("audit", "--rollouts", str(tmp_path)), str(tmp_path))


# ---------------------------------------------------------------------------- reward modules


@pytest.fixture
def reward_dir(tmp_path: Path) -> Path:
    (tmp_path / "raises_at_import.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "syntax_error.py").write_text("def reward(:\n")
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "raising_reward.py").write_text(
        "def reward(messages, ground_truth, **kw):\n    raise KeyError('no such field')\n"
    )
    (tmp_path / "nan_reward.py").write_text(
        "def reward(messages, ground_truth, **kw):\n    return float('nan'), {}\n"
    )
    (tmp_path / "dict_reward.py").write_text(
        "def reward(messages, ground_truth, **kw):\n    return {'reward': 1.0}\n"
    )
    return tmp_path


#: The smallest real evaluation: the embedded model, one case, two turns of 16 tokens.
EVAL = ["eval", "--task", "aircraft_inspection", "--model", "default", "--max-cases", "1"]
EVAL_SHORT = [*EVAL, "--max-turns", "2", "--max-tokens", "16"]


def _eval(tmp_path: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return mtrl(*EVAL_SHORT, "--out", str(tmp_path / "out"), *extra, cwd=cwd)


@pytest.mark.parametrize(
    ("module", "fragment"),
    [
        ("raises_at_import", "boom at import"),
        ("syntax_error", "syntax_error"),
        ("exits_at_import", "exits_at_import"),
    ],
)
def test_reward_module_broken_at_import(reward_dir: Path, module: str, fragment: str) -> None:
    proc = mtrl("audit", "--reward", f"{module}:reward", cwd=reward_dir)
    assert_one_line_error(proc, f"{module}:reward", fragment)


@pytest.mark.parametrize(
    ("module", "fragment"),
    [
        ("raising_reward", "KeyError"),
        ("nan_reward", "finite"),
        ("dict_reward", "returned a dict"),
    ],
)
def test_reward_that_fails_during_eval(reward_dir: Path, module: str, fragment: str) -> None:
    proc = _eval(reward_dir, "--reward", f"{module}:reward", cwd=reward_dir)
    assert_one_line_error(proc, f"{module}:reward", fragment)
    assert not (reward_dir / "out").exists() or not any((reward_dir / "out").iterdir())


# ---------------------------------------------------------------------------- model directories


def _copy_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(SHIPPED, model)
    return model


def test_model_dir_with_broken_config(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    (model / "config.json").write_text('{"model_type": "llama", ')
    proc = mtrl(*EVAL[:3], "--model", str(model), "--max-cases", "1")
    assert_one_line_error(proc, "config.json")


def test_model_dir_with_unknown_architecture(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (model / "config.json").write_text(json.dumps(config))
    proc = mtrl(*EVAL[:3], "--model", str(model), "--max-cases", "1")
    assert_one_line_error(proc, str(model), "config.json")


def test_model_dir_without_tokenizer(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    proc = mtrl(*EVAL[:3], "--model", str(model), "--max-cases", "1")
    assert_one_line_error(proc, str(model), "tokenizer")


def test_model_dir_with_truncated_weights(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    proc = mtrl(*EVAL[:3], "--model", str(model), "--max-cases", "1")
    assert_one_line_error(proc, str(model), "weights")


def test_model_dir_without_weights(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    (model / "model.safetensors").unlink()
    proc = mtrl(*EVAL[:3], "--model", str(model), "--max-cases", "1")
    assert_one_line_error(proc, str(model), "weights")


# ---------------------------------------------------------------------------- flags out of range


def test_export_out_is_a_directory(tmp_path: Path) -> None:
    proc = mtrl("export", "cases", "aircraft_inspection", "--split", "val", "--out", str(tmp_path))
    assert_one_line_error(proc, str(tmp_path), "directory")


def test_export_out_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "cases.jsonl"
    proc = mtrl("export", "cases", "aircraft_inspection", "--split", "val", "--out", str(out))
    assert_one_line_error(proc, str(out))
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("rate", ["5", "-0.1", "nan"])
def test_export_noise_rate_out_of_range(tmp_path: Path, rate: str) -> None:
    out = tmp_path / "noisy.jsonl"
    proc = mtrl(
        "export",
        "noisy",
        "aircraft_inspection",
        "--split",
        "val",
        "--out",
        str(out),
        "--noise-rate",
        rate,
    )
    assert_one_line_error(proc, "--noise-rate")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-batch", "0"),
        ("--max-batch", "-4"),
        ("--max-tokens", "0"),
        ("--max-turns", "0"),
        ("--max-cases", "0"),
        ("--n", "0"),
        ("--temperature", "-1"),
        ("--temperature", "nan"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
    ],
)
def test_eval_flag_out_of_range(tmp_path: Path, flag: str, value: str) -> None:
    proc = _eval(tmp_path, flag, value)
    assert_one_line_error(proc, flag)
    assert not (tmp_path / "out").exists()


def test_eval_on_cuda_without_cuda(tmp_path: Path) -> None:
    proc = _eval(tmp_path, "--device", "cuda")
    assert_one_line_error(proc, "cuda", "not available")
    assert not (tmp_path / "out").exists()


def test_eval_out_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("keep me")
    proc = mtrl(*EVAL, "--out", str(out))
    assert_one_line_error(proc, str(out))
    assert out.read_text() == "keep me"


def test_resume_of_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    proc = mtrl("train", "--resume", str(tmp_path))
    assert_one_line_error(proc, str(tmp_path), "not a run directory")
    assert not (tmp_path / STORE_FILENAME).exists()


def test_resume_with_a_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    proc = mtrl("train", "--resume", str(tmp_path))
    assert_one_line_error(proc, "config.json")
    assert not (tmp_path / STORE_FILENAME).exists()


def test_reward_that_raises_during_training(reward_dir: Path) -> None:
    runs = reward_dir / "runs"
    proc = mtrl(
        "train", "--task", "aircraft_inspection", "--no-baseline", "--no-final-eval",
        "--output-dir", str(runs), "reward=raising_reward:reward", "max_steps=1", "group_size=2",
        "batch_size=2", "max_turns=2", "sampling_max_tokens=16", "eval_steps=0",
        cwd=reward_dir,
    )  # fmt: skip
    assert_one_line_error(proc, "raising_reward:reward", "KeyError")
    [store_path] = runs.glob(f"*/{STORE_FILENAME}")
    with sqlite3.connect(store_path) as conn:
        [(status, message)] = conn.execute("SELECT status, message FROM runs").fetchall()
    assert status == "failed" and "no such field" in message
