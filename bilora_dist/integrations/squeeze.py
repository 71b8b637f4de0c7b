"""`SqueezeCallback`: LoRA-Squeeze's post-training squeeze of a trainer's PEFT adapter, with the project's
exact factored SVD (squeeze/branch.squeeze_branch), written as a compact PEFT adapter when training ends.
In-training squeezes (`cont`, `in`) are `bilora-dist train --squeeze`'s only, for now (docs/integrations.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bilora_dist.adapters.bank import Branch
from bilora_dist.errors import UserError
from bilora_dist.export.peft import save_peft_adapter
from bilora_dist.export.peft_io import peft_branch
from bilora_dist.integrations.peft_bank import check_peft_model
from bilora_dist.squeeze.branch import squeeze_branch


def peft_primary(model: Any) -> Branch:
    """The PEFT model's LoRA factors and scales as one branch, read as `bilora-dist squeeze` reads a saved
    adapter (export/peft_io.peft_branch)."""
    from peft import get_peft_model_state_dict

    config = check_peft_model(model)
    tensors = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    return peft_branch(tensors, config.to_dict(), "the trainer's PEFT model")


class SqueezeCallback(TrainerCallback):
    """`callbacks=[SqueezeCallback(rank=8)]`: when training ends, the main process writes the adapter squeezed to
    `rank` (with `energy`, per layer the smallest rank keeping that fraction of ||ΔW||², at most `rank`) to
    `out_dir` (default OUTPUT_DIR/adapter-r{rank}); the same as `bilora-dist squeeze --adapter` of the saved
    adapter."""

    def __init__(self, rank: int, energy: float | None = None, keep_alpha: bool = False, out_dir: str | None = None):
        if rank < 1 or (energy is not None and not 0 < energy <= 1):
            raise UserError(f"SqueezeCallback: rank >= 1 and energy in (0, 1] (got {rank}, {energy})")
        self.rank, self.energy, self.keep_alpha, self.out_dir = rank, energy, keep_alpha, out_dir
        self.written: Path | None = None

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        branch = peft_primary(model)  # checks the model first
        config = model.peft_config[model.active_adapter]
        if self.rank > max(branch.ranks):
            raise UserError(f"SqueezeCallback: rank {self.rank} exceeds the adapter's rank {max(branch.ranks)}")
        with torch.no_grad():
            squeezed, _ = squeeze_branch(branch, self.rank, self.energy, keep_alpha=self.keep_alpha)
        out = Path(self.out_dir or Path(args.output_dir) / f"adapter-r{self.rank}")
        targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else \
            [config.target_modules]
        history = [{"mode": "post", "rank": self.rank, "energy": self.energy,
                    "alpha_policy": "keep-alpha" if self.keep_alpha else "keep-scale", "source": "trainer"}]
        save_peft_adapter(squeezed, out, targets, config.base_model_name_or_path or "", {"squeeze_history": history})
        self.written = out
