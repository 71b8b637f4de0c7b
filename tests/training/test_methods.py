"""Method steps against hand-written references of specs/bilora.md, and pass counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.data import IGNORE, collate, tokenize
from bilora_dist.engines.base import Engine
from bilora_dist.training.methods import METHOD_STEPS, build_optimizer
from bilora_dist.model.loading import LoadOptions, load_frozen_model

LR, WD, CLIP, S2 = 1e-2, 0.1, 0.05, 1.0
# Adam's g/(|g| + eps) has slope 1/(4 eps) at |g| = eps: with eps = 1e-8, gradients of order 1e-9 turn
# float32 rounding inside HF's RMSNorm into 1e-4 update noise. A larger eps keeps the comparison well-posed.
BETAS, EPS = (0.9, 0.999), 1e-3


def _batches(tokenizer, records, n_micro=2, size=4):
    examples = [tokenize(r, tokenizer, 64) for r in records[:n_micro * size]]
    return [collate(examples[i * size:(i + 1) * size], tokenizer.pad_token_id) for i in range(n_micro)]


def _optimizer(bank, lr, wd):
    optimizer = build_optimizer(bank, lr, wd)
    for group in optimizer.param_groups:
        group["eps"] = EPS
    return optimizer


@pytest.fixture
def float64():
    """Compare algorithms, not rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _setup(model_dir, method, aux_rank=4):
    model = load_frozen_model(str(model_dir), LoadOptions(torch.get_default_dtype()))
    shapes = layer_shapes(model, select_targets(model, "all-linear"))
    bank = build_bank(shapes, 4, 8.0, aux_rank if method == "bilora" else None, S2, seed=0)
    with torch.no_grad():  # a generic state: every factor non-zero
        g = torch.Generator().manual_seed(7)
        for branch in bank.branches():
            branch.flat.copy_(torch.randn(branch.flat.shape, generator=g) * 0.1)
    inject(model, bank)
    return model, bank


def _reference_loss(model, params, bank, batches):
    """Mean token CE with every adapted weight replaced by the dense W0 + s1 B1 A1 + s2 B2 A2."""
    weights = {}
    for i, shape in enumerate(bank.shapes):
        w = dict(model.named_parameters())[f"{shape.name}.weight"]
        A1, B1, A2, B2 = params[i]
        w = w + bank.primary.scales[i] * B1 @ A1
        if A2 is not None:
            w = w + S2 * B2 @ A2
        weights[f"{shape.name}.weight"] = w
    total, count = 0.0, 0
    for b in batches:
        logits = functional_call(model, weights, (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                                                     "position_ids": b["position_ids"]}).logits
        targets = b["labels"][:, 1:]
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                        reduction="sum")
        count += int((targets != IGNORE).sum())
    return total / count


def _adamw(p, g, state, step, wd):
    m, v = state
    m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
    v.mul_(BETAS[1]).add_(g * g, alpha=1 - BETAS[1])
    mhat, vhat = m / (1 - BETAS[0] ** step), v / (1 - BETAS[1] ** step)
    return p * (1 - LR * wd) - LR * mhat / (vhat.sqrt() + EPS)


def test_bilora_two_steps_match_hand_written_reference(float64, tiny_model_dir, tokenizer, train_records):
    model, bank = _setup(tiny_model_dir, "bilora")
    batches = _batches(tokenizer, train_records)
    n = len(bank.shapes)
    params = [tuple(t.detach().clone() for t in (*bank.primary.factors(i), *bank.aux.factors(i))) for i in range(n)]
    c0 = math.sqrt(sum(float((S2 * B2 @ A2).square().sum()) for _, _, A2, B2 in params))
    rho = 0.5 * c0  # the projection is active
    step = METHOD_STEPS["bilora"](model, bank, _optimizer(bank, LR, WD), Engine(), CLIP, rho)
    state = [[(torch.zeros_like(t), torch.zeros_like(t)) for t in p] for p in params]
    for k in (1, 2):
        stats = step(batches)
        # --- reference of specs/bilora.md, dense and by hand ---
        leaves = [tuple(t.clone().requires_grad_(True) for t in p) for p in params]
        restore_hooks = _without_hooks(model)  # the reference adds the dense deltas itself
        loss = _reference_loss(model, leaves, bank, batches)
        restore_hooks()
        grads = torch.autograd.grad(loss, [t for p in leaves for t in p])
        grads = [grads[4 * i:4 * i + 4] for i in range(n)]
        primary_norm = math.sqrt(sum(float(g[0].square().sum() + g[1].square().sum()) for g in grads))
        coef = min(1.0, CLIP / (primary_norm + 1e-6))
        new = []
        for i in range(n):
            A1 = _adamw(params[i][0], grads[i][0] * coef, state[i][0], k, WD)
            B1 = _adamw(params[i][1], grads[i][1] * coef, state[i][1], k, WD)
            A2 = _adamw(params[i][2], -grads[i][2], state[i][2], k, 0.0)  # ascent, no decay, not clipped
            B2 = _adamw(params[i][3], -grads[i][3], state[i][3], k, 0.0)
            new.append([A1, B1, A2, B2])
        c = math.sqrt(sum(float((S2 * B2 @ A2).square().sum()) for _, _, A2, B2 in new))
        scale = math.sqrt(rho / c) if c > rho else 1.0
        params = [(A1, B1, A2 * scale, B2 * scale) for A1, B1, A2, B2 in new]
        # --- compare ---
        assert stats.loss == pytest.approx(loss.item(), rel=1e-6)
        assert stats.grad_norm == pytest.approx(primary_norm, rel=1e-5)
        assert c > rho, "projection must be exercised"
        for i in range(n):
            for got, want in zip((*bank.primary.factors(i), *bank.aux.factors(i)), params[i]):
                torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {k} layer {bank.shapes[i]} {got.shape}: {m}")
        aux_norm = math.sqrt(float(bank.aux.delta_sq_norms().sum()))
        assert aux_norm <= rho * (1 + 1e-6)
        assert stats.aux_norm == pytest.approx(aux_norm, rel=1e-5)


def _without_hooks(model):
    """Temporarily detach the adapter hooks; returns a function that re-attaches them."""
    saved = {name: dict(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}
    for name in saved:
        model.get_submodule(name)._forward_hooks.clear()

    def restore():
        for name, hooks in saved.items():
            model.get_submodule(name)._forward_hooks.update(hooks)
    return restore


@pytest.mark.parametrize("method,passes", [("lora", 1), ("bilora", 1), ("lora-sam", 2)])
def test_forward_backward_passes_per_step(tiny_model_dir, tokenizer, train_records, method, passes):
    model, bank = _setup(tiny_model_dir, method)
    batches = _batches(tokenizer, train_records, n_micro=3)
    forwards, backwards = [], []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    bank.primary.flat.register_post_accumulate_grad_hook(lambda _: backwards.append(1))
    step = METHOD_STEPS[method](model, bank, _optimizer(bank, LR, 0.0), Engine(), 1.0, *([] if method == "lora" else [0.05]))
    step(batches)
    assert len(forwards) == passes * len(batches)
    assert len(backwards) == passes * len(batches)


def test_sam_step_takes_gradient_at_perturbed_point(float64, tiny_model_dir, tokenizer, train_records):
    """LoRA-SAM's update equals an AdamW step with the gradient at theta + rho g/||g||."""
    model, bank = _setup(tiny_model_dir, "lora-sam")
    batches = _batches(tokenizer, train_records)
    rho = 0.05
    theta = bank.primary.flat.detach().clone()
    step = METHOD_STEPS["lora-sam"](model, bank, _optimizer(bank, LR, 0.0), Engine(), 0.0, rho)
    step(batches)
    ref_model, ref_bank = _setup(tiny_model_dir, "lora")
    ref_step = METHOD_STEPS["lora"](ref_model, ref_bank, _optimizer(ref_bank, LR, 0.0), Engine(), 0.0)
    ref_step.forward_backward(batches)
    g = ref_bank.primary.flat.grad.clone()
    with torch.no_grad():
        ref_bank.primary.flat.add_(rho * g / g.norm())
    ref_step.forward_backward(batches)
    g2 = ref_bank.primary.flat.grad.clone()
    m, v = (1 - BETAS[0]) * g2, (1 - BETAS[1]) * g2 * g2
    want = theta - LR * (m / (1 - BETAS[0])) / ((v / (1 - BETAS[1])).sqrt() + EPS)
    torch.testing.assert_close(bank.primary.flat.detach(), want, rtol=1e-6, atol=1e-7)


def _poisoned(calls: set[int], how: str):
    """token_loss_sum whose loss is NaN (`how` "loss") or finite with a NaN gradient ("gradient") on the given calls
    (0-based, counted over every micro-batch pass)."""
    from bilora_dist.training.loss import token_loss_sum
    count = iter(range(10**6))

    def poisoned(model, batch):
        loss, tokens = token_loss_sum(model, batch)
        if next(count) in calls:  # sqrt(0 * loss) is 0 with an infinite slope: a finite loss, a NaN gradient
            loss = loss * math.nan if how == "loss" else loss + torch.sqrt(0 * loss)
        return loss, tokens
    return poisoned


@pytest.mark.parametrize("method,poison_pass", [("lora", 0), ("bilora", 0), ("lora-sam", 0), ("lora-sam", 1)])
@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_a_non_finite_step_changes_nothing_and_the_next_step_is_as_if_it_never_came(
        tiny_model_dir, tokenizer, train_records, monkeypatch, method, poison_pass, how):
    passes = METHOD_STEPS[method].passes
    batches = [_batches(tokenizer, train_records[k * 8:], n_micro=2) for k in range(3)]

    def run(steps, calls=frozenset()):
        model, bank = _setup(tiny_model_dir, method)
        optimizer = _optimizer(bank, LR, WD)
        step = METHOD_STEPS[method](model, bank, optimizer, Engine(), CLIP, *([] if method == "lora" else [0.05]))
        monkeypatch.setattr("bilora_dist.training.methods.token_loss_sum", _poisoned(set(calls), how))
        stats = [step(batches[k]) for k in steps]
        state = {k: v.clone() for k, v in optimizer.state[bank.primary.flat].items()}
        return stats, [b.flat.detach().clone() for b in bank.branches()], state

    # step 2 of 3 poisoned on micro-batch 1 of the chosen pass
    stats, flats, moments = run([0, 1], {passes * 2 + poison_pass * 2 + 1})
    _, want_flats, want_moments = run([0])
    assert stats[1].skipped == f"non-finite {how}" + (" at the perturbed point" if poison_pass else "")
    assert stats[0].skipped is None and math.isnan(stats[1].grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(flats, want_flats))
    assert moments.keys() == want_moments.keys() and all(torch.equal(moments[k], want_moments[k]) for k in moments)
    _, flats, moments = run([0, 1, 2], {passes * 2 + poison_pass * 2 + 1})
    _, want_flats, want_moments = run([0, 2])
    assert all(torch.equal(a, b) for a, b in zip(flats, want_flats))
    assert all(torch.equal(moments[k], want_moments[k]) for k in moments)
