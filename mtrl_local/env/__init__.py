"""Environment interface: typed tools, episodes, and the three reusable patterns."""

from mtrl_local.env.actions import (
    ParsedCall,
    has_final_response,
    parse_tool_calls,
    render_final_response,
    render_tool_call,
)
from mtrl_local.env.base import (
    Environment,
    Episode,
    EpisodeStats,
    Message,
    StepResult,
    ToolError,
    ToolResult,
    run_episode,
)
from mtrl_local.env.calls import ToolLimits
from mtrl_local.env.patterns import (
    FixtureEnvironment,
    SandboxEnvironment,
    SQLiteEnvironment,
    canonical_key,
    stable_id,
    stable_seed,
)
from mtrl_local.env.tools import Tool, ToolArgumentError, tool

__all__ = [
    "Environment",
    "Episode",
    "EpisodeStats",
    "FixtureEnvironment",
    "Message",
    "ParsedCall",
    "SQLiteEnvironment",
    "SandboxEnvironment",
    "StepResult",
    "Tool",
    "ToolArgumentError",
    "ToolError",
    "ToolLimits",
    "ToolResult",
    "canonical_key",
    "has_final_response",
    "parse_tool_calls",
    "render_final_response",
    "render_tool_call",
    "run_episode",
    "stable_id",
    "stable_seed",
    "tool",
]
