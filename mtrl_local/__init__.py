"""mtrl-local: single-node multi-turn RL for tool-using LLM agents, with an evaluation harness."""

__version__ = "0.1.0"
