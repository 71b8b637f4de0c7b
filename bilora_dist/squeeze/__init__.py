"""LoRA-Squeeze: compress LoRA adapters to a lower rank (specs/squeeze.md)."""

from bilora_dist.squeeze.branch import LayerReport, assign_layers, squeeze_branch
from bilora_dist.squeeze.operator import Spectrum, balanced_factors, energy_rank, factored_svd, randomized_svd

__all__ = ["LayerReport", "Spectrum", "assign_layers", "balanced_factors", "energy_rank", "factored_svd",
           "randomized_svd", "squeeze_branch"]
