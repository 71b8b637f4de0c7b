"""Bi-LoRA in a TRL SFTTrainer script: the embedded SmolLM2-135M-Instruct on the embedded WordNet task.

    python examples/sft_bilora.py [--max-steps 30] [--output-dir outputs/sft_bilora]

A plain TRL LoRA script; the three lines marked `# Bi-LoRA` are all it takes. Without them it is plain LoRA.
Launch it as any TRL script: `accelerate launch`, `torchrun` or `deepspeed` (docs/integrations.md).
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from bilora_dist.integrations import BiLoRACallback  # Bi-LoRA (1/3)
from bilora_dist.model.embedded import DEFAULT_EVAL, DEFAULT_TRAIN, default_model_dir

parser = argparse.ArgumentParser()
parser.add_argument("--max-steps", type=int, default=30)
parser.add_argument("--output-dir", default="outputs/sft_bilora")
args = parser.parse_args()

model_dir = default_model_dir()  # a local copy of the embedded model: nothing is downloaded
data = load_dataset("json", data_files={"train": str(DEFAULT_TRAIN), "eval": str(DEFAULT_EVAL)})
bilora = BiLoRACallback(rho=0.05, aux_rank=8)  # Bi-LoRA (2/3)
trainer = SFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_dir),
    processing_class=AutoTokenizer.from_pretrained(model_dir),
    args=SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                   learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=5,
                   bf16=False, use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
                   max_length=128),
    train_dataset=data["train"],
    eval_dataset=data["eval"].select(range(64)),
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    callbacks=[bilora],  # Bi-LoRA (3/3)
)
trainer.train()
print(f"eval loss {trainer.evaluate()['eval_loss']:.4f} (the primary adapter alone); "
      f"auxiliary norm {bilora.aux_norms[-1]:.4f} (rho 0.05)")
trainer.save_model(args.output_dir)  # a plain PEFT adapter: PeftModel.from_pretrained loads it
print(f"adapter written to {args.output_dir}")
