"""Training data: sources, record formats, tokenization with loss masks, the batch plan and collation."""

from bilora_dist.data.batching import IGNORE, BatchPlan, Example, collate, to_device
from bilora_dist.data.pipeline import Prepared, prepare_examples
from bilora_dist.data.tokenize import tokenize

__all__ = ["IGNORE", "BatchPlan", "Example", "Prepared", "collate", "prepare_examples", "to_device", "tokenize"]
