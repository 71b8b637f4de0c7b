"""The package's shape: short functions, an acyclic import graph, a recipe of named stages, rank changes
that re-bind the gradient bucket by construction, and methods that plug in through one registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.config.train import TrainConfig
from bilora_dist.data import collate, tokenize
from bilora_dist.engines.base import Engine
from bilora_dist.training.methods import METHOD_STEPS, BiLoRAStep, LoRAStep, StepStats, build_optimizer, register_method
from bilora_dist.model.loading import load_frozen_model
from bilora_dist.squeeze.schedule import apply_rank_change

PACKAGE = Path(__file__).resolve().parents[1] / "bilora_dist"


def _functions() -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {f"{path.relative_to(PACKAGE.parent)}::{node.name}@{node.lineno}": node
            for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_no_function_in_the_package_exceeds_60_lines():
    functions = _functions()
    assert len(functions) > 100  # the walk sees the whole package
    too_long = {name: node.end_lineno - node.lineno + 1 for name, node in functions.items()
                if node.end_lineno - node.lineno + 1 > 60}
    assert not too_long


def test_the_recipe_fits_on_one_screen():
    (train,) = [node for name, node in _functions().items() if name.startswith("bilora_dist/recipe/train.py::_train@")]
    assert train.end_lineno - train.lineno + 1 <= 40


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports, at any depth (imports inside functions and TYPE_CHECKING too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges.add(node.module)
                edges |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_import_graph_is_acyclic():
    graph = _import_graph()
    assert "bilora_dist.config.train" in graph["bilora_dist.cli"] and "bilora_dist.recipe.train" in graph["bilora_dist.cli"]
    assert _cycle({"a": {"b"}, "b": {"a"}}) is not None  # the check sees a cycle when there is one
    assert _cycle(graph) is None
    # configuration never reaches up to the command line or down to the recipe
    assert not graph["bilora_dist.config.train"] & {"bilora_dist.cli", "bilora_dist.recipe.train", "bilora_dist.training.loop"}



def test_the_top_level_holds_only_the_command_and_shared_helpers():
    """Every stage with more than one module is a folder: config, model, adapters, engines, data, training,
    squeeze, checkpoint, memory, export, probe, recipe, and the trainer integrations."""
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py", "errors.py",
                                                            "files.py"]
    folders = {p.parent.name for p in PACKAGE.glob("*/*.py") if p.parent.name != "assets"}
    assert folders == {"adapters", "checkpoint", "config", "data", "engines", "export", "integrations", "memory",
                       "model", "probe", "recipe", "squeeze", "training"}
    assert all(len([f for f in (PACKAGE / d).glob("*.py") if f.name != "__init__.py"]) > 1 for d in folders)


def test_the_probe_runs_the_public_stages_not_the_training_recipe():
    graph = _import_graph()
    reached = graph["bilora_dist.probe.cli"] | graph["bilora_dist.probe.sharpness"]
    assert "bilora_dist.recipe.stages" in reached and "bilora_dist.recipe.train" not in reached
    assert "bilora_dist.recipe.train" not in graph["bilora_dist.recipe.stages"]

# --- rank changes, per-pass state, ascent and registration on a tiny model ---


def _setup(model_dir, method: str):
    model = load_frozen_model(str(model_dir))
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0,
                      4 if method == "bilora" else None, 1.0, seed=0)
    with torch.no_grad():  # every factor non-zero
        g = torch.Generator().manual_seed(7)
        for branch in bank.branches():
            branch.flat.copy_(torch.randn(branch.flat.shape, generator=g) * 0.1)
    inject(model, bank)
    return model, bank


@pytest.fixture
def batches(tokenizer, train_records):
    examples = [tokenize(r, tokenizer, 64) for r in train_records[:8]]
    return [collate(examples[i * 4:(i + 1) * 4], tokenizer.pad_token_id) for i in range(2)]


def _squeeze_then_step(model_dir, batches, rebind_by_hand: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model, bank = _setup(model_dir, "lora")
    optimizer = build_optimizer(bank, 1e-2, 0.0)
    step = LoRAStep(model, bank, optimizer, Engine(), 1.0)
    step(batches)
    apply_rank_change(bank, 2, optimizer, Engine(), "project")
    if rebind_by_hand:  # what the loop had to do before the bank re-bound on its own
        bank.bind_grad_bucket()
    before = bank.primary.flat.detach().clone()
    step(batches)
    return before, bank.primary.flat.detach()


def test_a_squeeze_rebinds_the_gradient_bucket_without_any_call(tiny_model_dir, batches):
    before, after = _squeeze_then_step(tiny_model_dir, batches, rebind_by_hand=False)
    _, want = _squeeze_then_step(tiny_model_dir, batches, rebind_by_hand=True)
    assert not torch.equal(after, before)  # the gradient reached the new branch
    assert torch.equal(after, want)


def test_pass_factors_are_dropped_after_each_forward(tiny_model_dir, batches):
    model, bank = _setup(tiny_model_dir, "lora")
    model(input_ids=batches[0]["input_ids"])
    assert bank._pass_factors is None
    optimizer = build_optimizer(bank, 1e-2, 0.0)
    apply_rank_change(bank, 2, optimizer, Engine(), "reset")
    x = torch.randn(3, bank.shapes[0].in_features)
    A, B = bank.primary.factors(0)  # a layer called outside a root forward sees the squeezed branch
    torch.testing.assert_close(bank.delta(0, x), bank.primary.scales[0] * x @ A.T @ B.T, rtol=0, atol=0)


class _NegatedAscent(BiLoRAStep):
    """Bi-LoRA's ascent as it was written before `maximize`: the auxiliary gradient negated by hand."""

    def __call__(self, micro_batches):
        loss, tokens = self.forward_backward(micro_batches)
        norm = self.clip_primary()
        self.bank.aux.flat.grad.neg_()
        self.optimizer.step()
        return StepStats(loss, tokens, norm, aux_norm=min(self.bank.project_aux(self.rho), self.rho))


def test_ascent_by_maximize_is_bit_identical_to_a_negated_gradient(tiny_model_dir, batches):
    trained = []
    for step_class, maximize in ((BiLoRAStep, True), (_NegatedAscent, False)):
        model, bank = _setup(tiny_model_dir, "bilora")
        optimizer = build_optimizer(bank, 1e-2, 0.1)
        assert optimizer.param_groups[1]["maximize"]
        optimizer.param_groups[1]["maximize"] = maximize
        step = step_class(model, bank, optimizer, Engine(), 1.0, 0.05)
        for _ in range(3):
            step(batches)
        trained.append((bank.primary.flat.detach(), bank.aux.flat.detach()))
    (primary, aux), (ref_primary, ref_aux) = trained
    assert torch.equal(aux, ref_aux) and torch.equal(primary, ref_primary)


class _LoRAPlusStep(LoRAStep):
    """Toy LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A. AdamW's update (decay included)
    is proportional to the learning rate, so scaling B's update after the step is lr_B = ratio * lr."""

    ratio = 16.0

    def __call__(self, micro_batches):
        flat = self.bank.primary.flat
        before = flat.detach().clone()
        stats = super().__call__(micro_batches)
        with torch.no_grad():
            for i in range(len(self.bank.shapes)):
                start, r, shape = self.bank.primary.offsets[i], self.bank.primary.ranks[i], self.bank.shapes[i]
                b = slice(start + r * shape.in_features, start + r * (shape.in_features + shape.out_features))
                flat[b] = before[b] + self.ratio * (flat[b] - before[b])
        return stats


def _updates(model_dir, batches, method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|change| of every A entry and every B entry after `steps` steps of `method`, from the same start."""
    model, bank = _setup(model_dir, "lora")
    start = [(A.detach().clone(), B.detach().clone()) for A, B in bank.primary.all_factors()]
    step = METHOD_STEPS[method].from_config(model, bank, build_optimizer(bank, 1e-3, 0.0), Engine(),
                                            TrainConfig(method="lora", max_grad_norm=0.0).resolved())
    for _ in range(steps):
        step(batches)
    moved = [((A.detach() - A0).abs(), (B.detach() - B0).abs())
             for (A, B), (A0, B0) in zip(bank.primary.all_factors(), start)]
    return torch.cat([a.flatten() for a, _ in moved]), torch.cat([b.flatten() for _, b in moved])


def test_a_new_method_plugs_in_through_the_registry(tiny_model_dir, batches):
    register_method("lora-plus", _LoRAPlusStep)
    try:
        plus_A, plus_B = _updates(tiny_model_dir, batches, "lora-plus", steps=1)
        plus3_A, plus3_B = _updates(tiny_model_dir, batches, "lora-plus", steps=3)
    finally:
        METHOD_STEPS.pop("lora-plus")
    lora_A, lora_B = _updates(tiny_model_dir, batches, "lora", steps=1)
    assert torch.equal(plus_A, lora_A)  # the first step: A learns as in LoRA, B's Adam step is 16x larger
    torch.testing.assert_close(plus_B, 16.0 * lora_B, rtol=1e-5, atol=1e-9)
    lora3_A, lora3_B = _updates(tiny_model_dir, batches, "lora", steps=3)
    assert float(plus3_B.norm()) > 8 * float(lora3_B.norm()) > 0  # over a few steps B still moves far more
