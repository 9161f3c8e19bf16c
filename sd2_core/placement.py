"""Where a stage computes and in which precision: one resolution of `device`/`dtype` for every stage.

A stage's config says `device: auto | cpu | cuda | cuda:N` and `dtype: auto | float32 | bfloat16 | float16`;
`resolve_placement` turns that into a concrete `Placement` once, before anything is loaded, and refuses what
this machine cannot do with a message that names the value and what would work. The cache key holds the
resolved device *type* and dtype (`Placement.identity`): a result computed in bfloat16 on a GPU is another
result than the float32 one from a laptop, while the GPU's index changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from sd2_core.errors import UserError

DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def parse_device(name: str) -> str:
    """The device name normalised (lower case), or a UserError naming the valid forms."""
    text = str(name).strip().lower()
    match = _DEVICE.match(text)
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UserError(f"device {name!r} is not valid; valid: {DEVICE_HELP}")
    return text


@dataclass(frozen=True)
class Placement:
    """A concrete device and dtype for one stage."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def identity(self) -> dict[str, str]:
        """What of the placement changes a result: part of the cache key and of the manifest."""
        return {"device": self.device.type, "dtype": self.dtype_name}

    def autocast(self):
        """Mixed precision for training over float32 master weights: autocast to `dtype` unless it is float32."""
        import contextlib

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """The placement a stage runs on. `auto` device: cuda:0 when CUDA is present, else cpu. `auto` dtype:
    bfloat16 on a GPU that supports it (float16 otherwise), float32 on CPU."""
    name = parse_device(device)
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"dtype {dtype!r} is not valid; valid: auto, {', '.join(DTYPES)}")
    available = cuda_devices()
    if name == "auto":
        name = "cuda:0" if available else "cpu"
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if available == 0:
            raise UserError(
                f"device {device!r} needs CUDA, and this machine has no CUDA device (torch {torch.__version__}, "
                f"cuda build: {torch.version.cuda or 'none'}); use device 'cpu' or 'auto'"
            )
        if index >= available:
            raise UserError(
                f"device {device!r}: this machine has {available} CUDA device(s), cuda:0..cuda:{available - 1}"
            )
        placed = torch.device("cuda", index)
    else:
        placed = torch.device("cpu")
    if dtype == "auto":
        if placed.type == "cuda":
            chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            chosen = torch.float32
    else:
        chosen = DTYPES[dtype]
    return Placement(placed, chosen)


def free_bytes(device: torch.device) -> int:
    """Memory a model could still take on `device`: free GPU memory, or available system memory for the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(what: str, n_params: int, dtype: torch.dtype, devices: list[torch.device], factor: float = 1.0) -> None:
    """Refuse, before loading, a model that cannot fit: parameters × bytes per parameter × `factor` (e.g. 4
    for weights + gradients + two Adam moments in training) against the memory free on `devices` together."""
    need = int(n_params * dtype.itemsize * factor)
    have = sum(free_bytes(d) for d in devices)
    if need > have:
        where = ", ".join(str(d) for d in devices)
        raise UserError(
            f"{what} needs about {need / 2**30:.2f} GiB on {where} ({n_params / 1e6:.0f} M parameters × "
            f"{dtype.itemsize} bytes ({str(dtype).removeprefix('torch.')})"
            + (f" × {factor:g}" if factor != 1.0 else "")
            + f"), and {have / 2**30:.2f} GiB is free there; choose a smaller model, another device or a "
            "smaller dtype"
        )


def placement_of(config: Any) -> Placement:
    """The placement a stage config asks for (DistillConfig, PruneConfig, FinetuneConfig, MalConfig)."""
    return resolve_placement(config.device, config.dtype)


def check_placements(cell: Any) -> dict[str, Placement]:
    """Every model-loading stage's placement of a CellConfig, resolved up front: a run that asks for a device
    this machine lacks fails at once with one clear message, not at its first model-loading task."""
    from sd2_core.config import PLACED

    return {stage: placement_of(getattr(cell, stage)) for stage in PLACED}
