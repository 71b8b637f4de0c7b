"""Sharpness probe: how far the held-out loss of an adapted model rises under weight perturbations of radius ρ.

    bilora-dist probe --adapter DIR --data FILE [--model DIR] [--rho 0.01,0.05,0.1] [--out FILE.json]

For each ρ, relative to the unperturbed adapted model (loss = mean per-token loss on the supervised tokens,
exactly as the trainer's evaluation computes it):

- random: E_i dense in every adapted layer's weight space, direction Gaussian, sqrt(Σ_i ||E_i||_F²) = ρ; the
  mean and standard deviation over --draws directions (the same directions, rescaled, at every ρ);
- adversarial: the same ball, --adv-steps normalised gradient-ascent steps: E = ρ g/||g|| (SAM's step), then
  E ← P_ρ(E + ρ g/||g||), P_ρ the projection onto the ball; the loss at the final E;
- lora_adversarial: the change of the primary LoRA factors (dA, dB) whose weight change
  Σ_i ||s_i (B_i+dB_i)(A_i+dA_i) − s_i B_i A_i||² = ρ², by the same ascent on the factors: d = g/||g||, then
  d ← d + ||d|| g/||g||, each iterate rescaled onto the radius by bisection on the exact norm (a quartic in the
  step length, from r×r Gram products), not the first-order one.

E is never added to the base weights: every adapted layer gets a forward hook returning linear(x) + x E_iᵀ,
computed in fp32 (as the LoRA update is). The base is never written, so it is restored bit for bit by
construction, on every engine alike (ZeRO-3 and FSDP2 need no gathered weight to perturb), and a bf16 base
does not round away entries of E far below its resolution. The factors of (c) are put back from a copy of the
primary branch. Memory: three fp32 tensors the size of the adapted weights (E, the gradient at the adapted
model, and the gradient buffer), replicated on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bilora_dist.adapters.bank import AdapterBank, Branch, GradBucket, LayerShape
from bilora_dist.engines.base import Engine
from bilora_dist.training.evaluation import evaluate, held_out_batches
from bilora_dist.training.loss import token_loss_sum

DEFAULT_RHOS = "0.01,0.05,0.1"


class DenseDelta:
    """A dense perturbation E_i (out × in, fp32) of every adapted layer, all in one flat tensor `flat`, applied
    while `attached` as forward hooks: linear(x) + x E_iᵀ. Gradients w.r.t. `flat` flow through the hooks."""

    def __init__(self, shapes: list[LayerShape], device: torch.device):
        self.shapes = shapes
        self.sizes = [s.out_features * s.in_features for s in shapes]
        self.flat = torch.zeros(sum(self.sizes), device=device)
        self._views: list[Tensor] = []

    def refresh(self) -> None:
        """Split `flat` into the layers' views once for the coming forward pass (one backward node, not L)."""
        self._views = [v.view(s.out_features, s.in_features) for v, s in zip(self.flat.split(self.sizes), self.shapes)]

    def _hook(self, i: int):
        def add_delta(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return output + (args[0].to(torch.float32) @ self._views[i].T).to(output.dtype)
        return add_delta

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        self.refresh()
        handles = [model.get_submodule(s.name).register_forward_hook(self._hook(i)) for i, s in enumerate(self.shapes)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._views = []


@dataclass
class Probe:
    """The adapted model and the examples its loss is measured on."""

    model: nn.Module
    bank: AdapterBank
    examples: Any
    engine: Engine
    batch_size: int
    pad_id: int

    def __post_init__(self) -> None:
        self.delta = DenseDelta(self.bank.shapes, self.engine.device)

    def loss(self) -> float:
        """The trainer's evaluation loss of the model as it is now (hooks and factors included)."""
        return evaluate(self.model, self.bank, self.examples, None, self.engine, self.batch_size,
                        self.pad_id)["eval_loss"]

    def loss_and_grad(self, holder: Any) -> tuple[float, Tensor]:
        """(mean loss, its gradient w.r.t. `holder.flat`), summed over the ranks; `holder` is the primary branch
        or the dense delta, whichever the forward pass reads (the other gets no gradient)."""
        leaves = [self.bank.primary.flat, self.delta.flat]
        for leaf in leaves:
            leaf.requires_grad_(leaf is holder.flat)
        bucket = GradBucket([holder])
        was_training = self.model.training
        self.model.eval()
        for batch in held_out_batches(self.examples, self.engine, self.batch_size, self.pad_id):
            self.delta.refresh()
            loss, tokens = token_loss_sum(self.model, batch)
            loss.backward()
            bucket.add_loss(loss, int(tokens))
        self.engine.all_reduce_sum_(bucket.flat)
        self.engine.release()
        self.model.train(was_training)
        holder.flat.grad = None
        for leaf in leaves:
            leaf.requires_grad_(leaf is self.bank.primary.flat)
        return bucket.loss_sum / bucket.tokens, bucket.flat[:-2] / bucket.tokens


def random_increases(probe: Probe, rhos: list[float], draws: int, seed: int, base: float) -> list[list[float]]:
    """[draw][rho] loss increase under E = ρ z/||z||, z ~ N(0, I) seeded by (seed, draw), identical on all ranks."""
    E = probe.delta.flat
    out = []
    with probe.delta.attached(probe.model):
        for draw in range(draws):
            generator = torch.Generator(device=E.device).manual_seed(seed * 1_000_003 + draw)
            z = torch.randn(E.shape, generator=generator, device=E.device)
            z /= z.norm()
            row = []
            for rho in rhos:
                torch.mul(z, rho, out=E)
                row.append(probe.loss() - base)
            out.append(row)
        E.zero_()
    return out


def adversarial_increases(probe: Probe, rhos: list[float], steps: int, base: float) -> tuple[list[float], float]:
    """(loss increase at the end of the projected ascent in the dense ρ-ball, for each ρ; ||g|| at E = 0)."""
    E = probe.delta.flat
    out = []
    with probe.delta.attached(probe.model):
        E.zero_()
        g0 = probe.loss_and_grad(probe.delta)[1]
        g0_norm = float(g0.norm())
        for rho in rhos:
            E.zero_()
            g = g0
            for step in range(steps):
                norm = float(g.norm())
                if norm == 0:
                    break
                E.add_(g, alpha=rho / norm)
                size = float(E.norm())
                if size > rho:
                    E.mul_(rho / size)
                if step + 1 < steps:
                    g = probe.loss_and_grad(probe.delta)[1]
            out.append(probe.loss() - base)
        E.zero_()
    return out, g0_norm


def _weight_change_coefficients(branch: Branch, d: Tensor) -> tuple[float, float, float]:
    """(c0, c1, c2) with Σ_i ||s_i (B_i + t dB_i)(A_i + t dA_i) − s_i B_i A_i||² = t² (c0 + c1 t + c2 t²).

    Per layer the change is t s [dB, B] [A + t dA; dA] = t s P (Q0 + t Q1), and ||P Q||² = <PᵀP, Q Qᵀ>: only
    2r × 2r Gram products, in float64, without the cancellation of subtracting the two m × n products."""
    step = Branch(branch.shapes, branch.ranks, branch.scales, d)
    c = torch.zeros(3, dtype=torch.float64, device=d.device)
    for (A, B), (dA, dB), s in zip(branch.all_factors(), step.all_factors(), branch.scales):
        A, B, dA, dB = (t.detach().double() for t in (A, B, dA, dB))
        P = torch.cat([dB, B], dim=1)
        Q0, Q1 = torch.cat([A, dA]), torch.cat([dA, torch.zeros_like(dA)])
        gram = P.T @ P
        c += s * s * torch.stack([(gram * (Q0 @ Q0.T)).sum(), 2 * (gram * (Q0 @ Q1.T)).sum(),
                                  (gram * (Q1 @ Q1.T)).sum()])
    c0, c1, c2 = c.tolist()
    return c0, c1, c2


def scale_to_radius(branch: Branch, d: Tensor, rho: float) -> float:
    """The step length t > 0 at which the factor step t·d changes the weights by exactly ρ (Frobenius, all
    layers), by bisection on the exact quartic (the first root found by doubling from the first-order t)."""
    c0, c1, c2 = _weight_change_coefficients(branch, d)

    def size(t: float) -> float:
        return t * math.sqrt(max(c0 + c1 * t + c2 * t * t, 0.0))

    lo, hi = 0.0, rho / math.sqrt(c0) if c0 > 0 else 1.0
    for _ in range(200):
        if size(hi) >= rho:
            break
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(mid) < rho else (lo, mid)
    return (lo + hi) / 2


def lora_adversarial_increases(probe: Probe, rhos: list[float], steps: int, base: float) -> tuple[list[float], float]:
    """(loss increase at the end of the normalised ascent on the primary factors, each iterate rescaled to a
    weight change of norm ρ, for each ρ; the factors' gradient norm at the adapted model). The factors are put
    back bit for bit from a copy of the branch."""
    branch = probe.bank.primary
    original = branch.flat.detach().clone()
    g0 = probe.loss_and_grad(branch)[1]
    g0_norm = float(g0.norm())
    out = []
    try:
        for rho in rhos:
            d, g = torch.zeros_like(original), g0
            for step in range(steps):
                norm = float(g.norm())
                if norm == 0:
                    break
                d = g / norm if step == 0 else d + float(d.norm()) * g / norm
                with torch.no_grad():
                    d *= scale_to_radius(branch, d, rho)
                    branch.flat.copy_(original + d)
                if step + 1 < steps:
                    g = probe.loss_and_grad(branch)[1]
            with torch.no_grad():
                branch.flat.copy_(original + d)
            out.append(probe.loss() - base)
    finally:
        with torch.no_grad():
            branch.flat.copy_(original)
    return out, g0_norm


MEASURES = ("random", "adversarial", "lora")


def probe_sharpness(probe: Probe, rhos: list[float], draws: int = 5, adv_steps: int = 5, seed: int = 0,
                    measures: tuple[str, ...] = MEASURES) -> dict[str, Any]:
    """Base loss, gradient norms and, for each ρ, the random, adversarial and LoRA-subspace loss increases (those
    of `measures`; the others are None)."""
    base = probe.loss()
    n = len(rhos)
    random = random_increases(probe, rhos, draws, seed, base) if "random" in measures else None
    adversarial, grad_norm = (adversarial_increases(probe, rhos, adv_steps, base) if "adversarial" in measures
                              else ([None] * n, None))
    lora, lora_grad_norm = (lora_adversarial_increases(probe, rhos, adv_steps, base) if "lora" in measures
                            else ([None] * n, None))
    rows = []
    for j, rho in enumerate(rhos):
        column = torch.tensor([row[j] for row in random], dtype=torch.float64) if random else None
        rows.append({"rho": rho, "random_mean": float(column.mean()) if random else None,
                     "random_std": (float(column.std()) if draws > 1 else 0.0) if random else None,
                     "adversarial": adversarial[j], "lora_adversarial": lora[j],
                     "first_order": rho * grad_norm if grad_norm is not None else None})
    return {"base_loss": base, "grad_norm": grad_norm, "lora_grad_norm": lora_grad_norm,
            "adapted_layers": len(probe.bank.shapes), "adapted_weights": probe.delta.flat.numel(),
            "draws": draws, "adv_steps": adv_steps, "seed": seed, "measures": list(measures), "results": rows}
