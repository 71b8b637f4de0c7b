"""Bi-LoRA's auxiliary: the diagnostics against a quadratic toy whose gradient and gains are known in closed form,
the refresh onto the ideal rank-r2 perturbation, normalised ascent, the auxiliary's lr, and the flags in a run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bilora_dist.adapters import build_bank
from bilora_dist.adapters.bank import LayerShape
from bilora_dist.adapters.layer import LowRankUpdate
from bilora_dist.training.aux_ascent import AuxVariant, diagnostics, reachable_spectra, refresh
from bilora_dist.cli import run_cli, train_main
from bilora_dist.config.train import parse_config
from bilora_dist.engines.base import Engine
from bilora_dist.training.gradient_sketch import GradientSketch
from bilora_dist.training.loop import build_scheduler
from bilora_dist.training.methods import METHOD_STEPS, build_optimizer
from tests_support import random_adapted_model, step_rows, tiny_llama_config

M, N, T, RHO = 12, 10, 5, 0.3


class Toy:
    """L(W) = ½ Σ_t ||W_eff x_t - y_t||², W_eff = W + s1 B1 A1 + s2 B2 A2, one linear layer with a Bi-LoRA bank:
    G = Rᵀ X with R the residuals, and L(W+E) - L(W) = <G_W, E> + ½ ||X Eᵀ||² exactly."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(N, M, bias=False).requires_grad_(False)
        self.bank = build_bank([LayerShape("linear", N, M)], 3, 6.0, 2, 1.0, 0)
        with torch.no_grad():
            for branch in self.bank.branches():
                branch.flat.copy_(torch.randn(branch.flat.shape, generator=generator) * 0.3)
        self.update = LowRankUpdate(self.bank, 0)
        self.linear.register_forward_hook(self.update)
        self.x, self.y = torch.randn(T, N, generator=generator), torch.randn(T, M, generator=generator)

    def loss(self) -> torch.Tensor:
        self.bank.begin_pass()
        self.update.refresh()
        return 0.5 * (self.linear(self.x) - self.y).square().sum()

    def dense(self, aux: bool) -> torch.Tensor:
        """The effective weight, with or without E."""
        with torch.no_grad():
            A, B = self.bank.primary.factors(0)
            W = self.linear.weight + self.bank.primary.scales[0] * B @ A
            return W + self.E() if aux else W

    def E(self) -> torch.Tensor:
        A2, B2 = self.bank.aux.factors(0)
        return (self.bank.aux.scales[0] * B2 @ A2).detach()

    def sketched_backward(self) -> tuple[float, GradientSketch]:
        sketch = self.bank.sketch = GradientSketch({0: (M, N)}, 2, seed=4, device=torch.device("cpu"))
        loss = self.loss()
        loss.backward()
        loss = loss.detach()
        self.bank.sketch = None
        return loss.item(), sketch


def _top(G: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(G)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_diagnostics_match_the_closed_form_of_a_quadratic():
    toy = Toy()
    perturbed, sketch = toy.sketched_backward()
    with toy.bank.primary_only():
        clean = toy.loss().item()
    G = (toy.x @ toy.dense(True).T - toy.y).T @ toy.x  # at W + E, where the step's backward is
    E, G_r = toy.E(), _top(G, 2)
    best = float(E.norm() * G_r.norm())
    got = diagnostics(toy.bank, reachable_spectra(toy.bank, sketch, Engine()), perturbed, clean)
    assert got["aux_alignment"] == pytest.approx(float((E * G).sum()) / best, rel=1e-4)
    G_clean = (toy.x @ toy.dense(False).T - toy.y).T @ toy.x
    gain = float((G_clean * E).sum() + 0.5 * (toy.x @ E.T).square().sum())
    assert got["aux_gain"] == pytest.approx(gain, rel=1e-4)
    assert got["aux_gain_ratio"] == pytest.approx(gain / best, rel=1e-4)
    assert got["aux_best_gain"] == pytest.approx(best, rel=1e-4)


def test_refresh_sets_the_ideal_rank_r2_perturbation_of_radius_rho():
    toy = Toy()
    _, sketch = toy.sketched_backward()
    G = (toy.x @ toy.dense(True).T - toy.y).T @ toy.x
    optimizer = build_optimizer(toy.bank, 1e-2, 0.0)
    optimizer.step()
    assert toy.bank.aux.flat in optimizer.state
    assert refresh(toy.bank, reachable_spectra(toy.bank, sketch, Engine()), RHO, optimizer, Engine()) == RHO
    G_r = _top(G, 2)
    torch.testing.assert_close(toy.E(), RHO * G_r / G_r.norm(), rtol=0, atol=1e-5)
    assert toy.bank.aux.flat not in optimizer.state  # its moments described the old factors


def _bilora_step(variant: AuxVariant, lr: float = 1e-2):
    model, bank = random_adapted_model(tiny_llama_config(64))
    model.train()
    optimizer = build_optimizer(bank, lr, 0.0)
    step = METHOD_STEPS["bilora"](model, bank, optimizer, Engine(), 1.0, 0.05, variant)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": None, "position_ids": torch.arange(12).expand(2, 12),
             "labels": ids, "logits_to_keep": 12}
    return bank, optimizer, step, batch


def test_normalized_ascent_moves_the_auxiliary_by_lr_along_its_gradient_then_projects():
    bank, optimizer, step, batch = _bilora_step(AuxVariant(normalized=True))
    before = bank.aux.flat.detach().clone()
    step([batch])
    after = bank.aux.flat.detach().clone()
    grad = bank.aux.flat.grad
    with torch.no_grad():
        bank.aux.flat.copy_(before + 1e-2 * grad / grad.norm())
        radius = float(bank.aux.delta_sq_norms().sum().sqrt())
        bank.project_aux(0.05)
    assert radius > 0.05  # the projection acted
    torch.testing.assert_close(after, bank.aux.flat.detach(), rtol=1e-6, atol=1e-8)
    assert bank.aux.flat not in optimizer.state and bank.primary.flat in optimizer.state


def test_a_diagnostics_step_logs_and_trains_like_a_plain_one():
    plain_bank, _, plain, batch = _bilora_step(AuxVariant())
    bank, _, diagnosed, _ = _bilora_step(AuxVariant(diagnostics_every=2))
    want = plain([batch], 0)
    got = diagnosed([batch], 0)
    assert want.diagnostics is None and set(got.diagnostics) == {"aux_alignment", "aux_gain", "aux_gain_ratio",
                                                                 "aux_best_gain"}
    assert -1.0 <= got.diagnostics["aux_alignment"] <= 1.0
    torch.testing.assert_close(bank.primary.flat, plain_bank.primary.flat, rtol=0, atol=0)
    torch.testing.assert_close(bank.aux.flat, plain_bank.aux.flat, rtol=0, atol=0)
    assert diagnosed([batch], 1).diagnostics is None  # not due at step 1


def test_the_auxiliary_lr_scales_and_can_stay_constant():
    cfg = parse_config(["--method", "bilora", "--lr", "1e-3", "--aux-lr-scale", "4", "--aux-schedule", "constant",
                        "--warmup-steps", "2"])
    model, bank = random_adapted_model(tiny_llama_config(64))
    optimizer = build_optimizer(bank, cfg.lr, 0.0, aux_lr_scale=cfg.aux_lr_scale)
    scheduler = build_scheduler(cfg, optimizer, 10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    assert lrs[1] == pytest.approx([0.5e-3, 2e-3])  # the same warmup
    assert lrs[9][0] < 1e-4 and lrs[9][1] == pytest.approx(4e-3)  # the primary decays, the auxiliary does not


def test_aux_flags_are_refused_without_an_auxiliary(capsys):
    assert run_cli(train_main, ["--method", "lora", "--aux-refresh", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--aux-refresh sets Bi-LoRA's auxiliary; --method lora has none")


def test_a_run_logs_diagnostics_and_refreshes_onto_rho(tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--data", str(small_data[0]), "--eval-data", str(small_data[1]),
            "--method", "bilora", "--rho", "0.05", "--max-steps", "4", "--micro-batch-size", "4", "--seq-len", "64",
            "--eval-on-start", "false", "--aux-diagnostics-every", "2", "--aux-refresh", "2", "--output-dir", str(out)]
    assert run_cli(train_main, args) == 0
    rows = step_rows(out)
    assert [("aux_alignment" in r) for r in rows] == [True, False, True, False]
    assert rows[0]["aux_alignment"] is None and rows[0]["aux_gain"] == 0.0  # E = 0 at the start (B2 = 0)
    assert 0 < rows[2]["aux_alignment"] <= 1 and rows[2]["aux_gain"] > 0  # E from the refresh at step 1 ascends
    assert [r["aux_norm"] == pytest.approx(0.05) for r in rows] == [True] * 4  # refreshed onto rho, then projected
