"""The auxiliary branch of a PEFT LoRA model: checks of what the method can honour, and a bank built over the
model's LoRA layers with the project's own code (adapters.build_bank, adapters.inject)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilora_dist.adapters import build_bank, inject
from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape
from bilora_dist.errors import UserError


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path in the base model, module) of every PEFT LoRA layer, in model order."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return [(name, module) for name, module in base.named_modules() if isinstance(module, LoraLayer)]


def check_peft_model(model: nn.Module) -> Any:
    """The model's one LoRA config, or a one-line UserError naming what Bi-LoRA cannot honour."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or not getattr(model, "peft_config", None):
        raise UserError("Bi-LoRA needs a PEFT LoRA model: pass peft_config=LoraConfig(...) to the trainer or "
                        "wrap the model with peft.get_peft_model first")
    if len(model.peft_config) != 1:
        raise UserError(f"Bi-LoRA trains one LoRA adapter; the model has {len(model.peft_config)}: "
                        f"{', '.join(model.peft_config)}")
    (config,) = model.peft_config.values()
    problems = [
        (str(getattr(config, "peft_type", "LORA")) not in ("LORA", "PeftType.LORA"), "the adapter is not LoRA"),
        (bool(getattr(config, "use_dora", False)), "DoRA (use_dora=True) changes the update Bi-LoRA perturbs"),
        (float(getattr(config, "lora_dropout", 0.0) or 0.0) > 0,
         f"lora_dropout={getattr(config, 'lora_dropout', 0)}: the auxiliary branch takes the layer's input "
         "undropped, so the two branches would see different inputs; set lora_dropout=0"),
        (bool(getattr(config, "modules_to_save", None)),
         f"modules_to_save={getattr(config, 'modules_to_save', None)}: fully trained modules join the primary's "
         "clipping norm and get no auxiliary"),
        (bool(getattr(config, "trainable_token_indices", None)), "trainable_token_indices (trained embedding rows)"),
        (bool(getattr(config, "target_parameters", None)), "target_parameters (MoE experts) are not supported here"),
    ]
    for found, problem in problems:
        if found:
            raise UserError(f"Bi-LoRA cannot honour this PEFT config: {problem}")
    if not lora_layers(model):
        raise UserError("the PEFT model has no LoRA layer")
    return config


def layer_shapes_of(model: nn.Module) -> list[LayerShape]:
    return [LayerShape(name, module.in_features, module.out_features) for name, module in lora_layers(model)]


def project_init(model: nn.Module, seed: int) -> None:
    """Set the primary to the factors the project's own run starts from (adapters.build_bank with `seed`), so
    a trainer run and `bilora-dist train` start from the same adapter."""
    from bilora_dist.export.peft import copy_into_peft

    config = check_peft_model(model)
    bank = build_bank(layer_shapes_of(model), config.r, config.lora_alpha, None, 1.0, seed)
    copy_into_peft(model, bank.primary)


def attach_aux_bank(model: nn.Module, aux_rank: int, aux_scale: float, seed: int) -> tuple[AdapterBank, list]:
    """An adapter bank whose primary is empty (PEFT holds and trains the primary) and whose auxiliary is the
    project's, initialised as `bilora-dist train --seed seed` initialises it, hooked onto the LoRA layers.
    The auxiliary is on while the model is in training mode only (evaluation runs the primary alone)."""
    config = check_peft_model(model)
    shapes = layer_shapes_of(model)
    aux = build_bank(shapes, config.r, config.lora_alpha, aux_rank, aux_scale, seed).aux
    n = len(shapes)
    bank = AdapterBank(shapes, Branch(shapes, [0] * n, [0.0] * n, torch.zeros(0)), aux)
    base = model.get_base_model()
    device = next(p.device for p in model.parameters())
    bank.to(device)
    handles = [base.base_model.register_forward_pre_hook(
        lambda module, args: setattr(bank, "aux_active", module.training))]
    return bank, handles + inject(base, bank)
