"""One SFTTrainer run with BiLoRACallback on the ranks a launcher starts (torchrun, deepspeed), for the
2-rank tests of tests/integrations/test_trainer.py. Usage: trainer_worker.py MODEL_DIR DATA OUT STEPS MBS ACCUM
[DS_CONFIG_JSON]. Writes OUT/losses.json (every step's loss and auxiliary norm) and OUT/saved (the adapter)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from bilora_dist.data import BatchPlan, collate, prepare_examples
from bilora_dist.data.tokenize import TokenizeOptions
from bilora_dist.integrations import BiLoRACallback

if ds_config_arg := sys.argv[7:]:
    import deepspeed

    # gloo's collectives, not DeepSpeed's shared-memory op, which it would JIT-build on a CPU (the tests plant a
    # stale build lock that such a build waits on forever); bilora_dist's own engine does the same on CPUs
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
model_dir, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
steps, mbs, accum = (int(a) for a in sys.argv[4:7])
ds_config = json.loads(ds_config_arg[0]) if ds_config_arg else None
world = int(os.environ.get("WORLD_SIZE", "1"))
tokenizer = AutoTokenizer.from_pretrained(model_dir)
examples = prepare_examples(data, "--data", tokenizer, TokenizeOptions(128), log=lambda _: None).examples
plan = BatchPlan(len(examples), mbs * accum * world, seed=0)
# the trainer deals consecutive micro-batches to ranks in turn: step, then accumulation, then rank
order = [i for t in range(steps) for a in range(accum) for r in range(world)
         for i in plan.micro_batches(t, r, world, accum)[a]]


def collator(batch_examples):
    batch = collate(batch_examples, tokenizer.pad_token_id)
    batch.pop("logits_to_keep")
    return batch


callback = BiLoRACallback(rho=0.05, aux_rank=8, seed=0, project_init=True)
args = SFTConfig(output_dir=str(out), per_device_train_batch_size=mbs, gradient_accumulation_steps=accum,
                 max_steps=steps, learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=1, optim="adamw_torch",
                 max_grad_norm=1.0, bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                 report_to=[], train_sampling_strategy="sequential", dataset_kwargs={"skip_prepare_dataset": True},
                 remove_unused_columns=False, seed=0, use_cpu=True, max_length=None, disable_tqdm=True,
                 deepspeed=ds_config, ddp_backend="gloo")
trainer = SFTTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=examples.select(order),
                     processing_class=tokenizer, data_collator=collator, callbacks=[callback],
                     peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
trainer.train()
trainer.save_model(str(out / "saved"))
if trainer.is_world_process_zero():
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    engine = "deepspeed" if trainer.is_deepspeed_enabled else "fsdp" if trainer.is_fsdp_enabled else "ddp"
    stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if engine == "deepspeed" else None
    (out / "losses.json").write_text(json.dumps({"loss": losses, "aux_norm": callback.aux_norms, "engine": engine,
                                                 "zero_stage": stage, "world_size": world}))
(out / f"aux_digest_{trainer.args.process_index}").write_text(callback.bank.digest())
