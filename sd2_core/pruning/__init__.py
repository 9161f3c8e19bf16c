"""SparseGPT one-shot pruning (unstructured and N:M) of a decoder-only LM's Linear layers."""

from sd2_core.pruning.model_pruner import prune_model
from sd2_core.pruning.sparsegpt import HessianAccumulator, SparseGPTResult, magnitude_prune, sparsegpt_prune
from sd2_core.pruning.sparsity import SparsitySpec, check_nm_width, parse_sparsity
from sd2_core.pruning.structure import decoder_linears, measure_sparsity, nonzero_masks

__all__ = [
    "HessianAccumulator",
    "SparseGPTResult",
    "SparsitySpec",
    "check_nm_width",
    "decoder_linears",
    "magnitude_prune",
    "measure_sparsity",
    "nonzero_masks",
    "parse_sparsity",
    "prune_model",
    "sparsegpt_prune",
]
