"""Golden test: sd2's SparseGPT against the reference implementation, on real SmolLM2-135M activations.

The reference is ``SparseGPT.add_batch`` / ``SparseGPT.fasterprune`` of IST-DASLab/sparsegpt (``sparsegpt.py``),
ported below with its numerics kept: float32 throughout, the same operations in the same order. Left out are
the parts sd2 does not have (the quantizer, Conv1D/Conv2d layouts, timing and debug output).

Both sides see the same real inputs: the inputs of two Linear layers of SmolLM2-135M-Instruct's first decoder
layer while it reads the shipped calibration text. Where sd2 and the reference differ, the difference is
asserted as such rather than hidden by a tolerance:

* The reference counts ``add_batch`` calls (sequences) in ``nsamples``, sd2 counts token rows, so the
  reference's H is L times sd2's for L-token sequences. SparseGPT is invariant to scaling H (the damp is a
  fraction of mean(diag H); scores and updates scale away), and with L = 64, a power of two, the scaling is
  exact in floating point, so the pruned weights come out bit for bit the same.
* With dead inputs (features that are always zero) both set H_ii = 1, a constant that does not scale with H,
  so there the two normalisations give different results; that case is compared on sd2's normalisation.
* For unstructured sparsity the reference prunes every weight whose score is <= the value at sorted index
  int(n·s) of the block: int(n·s) + 1 weights per block, one more than asked. sd2 prunes exactly round(n·s).
  The port keeps that rule (``reference_count=True``) for the test that pins the difference down, and takes
  the int(n·s) smallest (``reference_count=False``) to compare the rest of the algorithm.
* sd2 computes the damp percdamp x mean(diag H) in float64 and rounds it once to float32; the reference
  multiplies in float32. For about one Hessian in four the two differ by one float32 ulp, which alone flips
  mask entries; for the Hessians used here they agree, and the tests check that before comparing.

Why exact masks can be asserted: float32 SparseGPT is chaotic at the mask threshold (on these layers, summing
the same Hessian in another order, a relative change of 5e-7, flips up to ~180 mask entries), so equal masks
prove that the two implementations do the same arithmetic, not merely similar arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch

from sd2_core.pruning import HessianAccumulator, sparsegpt_prune

SEQ_LEN = 64  # a power of two: the reference's H is exactly SEQ_LEN x sd2's
N_SAMPLES = 4
Q_PROJ, DOWN_PROJ = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
BLOCKSIZE, PERCDAMP = 128, 0.01
# Both sides run the same float32 operations, so the weights are expected bit-identical (observed: max |Δ| = 0).
# 1e-6 (a few float32 ulps for weights of magnitude ~1-5) leaves room only for BLAS summation-order noise; one
# differently pruned weight changes the result by ~0.1-1, and is caught by the mask comparison first.
WEIGHT_ATOL = 1e-6


class ReferenceSparseGPT:
    """Port of the reference's ``SparseGPT`` for one ``nn.Linear`` weight [rows, columns]."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.rows, self.columns = weight.shape
        self.H = torch.zeros((self.columns, self.columns), dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """``inp`` [batch, tokens, columns], what a forward hook on the Linear sees for one forward."""
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]  # the reference counts sequences, not tokens
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(
        self,
        sparsity: float,
        prunen: int = 0,
        prunem: int = 0,
        blocksize: int = 128,
        percdamp: float = 0.01,
        reference_count: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(pruned weight, pruned-mask with True = pruned, summed OBS loss). ``reference_count=False`` changes one
        thing only: unstructured blocks prune exactly int(n·s) weights instead of the reference's int(n·s) + 1."""
        W = self.weight.detach().clone().float()
        H = self.H.clone()  # the reference consumes self.H; a copy lets one Hessian serve several prunes
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        losses = torch.zeros(self.rows)
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)

        pruned = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            if prunen == 0:
                score = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                index = int(score.numel() * sparsity) - (0 if reference_count else 1)
                thresh = torch.sort(score.flatten())[0][index]
                mask1 = score <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    score = W1[:, i : i + prunem] ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(score, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1

            W[:, i1:i2] = Q1
            pruned[:, i1:i2] = mask1
            losses += torch.sum(Losses1, 1) / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        return W, pruned, float(torch.sum(losses))


class _StopForward(Exception):
    """Raised before decoder layer 1: the layers under test are in layer 0, the rest of the forward is waste."""


@pytest.fixture(scope="module")
def real_inputs() -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    """{Linear name: (its weight, its inputs [1, SEQ_LEN, in] per calibration sequence)} of the real model."""
    from sd2_core.config import CalibrationConfig
    from sd2_core.data.calibration import load_calibration
    from sd2_core.models import builtin_dir, load_model, load_tokenizer

    folder = builtin_dir("smollm2-135m-instruct")
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    ids, mask = load_calibration(tokenizer, CalibrationConfig(n_samples=N_SAMPLES, seq_len=SEQ_LEN))
    assert bool(mask.all()), "the reference has no padding: the comparison needs full calibration windows"
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {Q_PROJ: [], DOWN_PROJ: []}
    handles = [
        modules[name].register_forward_hook(lambda _m, args, _o, name=name: captured[name].append(args[0].detach()))
        for name in captured
    ]

    def stop(*_):
        raise _StopForward

    handles.append(model.model.layers[1].register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            for i in range(N_SAMPLES):  # one sequence per forward, as the reference calibrates
                with pytest.raises(_StopForward):
                    model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (modules[name].weight.detach().clone(), inputs) for name, inputs in captured.items()}


DEAD = [5, 300]  # two real input features of q_proj, zeroed: inputs that never fire


def _fed(real_inputs, name: str, dead: list[int]) -> tuple[torch.Tensor, HessianAccumulator, ReferenceSparseGPT]:
    """(weight, sd2's accumulator, the reference port), fed the same inputs one sequence at a time."""
    weight, inputs = real_inputs[name]
    sd2, reference = HessianAccumulator(weight.shape[1]), ReferenceSparseGPT(weight)
    for x in inputs:
        if dead:
            x = x.clone()
            x[..., dead] = 0.0
        sd2.add_batch(x, torch.ones(x.shape[:-1]))
        reference.add_batch(x)
    return weight, sd2, reference


@pytest.fixture(params=[Q_PROJ, DOWN_PROJ], ids=["q_proj", "down_proj"])
def both(request, real_inputs):
    return _fed(real_inputs, request.param, [])


@pytest.fixture
def both_dead(real_inputs):
    return _fed(real_inputs, Q_PROJ, DEAD)


def _nm(spec: str) -> tuple[int, int]:
    return (2, 4) if spec == "2:4" else (0, 0)


def _damps_round_alike(hessian: torch.Tensor) -> bool:
    """Whether sd2's damp (percdamp x mean(diag H) in float64, rounded once) equals the reference's (in float32)."""
    h = hessian.clone()
    h.diagonal()[h.diagonal() == 0] = 1
    mean = h.diagonal().mean()
    return float(torch.tensor(PERCDAMP * mean.item(), dtype=torch.float32)) == float(PERCDAMP * mean)


DAMP_ULP = "the float64 and float32 damps differ by an ulp for this Hessian: no bit-for-bit comparison possible"


def test_hessian_is_the_references_over_tokens_per_sequence(both):
    """The reference averages over sequences, sd2 over tokens: H_ref = SEQ_LEN · H_sd2, exactly (SEQ_LEN = 2^6)."""
    _, sd2, reference = both
    assert (reference.nsamples, sd2.nsamples) == (N_SAMPLES, N_SAMPLES * SEQ_LEN)
    assert torch.equal(reference.H, sd2.H * SEQ_LEN)
    assert bool((sd2.H.diagonal() > 0).all())  # no dead inputs in the real activations: that case is below


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_pruning_matches_the_reference(both, spec):
    """Same mask exactly, same weights, same OBS loss (the reference's is SEQ_LEN times sd2's: its H is)."""
    weight, sd2, reference = both
    assert _damps_round_alike(sd2.H), DAMP_ULP
    mine = sparsegpt_prune(weight, sd2.H, spec, blocksize=BLOCKSIZE, percdamp=PERCDAMP)
    theirs, pruned, loss = reference.fasterprune(0.5, *_nm(spec), BLOCKSIZE, PERCDAMP, reference_count=False)
    assert mine.retries == 0
    differ = int((~mine.mask != pruned).sum())
    assert differ == 0, f"{differ} of {pruned.numel()} mask entries differ from the reference"
    torch.testing.assert_close(mine.weight, theirs, rtol=0, atol=WEIGHT_ATOL)
    assert mine.error * SEQ_LEN == pytest.approx(loss, rel=1e-4)


def test_reference_prunes_one_weight_more_per_block_than_asked(real_inputs):
    """The reference's own unstructured rule prunes int(n·s) + 1 weights per block where sd2 prunes round(n·s). In
    the first block, where both still see the same weights, the reference's mask is sd2's plus one weight."""
    weight, sd2, reference = _fed(real_inputs, Q_PROJ, [])
    mine = sparsegpt_prune(weight, sd2.H, "0.5", blocksize=BLOCKSIZE, percdamp=PERCDAMP)
    _, pruned, _ = reference.fasterprune(0.5, 0, 0, BLOCKSIZE, PERCDAMP, reference_count=True)
    for start in range(0, weight.shape[1], BLOCKSIZE):
        theirs, ours = pruned[:, start : start + BLOCKSIZE], ~mine.mask[:, start : start + BLOCKSIZE]
        assert int(theirs.sum()) == int(theirs.numel() * 0.5) + 1
        assert int(ours.sum()) == round(ours.numel() * 0.5)
    first_theirs, first_ours = pruned[:, :BLOCKSIZE], ~mine.mask[:, :BLOCKSIZE]
    assert not bool((first_ours & ~first_theirs).any())
    assert int((first_theirs & ~first_ours).sum()) == 1


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_dead_inputs_match_the_reference_on_the_same_normalisation_of_h(both_dead, spec):
    """Dead inputs are handled the reference's way (weights zeroed, H_ii set to 1), but that 1 does not scale
    with H: with dead inputs the result depends on how H is normalised. The reference itself prunes differently
    on its per-sequence H than on the same H per token, and sd2 matches it exactly on the per-token one.

    The difference this leaves (reported, not fixed here): on sd2's per-token H of this layer the two 1s raise
    mean(diag H), hence the damp, by ~75 %; on the reference's per-sequence H, 64x larger, by ~1 %.
    """
    weight, sd2, reference = both_dead
    assert torch.equal(reference.H, sd2.H * SEQ_LEN)
    assert _damps_round_alike(sd2.H), DAMP_ULP
    _, per_sequence, _ = reference.fasterprune(0.5, *_nm(spec), BLOCKSIZE, PERCDAMP, reference_count=False)
    reference.H = reference.H / SEQ_LEN  # sd2's normalisation; exact, SEQ_LEN is a power of two
    theirs, pruned, loss = reference.fasterprune(0.5, *_nm(spec), BLOCKSIZE, PERCDAMP, reference_count=False)
    assert bool((per_sequence != pruned).any()), "the reference no longer depends on H's scale: compare on its own H"

    mine = sparsegpt_prune(weight, sd2.H, spec, blocksize=BLOCKSIZE, percdamp=PERCDAMP)
    differ = int((~mine.mask != pruned).sum())
    assert differ == 0, f"{differ} of {pruned.numel()} mask entries differ from the reference"
    torch.testing.assert_close(mine.weight, theirs, rtol=0, atol=WEIGHT_ATOL)
    assert mine.error == pytest.approx(loss, rel=1e-4)
    assert bool((mine.weight[:, DEAD] == 0).all())
