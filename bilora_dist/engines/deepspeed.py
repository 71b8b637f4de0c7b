"""DeepSpeed: ZeRO-3 partitions the frozen base (optionally offloaded to CPU) and gathers each
block for its forward and backward; adapters stay outside, replicated, stepped by our optimizer.

`deepspeed.initialize` refuses a model without trainable parameters or an optimizer it owns, so the
engine uses DeepSpeed's parameter-partitioning half, `DeepSpeedZeRoOffload`, directly. ZeRO-1/2
partition only gradients and optimizer state, which a frozen base does not have: with stage <= 2
the base is replicated and the engine is plain data parallelism.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bilora_dist.config.ds_config import hidden_size_of, resolve, unused_line
from bilora_dist.engines.distributed import DataParallelEngine, init_process_group, single_process_defaults
from bilora_dist.model.loading import LoadOptions, load_config, load_frozen_model

# DeepSpeedZeRoOffload's parameter-partitioning options, under DeepSpeedZeroConfig's field names
_PARTITIONING = ("param_persistence_threshold", "model_persistence_threshold", "prefetch_bucket_size",
                 "max_live_parameters", "max_reuse_distance")


class DeepSpeedEngine(DataParallelEngine):
    def __init__(self, ds_config: dict[str, Any], dtype: torch.dtype):
        """`ds_config` as read_ds_config returns it; its trainer values are already in the TrainConfig."""
        import deepspeed

        single_process_defaults()
        if deepspeed.get_accelerator().device_name() == "cpu":
            # gloo's collectives rather than DeepSpeed's shared-memory op, which it would JIT-compile (30-100 s
            # whenever its build cache is cold or was built by another environment); a process killed during
            # that build leaves a lock file that every later launch waits on forever.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not deepspeed.comm.is_initialized():
            backend = "nccl" if deepspeed.get_accelerator().device_name() == "cuda" else "gloo"
            if not dist.is_initialized():
                init_process_group(backend, 1800.0)  # restart-safe under torchrun; DeepSpeed adopts the group
            deepspeed.init_distributed(dist_backend=backend)
        super().__init__()
        self.user_config = ds_config
        self.ds_config: dict[str, Any] = {}  # what DeepSpeed receives: resolve()d once the model config is known
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.name = f"deepspeed-zero{self.stage}"
        unused = unused_line(ds_config)
        if unused and self.is_main:
            print(unused, flush=True)
        self._hf_ds_config = None
        self._offload: Any = None

    def build(self, path: str, options: LoadOptions) -> nn.Module:
        if self.stage < 3:
            return super().build(path, options)
        from transformers.integrations import HfDeepSpeedConfig

        self.ds_config = resolve(self.user_config, options.dtype == torch.bfloat16, hidden_size_of(load_config(path)))
        # While this object lives, from_pretrained builds the model under deepspeed.zero.Init (each rank
        # allocates only its partition) and loads the checkpoint into the partitions.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        return load_frozen_model(path, options)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.stage < 3:
            return model
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        from deepspeed.utils.timer import NoopTimer

        zero = DeepSpeedZeroConfig(**self.ds_config["zero_optimization"])  # DeepSpeed's own defaults
        self._offload = DeepSpeedZeRoOffload(model, timers=NoopTimer(), ds_config=self.ds_config,
                                            offload_param_config=zero.offload_param,
                                            **{name: getattr(zero, name) for name in _PARTITIONING})
        return model

    def release(self) -> None:
        if self._offload is not None:
            self._offload.empty_partition_cache()

    def held_base_numel(self, model: nn.Module) -> tuple[int, int]:
        if self.stage < 3:
            return super().held_base_numel(model)
        # its partition of every parameter, plus the full copies of the resident (persistent) small ones
        params = list(model.parameters())
        return sum(p.ds_tensor.numel() + p.data.numel() for p in params), sum(p.ds_numel for p in params)
