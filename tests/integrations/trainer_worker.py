"""One SFTTrainer run with BiLoRACallback on the ranks a launcher starts (torchrun, deepspeed), for the
2-rank tests of tests/integrations/test_trainer.py. Usage: trainer_worker.py MODEL_DIR DATA OUT STEPS MBS ACCUM
[DS_CONFIG_JSON]. Writes OUT/losses.json (every step's loss and auxiliary norm) and OUT/saved (the adapter)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bilora_dist.integrations import BiLoRACallback
from tests_support import sft_trainer

if ds_config_arg := sys.argv[7:]:
    import deepspeed

    # gloo's collectives, not DeepSpeed's shared-memory op, which it would JIT-build on a CPU (the tests plant a
    # stale build lock that such a build waits on forever); bilora_dist's own engine does the same on CPUs
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
model_dir, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
steps, mbs, accum = (int(a) for a in sys.argv[4:7])
ds_config = json.loads(ds_config_arg[0]) if ds_config_arg else None
callback = BiLoRACallback(rho=0.05, aux_rank=8, seed=0, project_init=True)
trainer = sft_trainer(model_dir, data, out, [callback], steps=steps, mbs=mbs, accum=accum, lr=5e-3, seq_len=128,
                      deepspeed=ds_config, ddp_backend="gloo")
trainer.train()
trainer.save_model(str(out / "saved"))
if trainer.is_world_process_zero():
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    engine = "deepspeed" if trainer.is_deepspeed_enabled else "fsdp" if trainer.is_fsdp_enabled else "ddp"
    stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if engine == "deepspeed" else None
    (out / "losses.json").write_text(json.dumps({"loss": losses, "aux_norm": callback.aux_norms, "engine": engine,
                                                 "zero_stage": stage,
                                                 "world_size": trainer.args.world_size}))
(out / f"aux_digest_{trainer.args.process_index}").write_text(callback.bank.digest())
