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
from torch import nn

from bilora_dist.engines.distributed import DataParallelEngine, single_process_defaults
from bilora_dist.modeling import load_frozen_model


class DeepSpeedEngine(DataParallelEngine):
    def __init__(self, ds_config: dict[str, Any], dtype: torch.dtype):
        import deepspeed

        single_process_defaults()
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if deepspeed.get_accelerator().device_name() == "cuda"
                                       else "gloo")
        super().__init__()
        # batch, accumulation and clipping are the trainer's (already merged into its config); DeepSpeed
        # only needs a placeholder batch size to accept the config
        self.ds_config = {k: v for k, v in ds_config.items() if v != "auto"}
        self.ds_config["train_micro_batch_size_per_gpu"] = 1
        if dtype == torch.bfloat16:
            self.ds_config["bf16"] = {"enabled": True}
        self.ds_config.pop("gradient_clipping", None)  # clipping is ours, on the primary adapter only
        self.ds_config.pop("train_batch_size", None)
        self.ds_config.pop("gradient_accumulation_steps", None)
        zero = ds_config.get("zero_optimization", {})
        self.stage = zero.get("stage", 0)
        self.offload = zero.get("offload_param", {}).get("device", "none") == "cpu"
        self.name = f"deepspeed-zero{self.stage}"
        self._hf_ds_config = None
        self._offload: Any = None

    def build(self, path: str, dtype: torch.dtype) -> nn.Module:
        if self.stage < 3:
            return super().build(path, dtype)
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, from_pretrained builds the model under deepspeed.zero.Init (each rank
        # allocates only its partition) and loads the checkpoint into the partitions.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        return load_frozen_model(path, dtype)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.stage < 3:
            return model
        from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadParamConfig
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        from deepspeed.utils.timer import NoopTimer

        zero = self.ds_config["zero_optimization"]
        offload = DeepSpeedZeroOffloadParamConfig(device="cpu", pin_memory=zero["offload_param"].get(
            "pin_memory", False)) if self.offload else None
        options = {"param_persistence_threshold": zero.get("stage3_param_persistence_threshold", 1e5),
                   "prefetch_bucket_size": zero.get("stage3_prefetch_bucket_size", 5e7),
                   "max_live_parameters": zero.get("stage3_max_live_parameters", 1e9),
                   "max_reuse_distance": zero.get("stage3_max_reuse_distance", 1e9)}
        self._offload = DeepSpeedZeRoOffload(model, timers=NoopTimer(), ds_config=self.ds_config,
                                            offload_param_config=offload, **options)
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
