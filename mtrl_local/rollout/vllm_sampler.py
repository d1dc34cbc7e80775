"""A :class:`~mtrl_local.rollout.sampler.Sampler` over an in-process vLLM ``LLM``.

Optional extra: ``pip install "mtrl-local[vllm]"``. **Not exercised by CI**: vLLM pins a CUDA build
of torch, which cannot be installed on the CPU machines the tests run on; import this module only
where vLLM is installed (the import of vLLM itself is lazy, inside :class:`VLLMSampler`).

Written against the vLLM API of versions 0.22–0.31 — the range TRL 1.x's colocate mode supports —
and the calls TRL makes there: ``LLM(..., logprobs_mode=…)``, ``TokensPrompt``,
``SamplingParams(logprobs=0, seed=…, stop_token_ids=…, detokenize=False)``, ``LoRARequest``,
``LLM.reset_prefix_cache()`` and, to push full weights,
``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)`` (which needs
the engine in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless already set).

How it meets the seam's contract:

* token in, token out: prompts are ``TokensPrompt(prompt_token_ids=context)``; vLLM never sees text
  and its tokenizer is not even loaded (``skip_tokenizer_init``);
* ``logprobs`` must be log π under the unmodified policy, so the engine runs with
  ``logprobs_mode="raw_logprobs"`` (log-softmax before temperature and top-p) and asks for the
  sampled token's logprob only (``logprobs=0``);
* per-row seeds from :func:`~mtrl_local.rollout.sampler.row_seed`, as the transformers sampler;
* per-episode state: vLLM's automatic prefix caching already reuses the shared prefix of an
  episode's turns, so :meth:`release` has nothing to do; new weights reset that cache;
* weights after each optimizer step: a full state dict is pushed with ``load_weights``; a LoRA
  state dict (keys with ``lora_``) is written as a PEFT adapter directory and served through a new
  ``LoRARequest`` (vLLM needs ``enable_lora=True`` and the adapter's PEFT config for that).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtrl_local.rollout.sampler import (
    GenerationRequest,
    GenerationResult,
    SampleFinish,
    SamplingParams,
    row_seed,
)

logger = logging.getLogger(__name__)

#: The vLLM versions this module was written against (not tested by CI, see the module docstring).
SUPPORTED_VLLM = ">=0.22,<=0.31"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            f'the vLLM sampler needs vllm{SUPPORTED_VLLM}: pip install "mtrl-local[vllm]" '
            "(CUDA only)"
        ) from exc
    return vllm


class VLLMSampler:
    """In-process vLLM sampler. ``model_path``: a local HF model directory (the base model).

    ``lora_config``: the PEFT ``LoraConfig`` as a dict (``peft_model.peft_config["default"]
    .to_dict()``) when the trainer trains a LoRA adapter; adapters are written under ``lora_dir``.
    Other keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model_path: str | Path,
        eos_token_id: int,
        *,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        dtype: str = "auto",
        lora_config: Mapping[str, Any] | None = None,
        lora_dir: str | Path = "vllm-adapters",
        policy_version: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        self._vllm = vllm
        self.lora_config = dict(lora_config) if lora_config is not None else None
        self.lora_dir = Path(lora_dir)
        kwargs: dict[str, Any] = {
            "model": str(model_path),
            "skip_tokenizer_init": True,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "dtype": dtype,
            "logprobs_mode": "raw_logprobs",
            "enable_prefix_caching": True,
        }
        if self.lora_config is not None:
            kwargs.update(enable_lora=True, max_lora_rank=int(self.lora_config.get("r", 64)))
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.eos_token_id = eos_token_id
        self.policy_version = policy_version
        self.max_context_len: int | None = int(self.llm.llm_engine.model_config.max_model_len)
        self._lora: Any = None
        self._warned_eos = False

    # -- the Sampler protocol ----------------------------------------------------------
    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[GenerationResult]:
        """One ``LLM.generate`` call over every request (vLLM schedules the batch itself)."""
        if not requests:
            return []
        vllm = self._vllm
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r.context_ids)) for r in requests]
        sampling = [
            vllm.SamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=min(params.max_tokens, r.max_tokens or params.max_tokens),
                logprobs=0,
                seed=row_seed(params.seed or 0, r.key, len(r.context_ids)),
                stop_token_ids=[self.eos_token_id],
                ignore_eos=params.ignore_eos,
                detokenize=False,
                skip_special_tokens=False,
            )
            for r in requests
        ]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False, lora_request=self._lora)
        return [self._result(out.outputs[0]) for out in outputs]

    def _result(self, completion: Any) -> GenerationResult:
        ids = list(completion.token_ids)
        # With logprobs=0 each step's dict holds the sampled token (and nothing else).
        logprobs = [
            float(step[tok].logprob) for step, tok in zip(completion.logprobs, ids, strict=True)
        ]
        finish: SampleFinish = "length"
        if completion.finish_reason == "stop":
            finish = "stop"
            if not ids or ids[-1] != self.eos_token_id:
                # vLLM keeps a stop *token* in token_ids; if a version does not, close the turn
                # with eos anyway (its logprob unknown: 0.0) so the trajectory stays in format.
                if not self._warned_eos:
                    logger.warning("vLLM dropped the eos from token_ids; appending it")
                    self._warned_eos = True
                ids.append(self.eos_token_id)
                logprobs.append(0.0)
        return GenerationResult(ids, logprobs, finish)

    def release(self, key: str) -> None:
        """Nothing to do: vLLM's prefix cache is content-addressed, not per episode."""

    def load_state_dict(self, state: Mapping[str, Any], version: int) -> None:
        """Push new weights (full) or a new adapter (LoRA keys); drop the prefix cache."""
        if any("lora_" in k for k in state):
            self._push_adapter(state, version)
        else:
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            # HF parameter names are what vLLM's loaders read from a checkpoint.
            model.load_weights(list(state.items()))
        self.llm.reset_prefix_cache()
        self.policy_version = version

    def _push_adapter(self, state: Mapping[str, Any], version: int) -> None:
        if self.lora_config is None:
            raise ValueError("a LoRA state dict needs VLLMSampler(lora_config=...)")
        from safetensors.torch import save_file

        folder = self.lora_dir / f"v{version}"
        folder.mkdir(parents=True, exist_ok=True)
        # PEFT saves adapter weights without the adapter name (".default").
        tensors = {
            k.replace(".default", ""): v.detach().contiguous().cpu()
            for k, v in state.items()
            if "lora_" in k
        }
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(self.lora_config, default=str))
        from vllm.lora.request import LoRARequest

        # A new name and id per version: vLLM caches adapters by id.
        self._lora = LoRARequest(f"policy-v{version}", version + 1, str(folder))


__all__ = ["SUPPORTED_VLLM", "VLLMSampler"]
