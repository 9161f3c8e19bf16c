"""Where a decoder-only LM keeps its blocks and Linear layers, and how sparse they are.

WHY apart from the pruner: loading, fine-tuning, layer pruning and MACs need the same view of a model's
decoder Linears and its sparsity, without depending on (or being invalidated by edits to) SparseGPT.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sd2_core.errors import UserError


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def no_layers_error(model: nn.Module) -> UserError:
    return UserError(
        f"{type(model).__name__} has no decoder blocks at model.model.layers; expected a Hugging Face decoder-only "
        "causal LM (e.g. LlamaForCausalLM, Qwen2ForCausalLM) or one of its decoder layers"
    )


def require_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, or a clear error for a model that has none."""
    layers = decoder_layers(model)
    if layers is None or len(layers) == 0:
        raise no_layers_error(model)
    return layers


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by module name; never embeddings or lm_head.

    Given a whole model, names are full paths ("model.layers.3.mlp.up_proj"); given one decoder layer
    (a module with Linears and no embedding), names are relative to it ("mlp.up_proj").
    """
    if decoder_layers(model) is not None:
        return {
            name: module
            for name, module in model.named_modules()
            if name.startswith("model.layers.") and isinstance(module, nn.Linear)
        }
    is_layer = not isinstance(model, nn.Linear) and not any(isinstance(m, nn.Embedding) for m in model.modules())
    found = {name: m for name, m in model.named_modules() if name and isinstance(m, nn.Linear)} if is_layer else {}
    if not found:
        raise no_layers_error(model)
    return found


def as_hidden(output: Any) -> Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def measure_sparsity(model: nn.Module) -> dict[str, Any]:
    """Zero fraction of the decoder Linear weights (overall and per module), and non-zeros over all parameters."""
    linears = decoder_linears(model)
    per_module: dict[str, float] = {}
    zeros = total = 0
    for name, linear in linears.items():
        z = int((linear.weight == 0).sum())
        n = linear.weight.numel()
        per_module[name] = z / n
        zeros += z
        total += n
    params = list(model.parameters())  # shared (tied) parameters are listed once
    return {
        "overall": zeros / total if total else 0.0,
        "per_module": per_module,
        "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in params)),
        "total_params": int(sum(p.numel() for p in params)),
    }


@torch.no_grad()
def nonzero_masks(model: nn.Module) -> dict[str, Tensor]:
    """Keep-masks (True = non-zero) of the decoder Linear weights, so fine-tuning can hold the zeros fixed."""
    return {name: linear.weight.detach() != 0 for name, linear in decoder_linears(model).items()}


def params_summary(measured: dict[str, Any]) -> dict[str, Any]:
    """The sparsity figures every model artifact's summary carries, from `measure_sparsity`."""
    return {
        "sparsity": measured["overall"],
        "nonzero_params": measured["nonzero_params"],
        "total_params": measured["total_params"],
    }
