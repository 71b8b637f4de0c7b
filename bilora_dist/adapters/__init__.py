"""Adapters: the flat-tensor bank, the per-layer hook, and injection into a model."""

from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape
from bilora_dist.adapters.inject import build_bank, inject, layer_shapes, select_targets

__all__ = ["AdapterBank", "Branch", "LayerShape", "build_bank", "inject", "layer_shapes", "select_targets"]
