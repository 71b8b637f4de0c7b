"""Bi-LoRA in an HF Trainer script: the embedded SmolLM2-135M-Instruct on the embedded WordNet task.

    python examples/trainer_bilora.py [--max-steps 30] [--output-dir outputs/trainer_bilora]

A plain HF Trainer + PEFT script; the three lines marked `# Bi-LoRA` are all it takes.
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)

from bilora_dist.integrations import BiLoRACallback  # Bi-LoRA (1/3)
from bilora_dist.model.embedded import DEFAULT_EVAL, DEFAULT_TRAIN, default_model_dir

parser = argparse.ArgumentParser()
parser.add_argument("--max-steps", type=int, default=30)
parser.add_argument("--output-dir", default="outputs/trainer_bilora")
args = parser.parse_args()

model_dir = default_model_dir()  # a local copy of the embedded model: nothing is downloaded
tokenizer = AutoTokenizer.from_pretrained(model_dir)


def tokenize(record: dict) -> dict:
    """prompt + completion, the loss on the completion only."""
    prompt = tokenizer(record["prompt"])["input_ids"]
    completion = tokenizer(record["completion"] + tokenizer.eos_token)["input_ids"]
    return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}


data = load_dataset("json", data_files={"train": str(DEFAULT_TRAIN), "eval": str(DEFAULT_EVAL)})
data = data.map(tokenize, remove_columns=["prompt", "completion"])
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                       LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
bilora = BiLoRACallback(rho=0.05, aux_rank=8)  # Bi-LoRA (2/3)
trainer = Trainer(
    model=model,
    args=TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                           learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=5,
                           use_cpu=True, report_to=[], save_strategy="no"),
    train_dataset=data["train"],
    eval_dataset=data["eval"].select(range(64)),
    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    callbacks=[bilora],  # Bi-LoRA (3/3)
)
trainer.train()
print(f"eval loss {trainer.evaluate()['eval_loss']:.4f} (the primary adapter alone); "
      f"auxiliary norm {bilora.aux_norms[-1]:.4f} (rho 0.05)")
trainer.save_model(args.output_dir)
print(f"adapter written to {args.output_dir}")
