"""The agents of ``mtrl train --agent-cmd``: what each episode's agent is told, and its process.

A command agent runs in a subprocess with its assignment in environment variables (``MTRL_*``,
and ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` pointing at the rollout server; the key is the
episode's own, valid for that episode only); a function agent runs on a thread of a pool and gets
the same as an :class:`AgentContext`.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrl_local.errors import UserError


@dataclass(frozen=True)
class AgentContext:
    """What a Python-function agent gets (a command agent: the same, as environment variables)."""

    base_url: str
    #: The episode's key: the credential of every call on this episode, and of no other.
    api_key: str
    episode_id: str
    task: str
    case_id: str
    split: str
    group_id: str
    sample_index: int
    seed: int
    max_turns: int
    max_tokens: int

    def env(self) -> dict[str, str]:
        """The environment variables of a command agent."""
        return {
            "OPENAI_BASE_URL": self.base_url,
            "OPENAI_API_KEY": self.api_key,
            "MTRL_EPISODE_ID": self.episode_id,
            "MTRL_TASK": self.task,
            "MTRL_CASE_ID": self.case_id,
            "MTRL_SPLIT": self.split,
            "MTRL_GROUP_ID": self.group_id,
            "MTRL_SAMPLE_INDEX": str(self.sample_index),
            "MTRL_SEED": str(self.seed),
            "MTRL_MAX_TURNS": str(self.max_turns),
            "MTRL_MAX_TOKENS": str(self.max_tokens),
        }


AgentFunction = Callable[[AgentContext], Any]


class AgentRun:
    """One launched agent episode."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.started = time.monotonic()
        self.proc: subprocess.Popen[bytes] | None = None
        self.future: Future[Any] | None = None
        self.log: Path | None = None
        self.reported_at: float | None = None

    def exited(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return self.future is not None and self.future.done()

    def why_failed(self) -> str:
        if self.proc is not None:
            tail = ""
            if self.log is not None and self.log.is_file():
                lines = self.log.read_text(errors="replace").strip().splitlines()
                tail = f" (last output: {lines[-1][:200]})" if lines else ""
            return f"agent exited with code {self.proc.returncode} without a reward{tail}"
        exc = self.future.exception() if self.future is not None else None
        if exc is not None:
            return f"agent raised {type(exc).__name__}: {exc}"
        return "agent returned without a reward"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @classmethod
    def in_thread(
        cls, pool: ThreadPoolExecutor, agent: AgentFunction, ctx: AgentContext
    ) -> AgentRun:
        """Run a function agent on ``pool``."""
        run = cls(ctx)
        run.future = pool.submit(agent, ctx)
        return run

    @classmethod
    def in_process(
        cls, argv: list[str], ctx: AgentContext, env: Mapping[str, str], log: Path | None
    ) -> AgentRun:
        """Start a command agent; its output goes to ``log`` (or nowhere)."""
        run = cls(ctx)
        out: Any = subprocess.DEVNULL
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            run.log = log
            out = log.open("wb")
        try:
            run.proc = subprocess.Popen(
                argv,
                env={**env, **ctx.env()},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise UserError(f"agent command {shlex.join(argv)!r} failed to start: {exc}") from None
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return run
