"""SparseGPT one-shot pruning of one Linear layer (Frantar & Alistarh, 2023), and a magnitude baseline.

WHY: pruning a layer is posed as a layer-wise reconstruction problem, min ‖WX − ŴX‖², whose
curvature is H = 2XᵀX over the calibration tokens. Going through the columns left to right, each
pruned weight's error is pushed onto the not-yet-processed columns by the Optimal Brain Surgeon
update, using the rows of the upper Cholesky factor of H⁻¹; the mask is chosen per column block
from w²/[H⁻¹]ᵢᵢ² (adaptive mask selection), or per group of M columns for N:M patterns.
A Hessian that Cholesky cannot factor is re-damped (10× per retry) — never replaced by magnitude
pruning, which would silently change the method.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sd2_core.pruning.sparsity import SparsitySpec, check_nm_width, parse_sparsity

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running H = 2/n · Σ xxᵀ over the n non-pad input rows of one Linear, in fp32.

    ``nsamples`` counts token rows (not sequences), so padded and unpadded batches of the same
    tokens give the same H.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Add the rows of ``x`` [..., in_features]; rows where ``mask`` [...] is 0 (padding) are skipped."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features)
        if mask is not None:
            keep = mask.reshape(-1).to(rows.device) != 0
            if keep.numel() != rows.shape[0]:
                raise ValueError(f"mask has {keep.numel()} entries for {rows.shape[0]} input rows")
            rows = rows[keep]
        count = rows.shape[0]
        if count == 0:
            return
        rows = rows.to(device=self.H.device, dtype=torch.float32)
        self.H.mul_(self.nsamples / (self.nsamples + count))
        self.nsamples += count
        rows = rows * math.sqrt(2.0 / self.nsamples)
        self.H.addmm_(rows.T, rows)


@dataclass
class SparseGPTResult:
    """Pruned weight (input dtype), keep-mask (True = kept), dampening used as a fraction of mean(diag H)
    (``percdamp`` × 10^retries), retries needed, and the OBS loss Σ (w−q)²/(2dᵢ²) summed over all pruned
    weights, dᵢ the diagonal of the upper Cholesky factor of H⁻¹ (an estimate of the added output error)."""

    weight: Tensor
    mask: Tensor
    damp_used: float
    retries: int
    error: float


def _upper_cholesky_of_inverse(
    hessian: Tensor, percdamp: float, max_retries: int, name: str
) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of (H + damp·I)⁻¹, raising the damp 10× per failed attempt."""
    mean_diag = hessian.diagonal().mean().item()
    frac = percdamp
    for attempt in range(max_retries + 1):
        damped = hessian.clone()
        damped.diagonal().add_(frac * mean_diag)
        reason = ""
        try:
            lower = torch.linalg.cholesky(damped)
            upper = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
            if torch.isfinite(upper).all():
                return upper, frac, attempt
            reason = "non-finite factor"
        except torch.linalg.LinAlgError as exc:
            reason = str(exc).splitlines()[0]
        if attempt < max_retries:
            log.warning(
                "SparseGPT: Cholesky failed for layer %s with dampening %.3g x mean(diag H) (%s); retrying with %.3g",
                name,
                frac,
                reason,
                frac * 10,
            )
        frac *= 10
    raise RuntimeError(
        f"SparseGPT: the Hessian of layer {name} could not be factored even with dampening "
        f"{frac / 10:.3g} x mean(diag H) after {max_retries} retries; the calibration activations are degenerate "
        "(raise percdamp or use more calibration tokens)"
    )


@dataclass(frozen=True)
class PreparedHessian:
    """What SparseGPT derives from a Hessian before touching any weight: the inputs that never fired, and the
    upper Cholesky factor of the damped inverse. Linears that read the same input (q/k/v, gate/up) share
    one, so the factorisation is done once for all of them."""

    hinv: Tensor
    dead: Tensor
    damp_used: float
    retries: int
    name: str


@torch.no_grad()
def prepare_hessian(
    hessian: Tensor, percdamp: float = 0.01, max_retries: int = 4, name: str = "linear"
) -> PreparedHessian:
    """Dead inputs and the damped inverse's Cholesky factor of one input Hessian [in, in].

    A Hessian holding NaN/inf raises at once: no amount of dampening can repair it.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"layer {name}: Hessian shape {tuple(hessian.shape)} is not square")
    if not torch.isfinite(hessian).all():
        raise RuntimeError(f"SparseGPT: the Hessian of layer {name} holds NaN/inf (non-finite activations)")
    H = hessian.detach().to(torch.float32).clone()
    dead = H.diagonal() == 0  # inputs that never fired: nothing to reconstruct, weight can go
    H.diagonal()[dead] = 1.0
    hinv, damp_used, retries = _upper_cholesky_of_inverse(H, percdamp, max_retries, name)
    return PreparedHessian(hinv, dead, float(damp_used), retries, name)


def _mark_smallest(score: Tensor, k: int, mask: Tensor) -> None:
    """Set `mask` (viewed flat) True at the k smallest scores; ties at the threshold go to the lowest indices.

    A k-th value and a comparison instead of a top-k: the same set (when no two scores tie at the threshold),
    several times faster on a block of 10⁵ scores.
    """
    flat = mask.view(-1)
    if k <= 0:
        return
    if k >= score.numel():
        flat[:] = True
        return
    threshold = torch.kthvalue(score, k).values
    below = score < threshold
    flat |= below
    missing = k - int(below.sum())
    if missing > 0:
        flat[torch.nonzero(score == threshold).flatten()[:missing]] = True


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor | PreparedHessian,
    spec: SparsitySpec | str | float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_retries: int = 4,
    name: str = "linear",
) -> SparseGPTResult:
    """Prune ``weight`` [out, in] to ``spec`` with SparseGPT given the layer's input Hessian [in, in], or a
    `PreparedHessian` shared with other Linears of the same input (then percdamp/max_retries were its)."""
    spec = parse_sparsity(spec)
    rows, cols = weight.shape
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    prepared = hessian if isinstance(hessian, PreparedHessian) else None
    shape = tuple(prepared.hinv.shape if prepared is not None else hessian.shape)
    if shape != (cols, cols):
        raise ValueError(f"layer {name}: Hessian shape {shape} does not match {cols} input features")
    check_nm_width(cols, spec, name)
    if spec.is_nm:  # groups of M must not straddle two blocks
        blocksize = max(spec.m, blocksize // spec.m * spec.m)
    if prepared is None:
        prepared = prepare_hessian(hessian, percdamp, max_retries, name)

    Hinv, damp_used, retries = prepared.hinv, prepared.damp_used, prepared.retries
    device = Hinv.device
    # Transposed ([in, out]): the column loop below then reads and updates contiguous rows. Every element sees
    # the reference's operations in its order, so the result is bit for bit the row-major loop's.
    WT = weight.detach().to(device=device, dtype=torch.float32).T.contiguous()
    WT[prepared.dead] = 0.0

    prunedT = torch.zeros(cols, rows, dtype=torch.bool, device=device)
    error = torch.zeros((), dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = WT[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True = prune
        if not spec.is_nm:
            _mark_smallest((W1**2 / d.unsqueeze(1) ** 2).flatten(), round(spec.fraction * W1.numel()), mask1)
        for i in range(count):
            if spec.is_nm and i % spec.m == 0:
                score = W1[i : i + spec.m] ** 2 / d[i : i + spec.m].unsqueeze(1) ** 2
                smallest = torch.topk(score, spec.n, dim=0, largest=False).indices
                mask1[i : i + spec.m].scatter_(0, smallest, True)
            # (w - q) / d with q = w where kept, 0 where pruned: w / d where pruned, 0 elsewhere (the same bits)
            err = torch.where(mask1[i], W1[i], zero).div_(d[i])
            Err1[i] = err
            # column i itself is final (q); only the columns after it take the update
            W1[i + 1 :] -= torch.outer(Hinv1[i, i + 1 :], err)
        WT[i1:i2] = W1.masked_fill_(mask1, 0.0)
        prunedT[i1:i2] = mask1
        error += (Err1.double() ** 2).sum() / 2  # OBS loss (w - q)² / d² of every weight pruned in the block
        WT[i2:] -= Hinv[i1:i2, i2:].T @ Err1

    W, pruned = WT.T, prunedT.T
    if not torch.isfinite(W).all():
        raise RuntimeError(f"SparseGPT produced non-finite weights for layer {name} (damp {damp_used:.3g})")
    return SparseGPTResult(
        weight=W.to(device=weight.device, dtype=weight.dtype),
        mask=(~pruned).to(weight.device),
        damp_used=float(damp_used),
        retries=retries,
        error=float(error.item()),
    )


@torch.no_grad()
def magnitude_prune(weight: Tensor, spec: SparsitySpec | str | float) -> tuple[Tensor, Tensor]:
    """Baseline: zero the smallest |w| — per row in each group of M for N:M, over the whole layer otherwise.

    Returns (pruned weight, keep-mask with True = kept).
    """
    spec = parse_sparsity(spec)
    rows, cols = weight.shape
    magnitude = weight.detach().abs().float()
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    if spec.is_nm:
        check_nm_width(cols, spec, "weight")
        groups = magnitude.reshape(rows, cols // spec.m, spec.m)
        smallest = torch.topk(groups, spec.n, dim=2, largest=False).indices
        keep.view(rows, cols // spec.m, spec.m).scatter_(2, smallest, False)
    else:
        k = round(spec.fraction * magnitude.numel())
        keep.view(-1)[torch.topk(magnitude.flatten(), k, largest=False).indices] = False
    return torch.where(keep, weight.detach(), torch.zeros_like(weight)), keep
