"""An aircraft-inspection agent written only against the ``openai`` client, trained by mtrl-local.

It is an ordinary tool-calling agent: its own loop over ``chat.completions.create`` with tools, its
own tool implementations (the suite's fixture tools, used as a local library through
``load_task("aircraft_inspection").make_env()``), its own reward (the dense reward of its final
answer against the case's ground truth). What makes it trainable is three lines: the client's
``base_url`` and ``api_key`` come from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (the openai client
reads them itself), every request carries the episode id (``X-Episode-Id``), and at the end it
reports its reward to ``POST /v1/episodes/{id}/reward``.

Under the trainer (``mtrl train --agent-cmd "python examples/aircraft_agent.py"``) each process runs
the one episode named by ``MTRL_EPISODE_ID`` / ``MTRL_CASE_ID``, and ``OPENAI_API_KEY`` is that
episode's own key (valid for it alone). Standalone, against a running rollout server, it opens an
episode of its own for ``--case-id`` (default: the first train case) with the server token, then
switches to the ``episode_key`` the server returned, which every call on that episode needs::

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=<server token> \
        python examples/aircraft_agent.py

A random or weak model rarely writes a valid tool call: then the reply has no ``tool_calls``, the
agent treats it as its answer and the episode ends (reward −0.1 for no parseable answer).
``--length-penalty`` adds a small brevity term (per 1,000 characters the model wrote), a common
agent-side shaping that also separates otherwise equal rewards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, cast

from openai import OpenAI

from mtrl_local.plugins import load_task
from rewards.dense import dense_reward

logger = logging.getLogger("aircraft_agent")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default=os.environ.get("MTRL_TASK", "aircraft_inspection"))
    p.add_argument("--case-id", default=os.environ.get("MTRL_CASE_ID"))
    p.add_argument("--max-turns", type=int, default=int(os.environ.get("MTRL_MAX_TURNS", "15")))
    p.add_argument("--max-tokens", type=int, default=int(os.environ.get("MTRL_MAX_TOKENS", "256")))
    p.add_argument("--model", default="policy")
    p.add_argument("--length-penalty", type=float, default=0.0, help="reward per 1k characters")
    return p.parse_args()


def start_episode(client: OpenAI, args: argparse.Namespace) -> dict[str, Any]:
    """Claim the trainer's episode (``MTRL_EPISODE_ID``) or open one of our own."""
    body: dict[str, Any] = {}
    if os.environ.get("MTRL_EPISODE_ID"):
        body["episode_id"] = os.environ["MTRL_EPISODE_ID"]
    else:
        task = load_task(args.task)
        body.update(task=args.task, case_id=args.case_id or task.cases("train")[0].case_id)
    return cast(dict[str, Any], client.post("/episodes", body=body, cast_to=object))


def run_episode(client: OpenAI, args: argparse.Namespace, info: dict[str, Any]) -> None:
    episode_id = info["episode_id"]
    task = load_task(info["task"] or args.task)
    case = task.case(info["case_id"])
    env = task.make_env()  # the suite's fixture tools, as a local tool library
    messages: list[dict[str, Any]] = list(env.reset(case, info.get("seed") or 0))
    tools = env.tool_schemas()
    done_reason = "max_turns"
    try:
        for _ in range(info.get("max_turns") or args.max_turns):
            response = client.chat.completions.create(
                model=args.model,
                messages=messages,  # type: ignore[arg-type]
                tools=tools,  # type: ignore[arg-type]
                max_tokens=args.max_tokens,
                extra_headers={"X-Episode-Id": episode_id},
            )
            message = response.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                text = message.content or ""
                done_reason = "final_answer" if "<final_response>" in text else "no_action"
                break
            for call in message.tool_calls:
                fn = call.function  # type: ignore[union-attr]
                try:
                    arguments = json.loads(fn.arguments or "{}")
                except json.JSONDecodeError:
                    arguments = None
                result = env.call_tool(fn.name, arguments)
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call.id,
                        "name": fn.name,
                        "content": result.content,
                    }
                )
    finally:
        env.close()

    scored = dense_reward(messages, case.ground_truth)
    written = sum(len(m.get("content") or "") for m in messages if m["role"] == "assistant")
    base = scored.reward if isinstance(scored.reward, float) else sum(scored.reward)
    reward = base - args.length_penalty * written / 1000.0
    metrics = {**scored.metrics, "chars": float(written)}
    client.post(
        f"/episodes/{episode_id}/reward",
        body={"reward": reward, "metrics": metrics, "done_reason": done_reason},
        cast_to=object,
    )
    logger.info("episode %s: reward %.3f (%s)", episode_id, reward, done_reason)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    args = parse_args()
    client = OpenAI(max_retries=0, timeout=600.0)  # OPENAI_BASE_URL / OPENAI_API_KEY
    info = start_episode(client, args)
    if info.get("episode_key"):  # an episode we opened: its calls need its own key
        client = client.with_options(api_key=info["episode_key"])
    run_episode(client, args, info)


if __name__ == "__main__":
    main()
