"""Bi-LoRA inside the trainers people already run (HF Trainer, TRL's SFTTrainer): the project's own bank,
hooks, optimizer and projection around the PEFT LoRA model the trainer holds."""

from bilora_dist.integrations.trainer import BiLoRACallback

__all__ = ["BiLoRACallback"]
