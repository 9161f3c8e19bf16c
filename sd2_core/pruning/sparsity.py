"""What "sparsity" means for one run: a fraction of zeros (unstructured) or an N:M pattern.

WHY one small parser: the same string travels through configs, cache keys, report rows and the
pruner, so it is normalised once (`label`) and every bad value is refused with one clear message.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sd2_core.errors import UserError

VALID = "a fraction in (0, 1) such as 0.5 or '50%', or an N:M pattern with 1 <= N < M such as '2:4'"
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsitySpec:
    """Target sparsity. For N:M, ``n`` weights of every ``m`` consecutive input columns of a row are zeroed."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        """Canonical text: '2:4' for N:M, else the fraction rounded to 4 decimals ('0.5', '0.66')."""
        return f"{self.n}:{self.m}" if self.is_nm else repr(round(self.fraction, 4))


def _fraction(value: float, shown: object) -> SparsitySpec:
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise UserError(f"sparsity {shown!r} is out of range; valid: {VALID}")
    return SparsitySpec(fraction=float(value))


def parse_sparsity(value: str | float | SparsitySpec) -> SparsitySpec:
    """Parse 0.5, '0.5', '50%', '2:4' (or a SparsitySpec) into a validated SparsitySpec."""
    if isinstance(value, SparsitySpec):
        if value.is_nm:
            return parse_sparsity(f"{value.n}:{value.m}")
        return _fraction(value.fraction, value)
    if isinstance(value, bool):  # bool is an int: True would silently mean 1.0
        raise UserError(f"sparsity {value!r} is not a sparsity; valid: {VALID}")
    if isinstance(value, (int, float)):
        return _fraction(float(value), value)
    if not isinstance(value, str):
        raise UserError(f"sparsity {value!r} has type {type(value).__name__}; valid: {VALID}")
    text = value.strip()
    nm = _NM.match(text)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 1 <= n < m:
            raise UserError(f"sparsity {value!r} needs 1 <= N < M (N of every M weights are zeroed); valid: {VALID}")
        return SparsitySpec(fraction=n / m, n=n, m=m)
    try:
        number = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise UserError(f"sparsity {value!r} is not understood; valid: {VALID}") from None
    return _fraction(number, value)


def check_nm_width(in_features: int, spec: SparsitySpec, name: str) -> None:
    """Refuse N:M on a layer whose input width is not a multiple of M (its last group would be partial)."""
    if spec.is_nm and in_features % spec.m != 0:
        raise UserError(
            f"layer {name} has {in_features} input features, not a multiple of {spec.m}: "
            f"{spec.label} sparsity needs whole groups of {spec.m} columns; use an unstructured fraction instead"
        )
