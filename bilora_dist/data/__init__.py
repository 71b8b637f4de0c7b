"""Training data: sources, record formats, tokenization with loss masks, the batch plan and collation.

The batch side (batching) imports only torch; the preparation side (pipeline: datasets, pyarrow) loads on
first use, so the training step, the loss and the GPU check run where `datasets` is not installed."""

from typing import Any

from bilora_dist.data.batching import (IGNORE, BatchPlan, Example, collate, collate_packed, ids_and_labels,
                                       pack_rows, to_device)
from bilora_dist.data.tokenize import tokenize

__all__ = ["IGNORE", "BatchPlan", "Example", "Prepared", "collate", "collate_packed", "ids_and_labels", "pack_rows",
           "prepare_examples", "to_device", "tokenize"]


def __getattr__(name: str) -> Any:
    if name in ("Prepared", "prepare_examples"):
        from bilora_dist.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
