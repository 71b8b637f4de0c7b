"""bilora_dist: Bi-LoRA and LoRA-Squeeze fine-tuning of causal LMs, single process or sharded."""

__version__ = "0.1.0"
