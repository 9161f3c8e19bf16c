"""Batch generation behind one small interface, so distillation does not care which engine runs it.

Two engines: `TransformersGenerator` (plain `model.generate`, runs anywhere) and `VllmGenerator` (a vLLM server
in its own environment, see `sd2_core.vllm_server`; picked by `backend: auto` wherever it is installed). Both
format prompts with sd2's chat template, sample with temperature/top_p (temperature 0 = greedy), stop at the
same end-of-turn tokens and are seeded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sd2_core.chat import Messages, chat_input_ids, eos_ids
from sd2_core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOutput:
    """One completion: its text (special tokens removed), its length in tokens (EOS not counted), and whether
    it ended by itself (an EOS) rather than being cut off at max_new_tokens."""

    text: str
    n_tokens: int
    finished: bool


class Generator(Protocol):
    """Anything that turns chat conversations into completions of the assistant's next turn."""

    def generate(
        self, prompts: list[Messages], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[GenerationOutput]: ...


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


class TransformersGenerator:
    """Generation with `model.generate`, `batch_size` prompts at a time, left-padded.

    Batch b, whose first prompt is prompt number `o` of the call, is sampled after `torch.manual_seed(seed + o)`,
    so a completion depends only on the seed, its batch and the model, not on what ran before.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8):
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template; generation needs one to format the prompts")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = eos_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

    def _left_padded(self, batch: list[Messages]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [chat_input_ids(self.tokenizer, messages) for messages in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids, mask

    def _decode(self, new_tokens: torch.Tensor) -> GenerationOutput:
        tokens = new_tokens.tolist()
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        return GenerationOutput(text=text.strip(), n_tokens=end, finished=end < len(tokens))

    def generate(
        self, prompts: list[Messages], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[GenerationOutput]:
        _check_sampling(max_new_tokens, temperature, top_p)
        device = next(self.model.parameters()).device
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        outputs: list[GenerationOutput] = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = self._left_padded(prompts[start : start + self.batch_size])
            torch.manual_seed(seed + start)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos_ids,
                    pad_token_id=self.pad_id,
                    **sampling,
                )
            outputs.extend(self._decode(row) for row in out[:, ids.shape[1] :].cpu())
        return outputs


class VllmGenerator:
    """Generation by a running vLLM server (`sd2_core.vllm_server`): every prompt of a call is in flight at once,
    so vLLM's continuous batching schedules them; prompt i is sampled with seed + i, as in TransformersGenerator
    the completion depends on its seed and the model only.

    Prompts go as token ids rendered by sd2's own chat template (`chat_input_ids`), and generation stops at sd2's
    end-of-turn tokens, so both engines answer exactly the same conversation.
    """

    def __init__(self, server, tokenizer, eos_token_ids: Iterable[int] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template; generation needs one to format the prompts")
        self.server = server
        self.tokenizer = tokenizer
        self.eos_ids = sorted(set(eos_token_ids) if eos_token_ids is not None else set(eos_ids(tokenizer, None)))

    def generate(
        self, prompts: list[Messages], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[GenerationOutput]:
        _check_sampling(max_new_tokens, temperature, top_p)
        bodies = [
            {
                "prompt": chat_input_ids(self.tokenizer, messages),
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p if temperature > 0 else 1.0,
                "seed": seed + i,
                "stop_token_ids": self.eos_ids,
                "return_token_ids": True,
                "skip_special_tokens": True,
            }
            for i, messages in enumerate(prompts)
        ]
        outputs = []
        for choice in self.server.complete(bodies, parallel=len(bodies)):
            tokens = list(choice.get("token_ids") or [])
            n = len(tokens) - 1 if tokens and tokens[-1] in self.eos_ids else len(tokens)
            finished = choice.get("finish_reason") == "stop"  # "length": cut off at max_tokens
            outputs.append(GenerationOutput(text=(choice.get("text") or "").strip(), n_tokens=n, finished=finished))
        return outputs


BACKENDS = ("auto", "transformers", "vllm")


def resolve_backend(backend: str, device_type: str = "cpu") -> str:
    """'auto' -> 'vllm' when the installed vLLM computes on `device_type` (its CPU build for cpu, the CUDA one
    for cuda), else 'transformers'; 'vllm' without such a vLLM is a UserError that says what is installed."""
    if backend not in BACKENDS:
        raise UserError(f"unknown generation backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "transformers":
        return backend
    from sd2_core.vllm_server import INSTALL_HINT, find_vllm, install_for

    if install_for(device_type) is not None:
        return "vllm"
    if backend == "auto":
        return "transformers"
    exe = find_vllm()
    if exe is None:
        raise UserError(f"the 'vllm' generation backend needs vLLM, which is not installed: {INSTALL_HINT}")
    from sd2_core.vllm_server import describe

    raise UserError(
        f"the stage runs on {device_type}, but the vLLM at {exe} is {describe(exe).label}; install the {device_type} "
        f"build (SD2_VLLM_BUILD={device_type} bash scripts/setup_vllm.sh) or choose backend 'transformers'"
    )


def make_generator(
    backend: str,
    model=None,
    tokenizer=None,
    server=None,
    batch_size: int = 8,
    generation_config=None,
) -> Generator:
    """The generator for a resolved backend: 'transformers' needs model+tokenizer, 'vllm' a running server
    (`sd2_core.vllm_server.vllm_server`), the tokenizer and the model's generation config (its EOS ids)."""
    if backend not in ("transformers", "vllm"):
        raise UserError(f"unknown generation backend {backend!r}; valid backends: transformers, vllm")
    if tokenizer is None:
        raise UserError(f"the {backend!r} backend needs the model's tokenizer")
    if backend == "transformers":
        if model is None:
            raise UserError("the 'transformers' backend needs a loaded model and tokenizer")
        return TransformersGenerator(model, tokenizer, batch_size=batch_size)
    if server is None:
        raise UserError("the 'vllm' backend needs a running vLLM server (sd2_core.vllm_server.vllm_server)")
    return VllmGenerator(server, tokenizer, eos_ids(tokenizer, generation_config))
