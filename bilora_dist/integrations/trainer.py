"""`BiLoRACallback`: Bi-LoRA in HF Trainer and TRL's SFTTrainer, one callback in `callbacks=[...]`.

The trainer keeps what it owns: the PEFT primary, its AdamW, scheduler, gradient clipping (the primary's
only: the auxiliary is not a model parameter), checkpoints and the saved adapter (the primary only). The
callback adds what Bi-LoRA adds, with the project's own code: the auxiliary branch on every LoRA layer
(integrations/peft_bank.py), its ascent from the same backward (training/methods.build_optimizer's
`maximize` group, at the step's learning rate times `aux_lr_scale`), one all-reduce of its gradient across
data-parallel ranks, and the projection onto the global radius rho after every optimizer step
(AdapterBank.project_aux). The auxiliary and its AdamW moments go into each checkpoint-N/ and come back on
`trainer.train(resume_from_checkpoint=...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from bilora_dist.errors import UserError
from bilora_dist.integrations.peft_bank import attach_aux_bank, project_init
from bilora_dist.training.methods import build_optimizer

AUX_FILE = "bilora_aux.pt"
MIN_TRANSFORMERS = (5, 25)


class BiLoRACallback(TrainerCallback):
    """Bi-LoRA for a trainer whose model is a PEFT LoRA model: `callbacks=[BiLoRACallback(rho=0.05)]`.

    `aux_rank`, `aux_scale`, `aux_lr_scale` and `seed` are `bilora-dist train`'s --aux-rank, --aux-scale,
    --aux-lr-scale and --seed; `project_init=True` also starts the primary from the project's
    initialisation (for a run that must equal `bilora-dist train`'s)."""

    def __init__(self, rho: float = 0.05, aux_rank: int = 8, aux_scale: float = 1.0, aux_lr_scale: float = 1.0,
                 seed: int = 0, project_init: bool = False):
        import transformers

        version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
        if version < MIN_TRANSFORMERS:
            raise UserError(f"BiLoRACallback needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, "
                            f"found {transformers.__version__}")
        if not rho >= 0 or aux_rank < 1 or not aux_scale > 0 or not aux_lr_scale > 0:
            raise UserError(f"BiLoRACallback: rho >= 0, aux_rank >= 1, aux_scale > 0 and aux_lr_scale > 0 "
                            f"(got {rho}, {aux_rank}, {aux_scale}, {aux_lr_scale})")
        self.rho, self.aux_rank, self.aux_scale, self.aux_lr_scale = rho, aux_rank, aux_scale, aux_lr_scale
        self.seed, self.project_init = seed, project_init
        self.bank = self.optimizer = None
        self.handles: list = []
        self.lr = 0.0
        self.aux_norms: list[float] = []

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.project_init:
            project_init(model, self.seed)
        self.bank, self.handles = attach_aux_bank(model, self.aux_rank, self.aux_scale, self.seed)
        self.bank.bind_grad_bucket()
        self.optimizer = build_optimizer(self.bank, args.learning_rate, 0.0, (args.adam_beta1, args.adam_beta2),
                                         args.adam_epsilon, self.aux_lr_scale)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0:  # resumed: the auxiliary and its moments of that checkpoint
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / AUX_FILE
            if not path.is_file():
                raise UserError(f"resuming at step {state.global_step}: {path} is missing (the checkpoint was "
                                "not written with BiLoRACallback)")
            saved = torch.load(path, weights_only=True)
            with torch.no_grad():
                self.bank.aux.flat.copy_(saved["aux"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.aux_norms = saved["aux_norms"]
            self.bank.bind_grad_bucket()

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.bank.grad_bucket.zero_()
        self.lr = optimizer.param_groups[0]["lr"]  # the learning rate of this step, whoever schedules it

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        grad = self.bank.grad_bucket.flat
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(grad)  # each rank's loss is its share of the global mean, scaled by the world size
            grad.div_(dist.get_world_size())
        self.optimizer.param_groups[1]["lr"] = self.lr * self.aux_lr_scale
        self.optimizer.step()
        self.aux_norms.append(min(self.bank.project_aux(self.rho), self.rho))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs and self.aux_norms:
            logs["aux_norm"] = self.aux_norms[-1]

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            torch.save({"aux": self.bank.aux.flat.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                        "aux_norms": self.aux_norms}, folder / AUX_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for handle in self.handles:  # the model the trainer saves and returns is plain PEFT again
            handle.remove()
        self.handles = []
