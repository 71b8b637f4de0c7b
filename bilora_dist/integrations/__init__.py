"""Bi-LoRA and LoRA-Squeeze inside the trainers people already run (HF Trainer, TRL's SFTTrainer): the project's
own bank, hooks, optimizer, projection and squeeze around the PEFT LoRA model the trainer holds."""

from bilora_dist.integrations.squeeze import SqueezeCallback
from bilora_dist.integrations.trainer import BiLoRACallback

__all__ = ["BiLoRACallback", "SqueezeCallback"]
