"""DeepSpeed configs as LLaMA-Factory, axolotl and the transformers docs ship them (tests/fixtures/ds_configs,
verbatim): read, "auto" resolved, mapped onto the trainer, refused with one line where they cannot be
honoured, and each run for 2 steps under `deepspeed --num_gpus 2`."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR, WarmupLR
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from bilora_dist.config.train import TrainConfig, apply_ds_config, parse_config
from bilora_dist.config.ds_config import read_ds_config, resolve, unused_keys, unused_line
from bilora_dist.errors import UserError
from bilora_dist.training.loop import build_scheduler
from bilora_dist.training.methods import build_optimizer
from bilora_dist.recipe.train import dry_run
from tests_support import ROOT, fixture_bank, run_cmd, step_rows, two_ranks

DATA = ROOT / "tests" / "fixtures" / "ds_configs"
HIDDEN = 64
# what each fetched config sets: stage, offload_param (pin_memory) or None, bf16, max_live_parameters,
# max_reuse_distance (stage 3), and the schedule its scheduler block maps to (None: no block)
EXPECTED = {
    "llama_factory/ds_z0_config.json": (0, None, False, None, None, None),
    "llama_factory/ds_z2_config.json": (2, None, False, None, None, None),
    "llama_factory/ds_z2_offload_config.json": (2, None, False, None, None, None),
    "llama_factory/ds_z3_config.json": (3, None, False, 10**9, 10**9, None),
    "llama_factory/ds_z3_offload_config.json": (3, True, False, 10**9, 10**9, None),
    "axolotl/zero1.json": (1, None, False, None, None, None),
    "axolotl/zero2.json": (2, None, False, None, None, None),
    "axolotl/zero3.json": (3, None, False, 0, 0, None),
    "axolotl/zero3_bf16.json": (3, None, True, 0, 0, None),
    "axolotl/zero3_bf16_cpuoffload_all.json": (3, True, True, 0, 0, None),
    "axolotl/zero3_bf16_cpuoffload_params.json": (3, True, True, 0, 0, None),
    "transformers_docs/ds_config_zero2.json": (2, None, False, None, None, "constant"),
    "transformers_docs/ds_config_zero3.json": (3, True, False, 10**9, 10**9, "constant"),
}
HONOURED = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
            "bf16.enabled", "fp16.enabled", "optimizer", "scheduler", "zero_optimization.stage",
            "zero_optimization.offload_param", "zero_optimization.stage3_prefetch_bucket_size",
            "zero_optimization.stage3_param_persistence_threshold", "zero_optimization.stage3_max_live_parameters",
            "zero_optimization.stage3_max_reuse_distance", "zero_optimization.max_live_parameters",
            "zero_optimization.max_reuse_distance"}


def section_keys(ds: dict) -> list[str]:
    """Dotted keys down to the entries of bf16, fp16 and zero_optimization (optimizer/scheduler whole)."""
    keys = []
    for key, value in ds.items():
        nested = isinstance(value, dict) and key in ("bf16", "fp16", "zero_optimization")
        keys += [f"{key}.{k}" for k in value] if nested else [key]
    return keys


def has_auto(value) -> bool:
    if isinstance(value, dict):
        return any(has_auto(v) for v in value.values())
    return value == "auto" or (isinstance(value, list) and any(has_auto(v) for v in value))


def write(tmp_path: Path, ds: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


def test_every_fetched_config_is_stored():
    assert sorted(str(p.relative_to(DATA)) for p in DATA.glob("*/*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fetched_config_reads_resolves_and_maps(name):
    stage, pin, bf16, live, reuse, schedule = EXPECTED[name]
    ds = read_ds_config(str(DATA / name))
    cfg = apply_ds_config(TrainConfig(), ds, name, {})
    assert (cfg.bf16 == "true", cfg.micro_batch_size, cfg.grad_accum, cfg.max_grad_norm, cfg.lr) == (bf16, 8, 1, 1.0, 5e-4)
    assert (cfg.scheduler, cfg.warmup_type) == ((schedule, "log") if schedule else ("cosine", "linear"))
    resolved = resolve(ds, cfg.bf16 == "true", HIDDEN)
    assert not has_auto(resolved)
    zero = resolved["zero_optimization"]
    assert zero["stage"] == stage and resolved["bf16"] == {"enabled": bf16}
    assert zero.get("offload_param") == ({"device": "cpu", "pin_memory": pin} if pin is not None else None)
    if stage == 3:  # transformers' rules: 0.9 * hidden^2 and 10 * hidden
        assert (zero["prefetch_bucket_size"], zero["param_persistence_threshold"]) == (3686, 640)
        assert (zero["max_live_parameters"], zero["max_reuse_distance"]) == (live, reuse)
        parsed = DeepSpeedZeroConfig(**zero)  # DeepSpeed reads what it receives as we mean it
        assert (parsed.prefetch_bucket_size, parsed.param_persistence_threshold, parsed.max_live_parameters) == (
            3686, 640, live)
    # every key is honoured or named, once, in the one info line
    unused = unused_keys(ds)
    assert len(unused) == len(set(unused))
    assert sorted(unused + [k for k in section_keys(ds) if k in HONOURED]) == sorted(section_keys(ds))
    assert unused_line(ds).endswith(": " + ", ".join(unused)) and "\n" not in unused_line(ds)


def test_info_line_names_the_unused_keys_of_the_llama_factory_zero3_offload_config():
    ds = read_ds_config(str(DATA / "llama_factory/ds_z3_offload_config.json"))
    assert set(unused_keys(ds)) == {
        "zero_allow_untested_optimizer", "zero_optimization.offload_optimizer", "zero_optimization.overlap_comm",
        "zero_optimization.contiguous_gradients", "zero_optimization.sub_group_size",
        "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_gather_16bit_weights_on_model_save",
        "fp16.loss_scale", "fp16.loss_scale_window", "fp16.initial_scale_power", "fp16.hysteresis",
        "fp16.min_loss_scale"}


@pytest.mark.parametrize("ds, message", [
    ({"gradient_acumulation_steps": 2}, "unknown key 'gradient_acumulation_steps' (did you mean "
                                        "'gradient_accumulation_steps'?)"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 10}},
     "zero_optimization: unknown key 'stage3_prefetch_bucket_sise' (did you mean 'stage3_prefetch_bucket_size'?)"),
    ({"zero_optimization": {"stage": 3, "max_live_parameter": 10}},
     "zero_optimization: unknown key 'max_live_parameter' (did you mean 'max_live_parameters'?)"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memroy": True}}},
     "zero_optimization.offload_param: unknown key 'pin_memroy' (did you mean 'pin_memory'?)"),
    ({"bf16": {"enable": True}}, "bf16: unknown key 'enable' (did you mean 'enabled'?)"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 5}}},
     "scheduler.params: unknown key 'warmup_num_step' (did you mean 'warmup_num_steps'?)"),
])
def test_misspelt_key_names_the_nearest_valid_one(tmp_path, ds, message):
    with pytest.raises(UserError) as err:
        read_ds_config(write(tmp_path, ds))
    assert str(err.value).endswith(message)


@pytest.mark.parametrize("ds, message", [
    ({"fp16": {"enabled": True}}, "fp16.enabled true cannot be honoured: fp16 is not supported, use bf16"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}},
     "zero_optimization.offload_param.device 'nvme' cannot be honoured"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}},
     "'zero_optimization.zero_quantized_weights' cannot be honoured by bilora_dist"),
    ({"activation_checkpointing": {}}, "'activation_checkpointing' cannot be honoured by bilora_dist (use "
                                       "--gradient-checkpointing)"),
    ({"optimizer": {"type": "OneBitAdam", "params": {}}}, "optimizer.type 'OneBitAdam' cannot be honoured"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type 'Lamb' cannot be honoured"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}},
     "optimizer.params.adam_w_mode false cannot be honoured"),
    ({"scheduler": {"type": "OneCycle", "params": {}}}, "scheduler.type 'OneCycle' cannot be honoured"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "exp"}}},
     "scheduler.params.warmup_type 'exp' cannot be honoured"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-5}}},
     "scheduler.params.warmup_min_lr 1e-05 cannot be honoured"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {}}},
     "scheduler.params.cos_min_ratio 0.0001 (DeepSpeed default) cannot be honoured"),
])
def test_what_cannot_be_honoured_is_refused_in_one_line(tmp_path, ds, message):
    with pytest.raises(UserError) as err:
        read_ds_config(write(tmp_path, ds))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_explicit_flag_that_differs_from_the_ds_value_is_an_error(tmp_path):
    """Before: the ds value silently replaced an explicit --micro-batch-size."""
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}})
    with pytest.raises(UserError) as err:
        parse_config(["--micro-batch-size", "4", "--ds_config", path])
    assert str(err.value) == f"--micro-batch-size 4 disagrees with --ds_config {path} train_micro_batch_size_per_gpu 8"
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text("micro_batch_size: 4\n")
    with pytest.raises(UserError, match=r"--config .*run.yaml micro_batch_size 4 disagrees with"):
        parse_config(["--config", str(yaml_cfg), "--ds_config", path])
    assert parse_config(["--ds_config", path]).micro_batch_size == 8  # over the default, the ds value wins
    assert parse_config(["--micro-batch-size", "8", "--ds_config", path]).micro_batch_size == 8
    bf16 = write(tmp_path, {"bf16": {"enabled": False}})
    with pytest.raises(UserError, match="--bf16 true disagrees with .* bf16.enabled false"):
        parse_config(["--bf16", "--ds_config", bf16])


def test_optimizer_and_scheduler_blocks_set_the_trainer(tmp_path):
    """The transformers docs' manually-set values (3e-5, betas 0.8/0.999, ...) become our AdamW and schedule."""
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.8, 0.999], "eps": 1e-7,
                                                    "weight_decay": 3e-7}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-5,
                                                            "warmup_num_steps": 50, "total_num_steps": 200,
                                                            "warmup_type": "linear"}}}
    cfg = parse_config(["--ds_config", write(tmp_path, ds)])
    assert (cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay) == (3e-5, 0.8, 0.999, 1e-7, 3e-7)
    assert (cfg.scheduler, cfg.warmup_steps, cfg.max_steps, cfg.warmup_type) == ("linear", 50, 200, "linear")
    group = build_optimizer(fixture_bank(), cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                            cfg.adam_epsilon).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-5, (0.8, 0.999), 1e-7, 3e-7)


def test_optimizer_and_scheduler_values_must_agree(tmp_path):
    lr_twice = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-5}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-4}}}
    with pytest.raises(UserError, match=r"optimizer.params.lr 3e-05 disagrees with scheduler.params.warmup_max_lr"):
        parse_config(["--ds_config", write(tmp_path, lr_twice)])
    with pytest.raises(UserError, match=r"^--lr 0.0001 disagrees with .* optimizer.params.lr 3e-05$"):
        parse_config(["--lr", "1e-4", "--ds_config", write(tmp_path, {"optimizer": {"type": "Adam",
                                                                                    "params": {"lr": 3e-5}}})])
    steps = {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100}}}
    with pytest.raises(UserError, match=r"^--epochs 2.0 conflicts with .*\.total_num_steps 100; give one of them$"):
        parse_config(["--epochs", "2", "--ds_config", write(tmp_path, steps)])
    with pytest.raises(UserError, match=r"--warmup-type linear disagrees with .*\.warmup_type \(DeepSpeed default\) log$"):
        parse_config(["--warmup-type", "linear", "--ds_config", write(tmp_path, {"scheduler": {"type": "WarmupLR"}})])


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
@pytest.mark.parametrize("schedule, reference", [("constant", WarmupLR), ("linear", WarmupDecayLR)])
def test_schedule_follows_deepspeeds_warmup_curves(schedule, reference, warmup_type):
    """Our schedule at step k equals DeepSpeed's scheduler at iteration k (min lr 0, warmup 10 of 40 steps)."""
    cfg = TrainConfig(scheduler=schedule, warmup_steps=10, warmup_type=warmup_type, lr=1e-3)
    ours = build_scheduler(cfg, build_optimizer(fixture_bank(), 1e-3, 0.0), 40)  # two groups: primary, auxiliary
    extra = {"total_num_steps": 40} if reference is WarmupDecayLR else {}
    theirs = reference(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), warmup_min_lr=0,
                       warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type=warmup_type, **extra)
    for step in range(40):
        theirs.step(step)
        for lr in ours.get_last_lr():
            assert math.isclose(lr, theirs.get_last_lr()[0], rel_tol=1e-12, abs_tol=1e-15), step
        ours.step()


def test_dry_run_resolves_nested_auto(tmp_path, tiny_model_dir):
    """Before: stage3_param_persistence_threshold "auto" reached the memory plan as the string "auto"."""
    def plan(threshold) -> str:
        path = write(tmp_path, {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold}})
        return dry_run(parse_config(["--dry-run", "--plan-ranks", "2", "--model", str(tiny_model_dir),
                                     "--ds_config", path]))

    assert plan("auto") == plan(10 * 32)  # the tiny model's hidden size is 32


@pytest.mark.slow
def test_fetched_zero_configs_run_two_steps_under_deepspeed(tmp_path, tiny_model_dir, module_data):
    """Each config, verbatim, trains 2 steps on 2 ranks; the unused keys are named once, by rank 0.
    Two launches at a time: most of a launch is process start-up, which leaves the cores half idle."""
    def launch(name: str) -> str | None:
        out = tmp_path / name.replace("/", "_")
        proc = run_cmd(two_ranks("deepspeed") + [
            "launch/train.py", "--ds_config", str(DATA / name), "--model", str(tiny_model_dir), "--data",
            str(module_data[0]), "--eval-data", str(module_data[1]), "--max-steps", "2", "--micro-batch-size", "2",
            "--seq-len", "64", "--eval-batch-size", "16", "--output-dir", str(out)])
        steps = [r["step"] for r in step_rows(out)] if proc.returncode == 0 else []
        if steps == [1, 2] and proc.stdout.count("ds_config: not used") == 1:
            return None
        return f"{name}: rc {proc.returncode}, step rows {steps}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(launch, sorted(EXPECTED)) if f]
    assert not failures, "\n".join(failures)
