"""The rollout server: OpenAI protocol, auth, exact token histories, batching, and training an
external agent end to end (the example agent as a subprocess, through the real ``openai`` client).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.config import load_config
from mtrl_local.model_io import load_model
from mtrl_local.plugins import resolve_agent
from mtrl_local.rollout.sampler import (
    GenerationRequest,
    GenerationResult,
    Sampler,
    SamplingParams,
)
from mtrl_local.rollout.transformers_sampler import TransformersSampler
from mtrl_local.server import EPISODE_HEADER, RolloutServer
from mtrl_local.server.episodes import EpisodeRecord
from mtrl_local.server.source import agent_source_factory
from mtrl_local.train.batch_source import StepBatch
from mtrl_local.train.trainer import Trainer
from tests.trainer_fixtures import build_tiny_model, make_trainer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_aircraft",
            "description": "Registry record.",
            "parameters": {"type": "object", "properties": {"aircraft_id": {"type": "string"}}},
        },
    }
]
CALL = '<tool_call>{"name": "lookup_aircraft", "arguments": {"aircraft_id": "AC-1"}}</tool_call>'
FINAL = '<final_response>{"aircraft_ready": true}</final_response>'


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_model(str(tiny_model))[1]


class TextSampler:
    """Answers every row with the next of ``texts`` (cycling); records each call's rows."""

    def __init__(self, tokenizer: Any, texts: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.eos_token_id: int = tokenizer.eos_token_id
        self.policy_version = 0
        self.max_context_len: int | None = None
        self.calls: list[list[GenerationRequest]] = []
        self.results: dict[str, list[list[int]]] = {}
        self._lock = threading.Lock()

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[GenerationResult]:
        self.calls.append(list(requests))
        out = []
        for r in requests:
            with self._lock:
                text = self.texts[sum(map(len, self.results.values())) % len(self.texts)]
            ids = ChatCodec(self.tokenizer).encode_assistant(text)[: params.max_tokens]
            self.results.setdefault(r.key, []).append(ids)
            finish = "stop" if ids[-1] == self.eos_token_id else "length"
            out.append(GenerationResult(ids, [-0.5] * len(ids), finish))  # type: ignore[arg-type]
        return out

    def release(self, key: str) -> None:
        pass

    def load_state_dict(self, state: Mapping[str, Any], version: int) -> None:
        self.policy_version = version


def serve(sampler: Any, tokenizer: Any, **kwargs: Any) -> RolloutServer:
    kwargs.setdefault("sampling", SamplingParams(max_tokens=64))
    return RolloutServer(sampler, tokenizer, token=TOKEN, **kwargs).start()


def client(server: RolloutServer, episode: EpisodeRecord) -> openai.OpenAI:
    """An agent's client: the episode's own key, and (optional, checked) its id in the header."""
    headers = {EPISODE_HEADER: episode.episode_id}
    return openai.OpenAI(
        base_url=server.url, api_key=episode.key, max_retries=0, default_headers=headers
    )


def opening() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Inspect aircraft."},
        {"role": "user", "content": "Inspect AC-1."},
    ]


def test_turns_are_recorded_by_appending_ids(tokenizer: Any) -> None:
    sampler = TextSampler(tokenizer, [CALL, FINAL])
    with serve(sampler, tokenizer) as server:
        rec = server.registry.assign(EpisodeRecord("ep1", task="t", case_id="c", group_id="g"))
        api = client(server, rec)
        messages = opening()
        first = api.chat.completions.create(model="policy", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.function.name == "lookup_aircraft"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == {"aircraft_id": "AC-1"}  # type: ignore[union-attr]
        messages.append(choice.message.model_dump(exclude_none=True))
        tool = {"role": "tool", "tool_call_id": call.id, "content": '{"tail_number": "N1"}'}
        messages.append(tool)
        second = api.chat.completions.create(model="policy", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        assert second.choices[0].finish_reason == "stop"
        assert second.choices[0].message.content == FINAL
        r = httpx.post(
            f"{server.url}/episodes/ep1/reward",
            headers={"Authorization": f"Bearer {rec.key}"},
            json={"reward": [0.0, 1.0], "metrics": {"field_acc": 1.0}},
        )
        assert r.status_code == 200 and r.json()["state"] == "finished"
        traj = server.registry.trajectory("ep1")
    traj.check()
    turn0, turn1 = sampler.results["ep1"]
    prompt = ChatCodec(tokenizer).encode_prompt(opening(), TOOLS)
    glue = ChatCodec(tokenizer).encode_continuation([{"role": "tool", "content": tool["content"]}])
    assert traj.input_ids == prompt + turn0 + glue + turn1
    assert [traj.input_ids[s.start : s.end] for s in traj.turns] == [turn0, turn1]
    # The second request's context is exactly the first's plus what was sampled and the glue.
    assert list(sampler.calls[1][0].context_ids) == prompt + turn0 + glue
    assert traj.loss_mask.count(1) == len(turn0) + len(turn1)
    assert traj.reward == [0.0, 1.0] and traj.metrics == {"field_acc": 1.0}
    assert not traj.failed and traj.done_reason == "final_answer"
    assert traj.messages[2]["content"] == CALL  # the raw model text, not the OpenAI rewrite


def test_rewritten_history_is_detected_and_not_trained(tokenizer: Any) -> None:
    sampler = TextSampler(tokenizer, [CALL])
    with serve(sampler, tokenizer) as server:
        rec = server.registry.assign(EpisodeRecord("ep", group_id="g"))
        api = client(server, rec)
        messages = opening()
        reply = api.chat.completions.create(model="policy", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        messages.append(reply.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "content": "ok"})
        messages[1] = {"role": "user", "content": "Inspect AC-2 instead."}  # history rewritten
        again = api.chat.completions.create(model="policy", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        assert again.choices[0].finish_reason == "tool_calls"  # the agent is still served
        assert again.model_extra and again.model_extra["mtrl"]["recorded"] is False
        server.registry.report("ep", 1.0, {}, None, close=True)
        traj = server.registry.trajectory("ep")
        assert server.registry.stats["history_mismatch"] == 1
    assert traj.failed and traj.counters["history_mismatch"] == 1 and traj.reward is None


def test_retry_rolls_back_and_other_choice_is_recorded(tokenizer: Any) -> None:
    sampler = TextSampler(tokenizer, ["first answer", "second answer", "third answer"])
    with serve(sampler, tokenizer) as server:
        rec = server.registry.assign(EpisodeRecord("ep", group_id="g"))
        api = client(server, rec)
        messages = opening()
        api.chat.completions.create(model="policy", messages=messages)  # type: ignore[arg-type]
        # A retry (same history, our reply dropped) rolls the turn back and samples it again.
        api.chat.completions.create(model="policy", messages=messages)  # type: ignore[arg-type]
        rec = server.registry.get("ep")
        assert rec.counters["rollbacks"] == 1 and len(rec.turns) == 1
        # n = 2: the agent continues with choice 1; its ids replace choice 0's.
        two = api.chat.completions.create(model="policy", messages=messages, n=2)  # type: ignore[arg-type]
        picked = two.choices[1].message
        messages.append(picked.model_dump(exclude_none=True))
        messages.append({"role": "user", "content": "go on"})
        api.chat.completions.create(model="policy", messages=messages)  # type: ignore[arg-type]
        server.registry.report("ep", 0.5, {}, None, close=True)
        traj = server.registry.trajectory("ep")
    traj.check()
    assert traj.counters["other_choice"] == 1
    span = traj.turns[0]
    assert traj.input_ids[span.start : span.end] == sampler.results["ep~1"][-1]
    assert traj.messages[2]["content"] == picked.content


def test_auth_and_malformed_bodies(tokenizer: Any) -> None:
    with serve(TextSampler(tokenizer, [FINAL]), tokenizer) as server:
        rec = server.registry.assign(EpisodeRecord("ep", group_id="g"))
        url, auth = server.url, {"Authorization": f"Bearer {rec.key}"}
        body = {"messages": opening()}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(
                model="policy",
                messages=opening(),  # type: ignore[arg-type]
                user="ep",
            )
        assert httpx.post(f"{url}/chat/completions", json=body).status_code == 401
        assert httpx.get(f"{url}/models").status_code == 401
        cases: list[tuple[dict[str, Any], str]] = [
            ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "JSON"),
            ({"json": {"messages": []}}, "messages"),
            ({"json": {"messages": [{"role": "robot", "content": "x"}]}}, "role"),
            ({"json": {**body, "temperature": "hot"}}, "temperature"),
            ({"json": {**body, "stream": True, "user": "ep"}}, "stream"),
        ]
        for kwargs, word in cases:
            headers = {**auth, **kwargs.pop("headers", {})}
            r = httpx.post(f"{url}/chat/completions", headers=headers, **kwargs)
            assert r.status_code == 400, (word, r.text)
            assert word.lower() in r.json()["error"]["message"].lower(), r.text
        # The server token opens episodes but acts on none; a key acts on its own episode only.
        server_token = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(f"{url}/chat/completions", headers=server_token, json=body)
        assert r.status_code == 401 and "episode key" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/chat/completions", headers=auth, json={**body, "user": "nope"})
        assert r.status_code == 401 and "'nope'" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/chat/completions", headers=auth, json={**body, "user": "ep"})
        assert ok.status_code == 200
        bad = httpx.post(f"{url}/episodes/ep/reward", headers=auth, json={"reward": [1, 2, 3]})
        assert bad.status_code == 400 and "per-turn" in bad.json()["error"]["message"]
        assert httpx.post(f"{url}/episodes/ep/reward", headers=auth, json={}).status_code == 400
        assert httpx.get(f"{url.removesuffix('/v1')}/health").status_code == 200


def test_concurrent_episodes_share_one_generate_call(tokenizer: Any) -> None:
    sampler = TextSampler(tokenizer, [FINAL])
    with serve(sampler, tokenizer, batch_window_s=0.2) as server:
        recs = [server.registry.assign(EpisodeRecord(f"ep{i}", group_id="g")) for i in range(6)]
        barrier = threading.Barrier(len(recs))

        def ask(episode: EpisodeRecord) -> None:
            barrier.wait()
            client(server, episode).chat.completions.create(model="policy", messages=opening())  # type: ignore[arg-type]

        threads = [threading.Thread(target=ask, args=(r,)) for r in recs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(len(c) for c in sampler.calls) == 6
    assert max(len(c) for c in sampler.calls) >= 3, [len(c) for c in sampler.calls]


class RecordingSampler:
    """Wraps the real sampler and keeps every (context, sampled ids) per episode key."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.eos_token_id = inner.eos_token_id
        self.max_context_len = inner.max_context_len
        self.seen: dict[str, list[tuple[list[int], list[int], list[float]]]] = {}

    @property
    def policy_version(self) -> int:
        return self.inner.policy_version

    @policy_version.setter
    def policy_version(self, value: int) -> None:
        self.inner.policy_version = value

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[GenerationResult]:
        results = self.inner.generate(requests, params)
        for r, res in zip(requests, results, strict=True):
            entry = (list(r.context_ids), list(res.token_ids), list(res.logprobs))
            self.seen.setdefault(r.key, []).append(entry)
        return results

    def release(self, key: str) -> None:
        self.inner.release(key)

    def load_state_dict(self, state: Mapping[str, Any], version: int) -> None:
        self.inner.invalidate(version)  # type: ignore[attr-defined]  # shares the trainer's model


def agent_trainer(model: Path, out: Path, agent: str, batch: int = 8, **source: Any) -> Trainer:
    """A trainer on ``agent`` (a command line or ``module:function``, resolved as the CLI does)."""
    cfg = load_config(
        None,
        {
            "task": "aircraft_inspection",
            "model": str(model),
            "output_dir": str(out),
            "run_name": "agent",
            "max_steps": 2,
            "num_generations": 4,
            "per_device_train_batch_size": batch,
            "sampling_max_tokens": 24,
            "eval_steps": 0,
            "save_steps": 0,
            "mlflow": False,
            "learning_rate": 1e-2,
        },
    )
    holder: dict[str, RecordingSampler] = {}

    def factory(trainer: Trainer) -> Any:
        inner = TransformersSampler(trainer.model, trainer.tokenizer, device=trainer.device)  # type: ignore[arg-type]
        holder["sampler"] = RecordingSampler(inner)
        factory = agent_source_factory(resolve_agent(agent), sampler=holder["sampler"], **source)
        return factory(trainer)

    trainer = make_trainer(cfg, progress=False, source_factory=factory)
    trainer.recording = holder["sampler"]  # type: ignore[attr-defined]
    return trainer


def capture_batches(trainer: Trainer) -> list[StepBatch]:
    batches: list[StepBatch] = []
    original = trainer.source.next_batch

    def next_batch(step: int) -> StepBatch:
        batch = original(step)
        batches.append(batch)
        return batch

    trainer.source.next_batch = next_batch  # type: ignore[method-assign]
    return batches


def test_example_agent_trains_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    agent = f"{sys.executable} {ROOT / 'examples' / 'aircraft_agent.py'} --length-penalty 0.01"
    trainer = agent_trainer(tiny_model, tmp_path, agent)
    batches = capture_batches(trainer)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    state = trainer.train()
    after = dict(trainer.model.named_parameters())
    assert state.step == 2
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"

    rows = trainer.store.trajectories(with_messages=True)
    assert len(rows) == 16 and not any(r.failed for r in rows)
    # The reward is the agent's: dense reward (no answer: -0.1) minus its length term.
    for r in rows:
        assert r.metrics["completion"] == 0.0
        assert r.reward == pytest.approx(-0.1 - 0.01 * r.metrics["chars"] / 1000)
        assert r.messages and r.messages[0]["role"] == "system"
        assert r.messages[-1]["role"] == "assistant"
    recording: RecordingSampler = trainer.recording  # type: ignore[attr-defined]
    for batch in batches:
        for traj in batch.trajectories:
            traj.check()
            seen = recording.seen[f"s{batch.policy_version:05d}-{traj.case_id}-{traj.sample_index}"]
            assert len(seen) == traj.n_turns
            for span, (context, ids, logprobs) in zip(traj.turns, seen, strict=True):
                assert traj.input_ids[: span.start] == context
                assert traj.input_ids[span.start : span.end] == ids
                assert traj.behaviour_logprobs[span.start : span.end] == logprobs
    assert trainer.store.latest_metrics()["rollout/failure_rate"] == 0.0
    trainer.close()


def test_example_agent_runs_standalone_on_a_key_of_its_own(tokenizer: Any) -> None:
    """Without the trainer: the server token opens an episode, its returned key runs it."""
    sampler = TextSampler(tokenizer, [FINAL])
    with serve(sampler, tokenizer) as server:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MTRL_", "OPENAI_"))},
            "OPENAI_BASE_URL": server.url,
            "OPENAI_API_KEY": TOKEN,
        }
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "aircraft_agent.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        (episode,) = server.registry.ids()
        rec = server.registry.get(episode)
    assert rec.state == "finished" and not rec.assigned and len(rec.turns) == 1
    assert isinstance(rec.reward, float) and rec.done_reason == "final_answer"


FLAKY_AGENT = """
import os, sys, time, runpy
from openai import OpenAI
index = int(os.environ["MTRL_SAMPLE_INDEX"])
if index < 2:  # one turn, then: 0 crashes, 1 never reports (silent until killed)
    OpenAI(max_retries=0).chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Episode-Id": os.environ["MTRL_EPISODE_ID"]})
    if index == 0:
        raise SystemExit("agent crashed")
    time.sleep(120)
sys.argv = ["aircraft_agent.py", "--length-penalty", "0.01"]
runpy.run_path(os.environ["EXAMPLE_AGENT"], run_name="__main__")
"""


def test_crashed_and_silent_agents_are_counted_failures(tiny_model: Path, tmp_path: Path) -> None:
    script = tmp_path / "flaky_agent.py"
    script.write_text(FLAKY_AGENT)
    trainer = agent_trainer(
        tiny_model,
        tmp_path,
        f"{sys.executable} {script}",
        batch=4,
        idle_timeout_s=4.0,
        agent_env={"EXAMPLE_AGENT": str(ROOT / "examples" / "aircraft_agent.py")},
    )
    trainer.cfg.max_steps = 1
    state = trainer.train()
    assert state.step == 1  # training went on
    rows = trainer.store.trajectories()
    failed = {r.sample_index for r in rows if r.failed}
    assert failed == {0, 1} and len(rows) == 4
    metrics = trainer.store.latest_metrics()
    assert metrics["rollout/failure_rate"] == pytest.approx(0.5)
    assert metrics["agent/crashes"] == 1 and metrics["agent/timeouts"] == 1
    assert (trainer.run_dir / "agents" / "step-00000").is_dir()
    trainer.close()
