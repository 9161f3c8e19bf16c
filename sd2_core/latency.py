"""Measured forward latency of one decode step, and the practical improvement factor MAL / (k·c_lat + 1).

The SD² paper measures, besides the theoretical factor MAL / (k·c + 1) with c from MACs (sd2_core.macs), a
practical one whose cost factor c_lat = draft latency / target latency is the ratio of MEDIAN forward latencies
of one decode step at a fixed context, timed with torch.utils.benchmark for at least 20 s. `decode_step_latency`
is that measurement: a KV cache of `context_len` seeded random tokens is built with one prefill, then one new
token per sequence is timed against it; the cache is cropped back after every call, so each repetition sees
exactly `context_len` cached positions (a growing cache would time ever longer contexts).

Compressed sparse formats: a pruned model only runs faster where a kernel skips its zeros. `supported_formats`
says which formats this device could use and why not; the one torch offers is semi-structured 2:4
(`torch.sparse.to_sparse_semi_structured`, cuSPARSELt or CUTLASS kernels) on CUDA GPUs of compute capability
>= 8.0 in float16/bfloat16. That CUDA path (`semi_structured_copy` and its timing) was written against torch
2.13's API but NOT run where it was written (a CPU-only machine): only its planning and refusals are tested.

`latency_recipe` is the `latency` stage. Its figures are a measurement, not a deterministic result: the key
holds the placement and the machine (CPU model or GPU name, threads, torch), and `latency.json` holds the
latencies under `*_s` names that `write_json` keeps on purpose. The rule "artifact files hold no wall-clock
figures" exists so a REBUILT deterministic artifact keeps its digest and its dependents stay cached; a latency
artifact is never deterministic and nothing is built from it, so its figures are its content. Keep it a leaf:
summarise it (reporting) rather than making it an input of a stage whose digest others depend on.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sd2_core.artifacts import Progress, Recipe, write_json
from sd2_core.config import LatencyConfig
from sd2_core.errors import UserError
from sd2_core.macs import improvement_factor
from sd2_core.placement import placement_of
from sd2_core.pruning.structure import decoder_linears, require_decoder_layers
from sd2_core.store import ArtifactRef, Store

log = logging.getLogger(__name__)

SEMI_STRUCTURED = "semi_structured_2:4"
SEED = 0  # of the random context and new tokens: every measurement of a model times the same step
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """What computes on `device`: the GPU's name, or the CPU's model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_identity(device: torch.device, threads: int) -> dict[str, Any]:
    """What of the machine changes a latency (part of the latency key): another machine is another result."""
    identity: dict[str, Any] = {"device_name": device_name(device), "threads": threads, "torch": torch.__version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        identity.update(capability=f"{major}.{minor}", cuda=torch.version.cuda)
    else:
        identity["cpus"] = os.cpu_count()
    return identity


# ------------------------------------------------------------------------------------------ the timed step


def _crop_to(cache, length: int) -> None:
    """Drop every cached position past `length` (DynamicCache.crop takes minus the number to remove)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
    if cache.get_seq_length() != length:
        raise UserError(
            f"the KV cache holds {cache.get_seq_length()} positions after cropping to {length}; this model's "
            "cache cannot be cropped back, so a fixed-context decode step cannot be timed"
        )


class DecodeStep:
    """One forward of a single new token per sequence against a cache of exactly `context_len` positions.

    Each call appends one position (as a real decode step does, DynamicCache concatenating its keys and values)
    and then crops it away again (views, no copy), so every repetition times the same context.
    """

    def __init__(self, model: nn.Module, context_len: int, batch_size: int = 1, seed: int = SEED):
        from transformers import DynamicCache

        self.model, self.context_len = model, context_len
        device = model.get_input_embeddings().weight.device
        vocab = model.get_input_embeddings().num_embeddings
        generator = torch.Generator().manual_seed(seed)
        context = torch.randint(vocab, (batch_size, context_len), generator=generator).to(device)
        self.token = torch.randint(vocab, (batch_size, 1), generator=generator).to(device)
        self.mask = torch.ones(batch_size, context_len + 1, dtype=torch.long, device=device)
        self.cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=context, attention_mask=self.mask[:, :-1], past_key_values=self.cache, use_cache=True)
        _crop_to(self.cache, context_len)

    def __call__(self) -> torch.Tensor:
        """The step's logits (batch, 1, vocab); the cache is back at `context_len` positions afterwards."""
        with torch.no_grad():
            out = self.model(input_ids=self.token, attention_mask=self.mask, past_key_values=self.cache, use_cache=True)
        _crop_to(self.cache, self.context_len)
        return out.logits


def _check_request(model: nn.Module, context_len: int, min_run_time_s: float, batch_size: int) -> None:
    """Refuse, before any forward, what cannot be timed, with the value and what would work."""
    require_decoder_layers(model)
    if not isinstance(context_len, int) or context_len < 1:
        raise UserError(f"context_len must be an integer >= 1 (tokens cached before the step), got {context_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(min_run_time_s, (int, float)) and math.isfinite(min_run_time_s) and min_run_time_s > 0):
        raise UserError(f"min_run_time_s must be a positive number of seconds (paper: 20), got {min_run_time_s!r}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context_len + 1 > limit:
        raise UserError(
            f"context_len {context_len} + the new token exceeds the model's {limit} positions; valid: 1..{limit - 1}"
        )


def decode_step_latency(
    model: nn.Module,
    context_len: int,
    min_run_time_s: float,
    batch_size: int = 1,
    threads: int | None = None,
    seed: int = SEED,
) -> dict[str, Any]:
    """Median latency of one decode step at `context_len` cached positions, timed by torch.utils.benchmark.

    `blocked_autorange(min_run_time=...)` repeats the step in blocks for at least that long (it synchronises
    the accelerator around each block); the median and IQR are per step. `threads`: torch threads while timing
    (default: the current setting; the Timer's own default would be 1).
    """
    from torch.utils import benchmark

    _check_request(model, context_len, min_run_time_s, batch_size)
    threads = threads or torch.get_num_threads()
    step = DecodeStep(model, context_len, batch_size, seed)
    device = step.token.device
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads, label="decode step")
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        measured = timer.blocked_autorange(min_run_time=min_run_time_s)
    return {
        "median_s": measured.median,
        "iqr_s": measured.iqr,
        "mean_s": measured.mean,
        "measurements": len(measured.times),
        "runs_per_measurement": measured.number_per_run,
        "min_run_time_s": min_run_time_s,
        "context_len": context_len,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
        "device_name": device_name(device),
        "threads": threads,
    }


# ------------------------------------------------------------------------------- compressed sparse formats


def is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive input columns of every row: torch's semi-structured layout
    (and SparseGPT's N:M groups)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach().reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def sparsity_pattern(model: nn.Module) -> str:
    """'2:4' when every decoder Linear is 2:4, 'dense' when none has a zero weight, else 'unstructured'."""
    weights = [linear.weight for linear in decoder_linears(model).values()]
    if all(is_2_4(w) for w in weights):
        return "2:4"
    return "dense" if all(bool((w != 0).all()) for w in weights) else "unstructured"


def _semi_structured_backend() -> str:
    """The kernels torch.sparse.to_sparse_semi_structured uses: cuSPARSELt where this torch has it, else CUTLASS."""
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


def _semi_structured_obstacles(device: torch.device, dtype: torch.dtype, pattern: str) -> list[str]:
    """Every reason semi-structured 2:4 cannot run here (empty: it can)."""
    reasons = []
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        reasons.append(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
    if device.type != "cuda":
        reasons.append(
            f"device {device.type}: torch's semi-structured 2:4 sparse tensors run only on CUDA GPUs of compute "
            "capability >= 8.0 (cuSPARSELt/CUTLASS kernels); torch has no 2:4 kernel for CPU decoding (its generic "
            "CSR matmul is beta and not a speed-up at 50 % sparsity)"
        )
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            reasons.append(
                f"GPU {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; torch's "
                "semi-structured sparse kernels need >= 8.0 (Ampere or newer)"
            )
    if dtype not in _HALF:
        reasons.append(
            f"dtype {str(dtype).removeprefix('torch.')}: the 2:4 matmul is measured in float16/bfloat16 "
            "(cuSPARSELt has no float32 kernel); use dtype bfloat16 or float16"
        )
    if pattern != "2:4":
        reasons.append(f"the model's decoder weights are {pattern}, not 2:4 (at most 2 non-zeros in every 4)")
    return reasons


def supported_formats(device: torch.device | str, dtype: torch.dtype, sparsity_pattern: str) -> list[dict[str, Any]]:
    """Every compressed sparse format considered, whether this device/dtype/model can use it, and why (not).

    One entry per format: {"format", "supported", "reason"} (+ "backend" when supported). Torch offers one
    format that speeds up N:M weights, semi-structured 2:4, and only on CUDA; on CPU none applies.
    """
    device = torch.device(device)
    reasons = _semi_structured_obstacles(device, dtype, sparsity_pattern)
    if reasons:
        return [{"format": SEMI_STRUCTURED, "supported": False, "reason": "; ".join(reasons)}]
    backend = _semi_structured_backend()
    return [
        {
            "format": SEMI_STRUCTURED,
            "supported": True,
            "backend": backend,
            "reason": f"{device_name(device)}, {str(dtype).removeprefix('torch.')}, 2:4 weights: torch "
            f"semi-structured sparse tensors ({backend})",
        }
    ]


def _sparse_class(backend: str):
    """The SparseSemiStructuredTensor subclass of a backend (what to_sparse_semi_structured would pick)."""
    if backend == "cusparselt":
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    if backend == "cutlass":
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    raise UserError(f"unknown semi-structured backend {backend!r}; valid: cusparselt, cutlass")


def conversion_plan(model: nn.Module, backend: str) -> dict[str, str | None]:
    """Per decoder Linear: None when its weight can be compressed, else why it stays dense (its pattern, or a
    shape that is not a multiple of the backend's block for this dtype). Runs anywhere: it reads no kernel."""
    constraints = _sparse_class(backend)._DTYPE_SHAPE_CONSTRAINTS
    plan: dict[str, str | None] = {}
    for name, linear in decoder_linears(model).items():
        weight = linear.weight
        limits = constraints.get(weight.dtype)
        rows, cols = weight.shape
        if limits is None:
            plan[name] = f"dtype {weight.dtype} has no {backend} kernel"
        elif rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
            plan[name] = f"shape {rows}x{cols} is not a multiple of {limits.sparse_min_rows}x{limits.sparse_min_cols}"
        elif not is_2_4(weight):
            plan[name] = "not 2:4"
        else:
            plan[name] = None
    return plan


def semi_structured_copy(model: nn.Module, backend: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A deep copy of `model` whose 2:4 decoder Linear weights are torch semi-structured sparse tensors.

    CUDA only (compute capability >= 8.0, float16/bfloat16, 2:4 weights); elsewhere a UserError says why. NOT
    run on the machine this was written on (no GPU). The embeddings and lm_head stay dense (a tied lm_head is
    the embedding table). Returns the copy and {"backend", "converted_linears", "dense_linears": {name: why}}.
    """
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    reasons = _semi_structured_obstacles(device, dtype, sparsity_pattern(model))
    if reasons:
        raise UserError(f"semi-structured 2:4 cannot run here: {'; '.join(reasons)}")
    backend = backend or _semi_structured_backend()
    plan = conversion_plan(model, backend)
    if all(why is not None for why in plan.values()):
        raise UserError(f"no decoder Linear can be compressed as 2:4 ({backend}): {plan}")
    sparse_cls = _sparse_class(backend)
    compressed = copy.deepcopy(model)
    for name, linear in decoder_linears(compressed).items():
        if plan[name] is None:
            linear.weight = nn.Parameter(
                sparse_cls.from_dense(linear.weight.detach().contiguous()), requires_grad=False
            )
    kept = {name: why for name, why in plan.items() if why is not None}
    return compressed, {"backend": backend, "converted_linears": len(plan) - len(kept), "dense_linears": kept}


def _format_latency(
    model: nn.Module, entry: dict[str, Any], context_len: int, min_run_time_s: float, batch_size: int, threads: int
) -> dict[str, Any]:
    """Latency of a supported format: the model converted on a copy, timed like the dense one, and the largest
    logit difference of its step from the dense model's (a conversion that changed the function shows here)."""
    if entry["format"] != SEMI_STRUCTURED:
        raise UserError(f"no measurement for format {entry['format']!r}")
    compressed, facts = semi_structured_copy(model, entry["backend"])
    try:
        dense_logits = DecodeStep(model, context_len, batch_size)().float()
        sparse_logits = DecodeStep(compressed, context_len, batch_size)().float()
        timed = decode_step_latency(compressed, context_len, min_run_time_s, batch_size, threads)
    except RuntimeError as exc:
        where = device_name(model.get_input_embeddings().weight.device)
        raise RuntimeError(f"{SEMI_STRUCTURED} ({entry['backend']}) failed on {where}: {exc}") from exc
    finally:
        del compressed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    difference = float((sparse_logits - dense_logits).abs().max())
    return {**facts, **timed, "max_abs_logit_diff_vs_dense": difference}


def format_latencies(
    model: nn.Module, dense: dict[str, Any], context_len: int, min_run_time_s: float, batch_size: int, threads: int
) -> dict[str, dict[str, Any]]:
    """Every considered format by name: why it is (not) supported, and for a supported one its latency and
    speed-up over `dense` (decode_step_latency's record of the same model)."""
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    out: dict[str, dict[str, Any]] = {}
    for entry in supported_formats(device, dtype, sparsity_pattern(model)):
        record = {k: v for k, v in entry.items() if k != "format"}
        if entry["supported"]:
            record.update(_format_latency(model, entry, context_len, min_run_time_s, batch_size, threads))
            record["speedup_over_dense"] = dense["median_s"] / record["median_s"]
        out[entry["format"]] = record
    return out


# ----------------------------------------------------------------------------- the factor and the stage


def practical_improvement_factor(
    mal: float, k: int, draft_latency_s: float, target_latency_s: float, c: float | None = None
) -> dict[str, float]:
    """c_lat = draft latency / target latency and the practical factor MAL / (k·c_lat + 1); with `c` (the MACs
    ratio) the theoretical factor beside it. Same formula as macs.improvement_factor, measured cost instead."""
    for name, value in (("draft_latency_s", draft_latency_s), ("target_latency_s", target_latency_s)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a positive number of seconds, got {value!r}")
    c_lat = draft_latency_s / target_latency_s
    result = {"mal": mal, "k": k, "c_lat": c_lat, "improvement_factor_practical": improvement_factor(mal, k, c_lat)}
    if c is not None:
        result.update(c=c, improvement_factor_theoretical=improvement_factor(mal, k, c))
    return result


def latency_recipe(store: Store, model: ArtifactRef, cfg: LatencyConfig) -> Recipe:
    """The `latency` stage: one model's decode-step latency, dense and in every supported compressed format.

    The key holds the placement and the machine (`machine_identity`), so a GPU and a CPU measurement, or two
    machines, are different artifacts; on the same machine a rerun is a store hit.
    """
    placement = placement_of(cfg)
    threads = torch.get_num_threads()
    machine = machine_identity(placement.device, threads)

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        from sd2_core.models import load_model

        loaded = load_model(store.local_dir(model), placement.dtype, placement.device)
        if progress is not None:
            progress(0, 2, f"timing the dense decode step for {cfg.min_run_time_s:g} s")
        dense = decode_step_latency(loaded, cfg.context_len, cfg.min_run_time_s, cfg.batch_size, threads)
        if progress is not None:
            progress(1, 2, "compressed sparse formats")
        formats = format_latencies(loaded, dense, cfg.context_len, cfg.min_run_time_s, cfg.batch_size, threads)
        record = {"model": {"stage": model.stage, "key": model.key}, "dense": dense, "formats": formats}
        write_json(out / "latency.json", {**record, "machine": machine})
        if progress is not None:
            progress(2, 2, "done")
        return {
            "median_s": dense["median_s"],
            "iqr_s": dense["iqr_s"],
            "measurements": dense["measurements"],
            "context_len": cfg.context_len,
            "batch_size": cfg.batch_size,
            "dtype": placement.dtype_name,
            "device_name": machine["device_name"],
            "threads": threads,
            "formats": formats,
        }

    config = {
        **cfg.model_dump(mode="json", exclude={"device", "dtype", "enabled"}),
        "placement": placement.identity,
        "machine": machine,
    }
    return Recipe("latency", config, (model,), build, code=__name__)
