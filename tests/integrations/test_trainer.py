"""BiLoRACallback (bilora_dist/integrations): TRL's SFTTrainer with the callback equals `bilora-dist train
--method bilora` loss for loss and adapter for adapter; without it, plain PEFT equals `--method lora`; resume
restores the auxiliary and its moments; evaluation runs the primary alone; bad use is one line."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bilora_dist.config.train import parse_config
from bilora_dist.data import collate
from bilora_dist.errors import UserError
from bilora_dist.integrations import BiLoRACallback
from bilora_dist.recipe.train import train
from tests_support import free_port, run_env, run_ok, sft_trainer

trl = pytest.importorskip("trl", reason="the hf extra (trl) is part of the test extra")

STEPS, MBS, ACCUM, LR, SEQ = 4, 4, 2, 5e-3, 128


def _reference(tmp_path, model_dir, data, method: str, accum: int = ACCUM) -> tuple[list[dict], dict]:
    out = tmp_path / f"ref_{method}"
    train(parse_config(["--model", str(model_dir), "--data", str(data[0]), "--eval-data", str(data[1]),
                        "--method", method, "--max-steps", str(STEPS), "--micro-batch-size", str(MBS),
                        "--grad-accum", str(accum), "--lr", str(LR), "--seq-len", str(SEQ), "--rho", "0.05",
                        "--gradient-checkpointing", "false", "--eval-on-start", "false", "--output-dir", str(out)]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], load_file(out / "adapter" / "adapter_model.safetensors")


def _sft(tmp_path, model_dir, data, callbacks, max_steps=STEPS, save_steps=0, name="sft", **extra):
    return sft_trainer(model_dir, data[0], tmp_path / name, callbacks, steps=STEPS, mbs=MBS, accum=ACCUM, lr=LR,
                       seq_len=SEQ, max_steps=max_steps, save_steps=save_steps, **extra)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def _assert_same_adapter(trainer, tmp_path, reference: dict) -> None:
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(reference)  # the primary only: the auxiliary is never saved
    for key, want in reference.items():
        err = float((saved[key] - want).norm() / want.norm().clamp_min(1e-30))
        assert err <= 1e-5, (key, err)


def test_sft_trainer_with_the_callback_equals_bilora_dist_train(tmp_path, tiny_model_dir, small_data):
    ref_rows, ref_adapter = _reference(tmp_path, tiny_model_dir, small_data, "bilora")
    callback = BiLoRACallback(rho=0.05, aux_rank=8, seed=0, project_init=True)
    trainer = _sft(tmp_path, tiny_model_dir, small_data, [callback])
    trainer.train()
    assert _losses(trainer) == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5, abs=1e-7)
    assert callback.aux_norms == pytest.approx([r["aux_norm"] for r in ref_rows], rel=1e-5)
    _assert_same_adapter(trainer, tmp_path, ref_adapter)


def test_without_the_callback_the_trainer_equals_lora(tmp_path, tiny_model_dir, small_data):
    """The baseline the callback is compared with: the same trainer, plain PEFT, equals `--method lora`."""
    from bilora_dist.integrations.peft_bank import project_init

    ref_rows, ref_adapter = _reference(tmp_path, tiny_model_dir, small_data, "lora")
    trainer = _sft(tmp_path, tiny_model_dir, small_data, [])
    project_init(trainer.model, seed=0)
    trainer.train()
    assert _losses(trainer) == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5, abs=1e-7)
    _assert_same_adapter(trainer, tmp_path, ref_adapter)


def test_resume_restores_the_auxiliary_and_its_moments(tmp_path, tiny_model_dir, small_data):
    whole = BiLoRACallback(seed=0, project_init=True)
    trainer = _sft(tmp_path, tiny_model_dir, small_data, [whole], save_steps=2, name="run")
    trainer.train()
    resumed = BiLoRACallback(seed=0, project_init=True)
    again = _sft(tmp_path, tiny_model_dir, small_data, [resumed], save_steps=2, name="run")
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert _losses(again)[-2:] == _losses(trainer)[-2:]
    assert torch.equal(resumed.bank.aux.flat, whole.bank.aux.flat) and resumed.aux_norms == whole.aux_norms


def test_evaluation_runs_the_primary_alone(tmp_path, tiny_model_dir, tokenizer, small_data):
    callback = BiLoRACallback(seed=0)
    trainer = _sft(tmp_path, tiny_model_dir, small_data, [callback], max_steps=2, eval_strategy="steps",
                   eval_steps=2, per_device_eval_batch_size=4)
    trainer.train()  # evaluates at step 2, the auxiliary trained and hooked in
    (logged,) = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    batch = collate([trainer.eval_dataset[i] for i in range(4)], tokenizer.pad_token_id)
    batch.pop("logits_to_keep")
    model = trainer.model.train()
    with torch.no_grad():
        primary_only = float(model(**batch).loss)  # training has ended: the hooks are gone, plain PEFT again
        from bilora_dist.adapters import inject
        handles = inject(model.get_base_model(), callback.bank)
        callback.bank.aux_active = True
        with_aux = float(model(**batch).loss)
    for handle in handles:
        handle.remove()
    assert callback.aux_norms[-1] > 0 and logged == pytest.approx(primary_only, rel=1e-6) and with_aux != primary_only


@pytest.mark.parametrize("config, message", [
    (dict(use_dora=True), "DoRA (use_dora=True)"),
    (dict(lora_dropout=0.1), "lora_dropout=0.1"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
])
def test_a_peft_config_the_method_cannot_honour_is_one_line(tiny_model_dir, config, message):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **config))
    with pytest.raises(UserError) as raised:
        BiLoRACallback().on_init_end(type("Args", (), {"learning_rate": 1e-3})(), None, None, model=model)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_model_without_a_lora_adapter_is_one_line(tiny_model_dir):
    with pytest.raises(UserError, match="Bi-LoRA needs a PEFT LoRA model: pass peft_config=LoraConfig"):
        BiLoRACallback().on_init_end(None, None, None, model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def test_an_unsupported_transformers_is_one_line(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(UserError, match=r"^BiLoRACallback needs transformers >= 5.25, found 4.57.1$"):
        BiLoRACallback()


DS_CONFIGS = {"zero2": {"zero_optimization": {"stage": 2}}, "zero3": {"zero_optimization": {"stage": 3}}}


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_two_ranks_under_accelerate_equal_bilora_dist_train(tmp_path, tiny_model_dir, small_data, engine):
    """torchrun + SFTTrainer (DDP, or DeepSpeed ZeRO-2/3 from the trainer's `deepspeed=` config, as `accelerate
    launch` with a ds_config gives it) on 2 ranks equals `bilora-dist train` on the same global batch."""
    ref_rows, ref_adapter = _reference(tmp_path, tiny_model_dir, small_data, "bilora", accum=2 * ACCUM)
    out = tmp_path / engine
    ds = [] if engine == "ddp" else [json.dumps({**DS_CONFIGS[engine], "train_micro_batch_size_per_gpu": "auto",
                                                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                                 "bf16": {"enabled": False}})]
    run_ok(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "tests/integrations/trainer_worker.py", str(tiny_model_dir), str(small_data[0]), str(out), str(STEPS),
            str(MBS), str(ACCUM), *ds], env=run_env())
    run = json.loads((out / "losses.json").read_text())
    assert run["world_size"] == 2 and run["engine"] == ("ddp" if engine == "ddp" else "deepspeed")
    assert run["zero_stage"] == (None if engine == "ddp" else int(engine[-1]))
    assert run["loss"] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5, abs=1e-7)
    assert run["aux_norm"] == pytest.approx([r["aux_norm"] for r in ref_rows], rel=1e-5)
    assert (out / "aux_digest_0").read_text() == (out / "aux_digest_1").read_text()  # replicated, bit for bit
    saved = load_file(out / "saved" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(ref_adapter)
    for key, want in ref_adapter.items():
        assert float((saved[key] - want).norm() / want.norm().clamp_min(1e-30)) <= 1e-5, key


def test_squeeze_callback_equals_bilora_dist_squeeze_of_the_saved_adapter(tmp_path, tiny_model_dir, small_data):
    """`post`: the callback's compact adapter equals `bilora-dist squeeze --adapter` of the trainer's saved one,
    tensor for tensor, and PEFT loads it at the new rank."""
    import sys

    from peft import PeftConfig, PeftModel

    from bilora_dist.integrations import SqueezeCallback

    squeeze = SqueezeCallback(rank=4)
    trainer = _sft(tmp_path, tiny_model_dir, small_data, [BiLoRACallback(seed=0), squeeze], max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    run_ok([sys.executable, "-m", "bilora_dist", "squeeze", "--adapter", str(tmp_path / "saved"), "--rank", "4",
            "--out", str(tmp_path / "cli")])
    ours = load_file(squeeze.written / "adapter_model.safetensors")
    cli = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(cli) and all(torch.equal(ours[k], cli[k]) for k in cli)
    assert PeftConfig.from_pretrained(str(squeeze.written)).r == 4
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(squeeze.written))
