"""How Bi-LoRA's auxiliary ascends, and how well it follows the ascent.

- Diagnostics (`--aux-diagnostics-every N`): on a step's batch, with E = (s2 B2_j A2_j)_j the auxiliary's
  perturbation and G the gradient of the loss w.r.t. the adapted weights at W + E,
  `aux_alignment` = <E, G> / (||E|| ||G_r||) and `aux_gain_ratio` = (L(W+E) - L(W)) / (||E|| ||G_r||), where
  ||E|| ||G_r|| is the first-order gain of the best perturbation of E's radius that the auxiliary can reach:
  per layer rank r2, G_r the top-r2 singular part of each layer's gradient (sketched: gradient_sketch.py).
  <E, G> = sum_j <A2_j, dL/dA2_j> = sum_j <B2_j, dL/dB2_j>, so it is half the dot product of the auxiliary
  with its own (reduced) gradient. L(W) is one extra forward with the auxiliary off, reduced like the loss.
- Refresh (`--aux-refresh K`): the auxiliary set to rho G_r / ||G_r||, the ideal inner maximiser over
  rank-r2 perturbations of radius rho (to first order), its AdamW moments dropped.
- Normalised ascent (`--aux-optimizer sgd-normalized`): theta2 += lr2 g2 / ||g2||, in place of AdamW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bilora_dist.adapters.bank import AdapterBank, Branch
from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError
from bilora_dist.training.gradient_sketch import GradientSketch
from bilora_dist.training.loss import token_loss_sum
from bilora_dist.squeeze.branch import assign_layers

if TYPE_CHECKING:
    from bilora_dist.config.train import TrainConfig


@dataclass(frozen=True)
class AuxVariant:
    """The auxiliary's update rule (the paper's: AdamW at the primary's lr, no refresh, no diagnostics)."""

    diagnostics_every: int = 0
    refresh: int = 0
    normalized: bool = False
    seed: int = 0

    @classmethod
    def of(cls, cfg: TrainConfig) -> AuxVariant:
        return cls(cfg.aux_diagnostics_every, cfg.aux_refresh, cfg.aux_optimizer == "sgd-normalized", cfg.seed)

    def sketch_for(self, bank: AdapterBank, step: int) -> GradientSketch | None:
        """The sketch step `step` needs (a diagnostics or refresh step), or None."""
        due = (self.diagnostics_every and step % self.diagnostics_every == 0) or (self.refresh and
                                                                              step % self.refresh == 0)
        if not due:
            return None
        assert bank.aux is not None
        if any(s.experts for s in bank.shapes):
            raise UserError("--aux-diagnostics-every and --aux-refresh cover linear layers; this model's adapters "
                            "include fused expert tensors")
        dims = {j: (s.out_features, s.in_features) for j, s in enumerate(bank.shapes)}
        return GradientSketch(dims, max(bank.aux.ranks), self.seed + step, bank.aux.flat.device)


@torch.no_grad()
def clean_loss(model: nn.Module, bank: AdapterBank, micro_batches: list[dict[str, Tensor]], engine: Engine) -> float:
    """The step's loss at W (the auxiliary off), summed and counted over every rank's micro-batches."""
    total = torch.zeros(2, device=bank.primary.flat.device)
    with bank.primary_only():
        for batch in micro_batches:
            loss, tokens = token_loss_sum(model, batch)
            total += torch.stack([loss.float(), tokens])
    engine.all_reduce_sum_(total)
    return float(total[0] / total[1].clamp(min=1))


Spectra = tuple[Tensor, dict[int, tuple[Tensor, Tensor, Tensor]]]


@torch.no_grad()
def reachable_spectra(bank: AdapterBank, sketch: GradientSketch, engine: Engine) -> Spectra:
    """Every layer's top-r2 singular values of the sketched gradient (layers x max r2, zero-padded), and the
    triplets of the layers this rank computed: the layers are split across ranks as a squeeze splits them and
    one sum all-reduce shares the values (a value plus zeros is exact, so every rank holds the same bits).
    Computed once per sketched step, for its diagnostics and its refresh alike."""
    aux = bank.aux
    assert aux is not None
    owner = assign_layers(aux, engine.world_size)
    singular = torch.zeros(len(aux.shapes), max(aux.ranks), device=aux.flat.device)
    mine = {}
    for j in sketch.layers():
        if owner[j] == engine.rank:
            mine[j] = sketch.top(j, aux.ranks[j])
            singular[j, :mine[j][1].numel()] = mine[j][1]
    engine.all_reduce_sum_(singular)
    return singular, mine


def diagnostics(bank: AdapterBank, spectra: Spectra, perturbed: float, clean: float) -> dict[str, float]:
    """The metrics row fields of a diagnostics step (the auxiliary's gradient reduced, before any update)."""
    assert bank.aux is not None and bank.aux.flat.grad is not None
    inner = 0.5 * float(bank.aux.flat.detach() @ bank.aux.flat.grad)
    radius = float(bank.aux.delta_sq_norms().sum().sqrt())
    best = radius * float(spectra[0].square().sum().sqrt())
    ratio = (lambda v: v / best if best > 0 else math.nan)  # noqa: E731
    return {"aux_alignment": ratio(inner), "aux_gain": perturbed - clean, "aux_gain_ratio": ratio(perturbed - clean),
            "aux_best_gain": best}


@torch.no_grad()
def refresh(bank: AdapterBank, spectra: Spectra, rho: float, optimizer: torch.optim.Optimizer,
            engine: Engine) -> float:
    """Set every layer's auxiliary to sqrt(rho/(s2 N)) (U sqrt(S), sqrt(S) Vᵀ), so E = rho G_r / N with
    N = ||G_r||; drop its optimizer state. Each rank writes the layers it computed into a zero branch and one
    sum all-reduce assembles it. Returns the new radius (rho; the old one where G_r is zero)."""
    aux = bank.aux
    assert aux is not None
    singular, mine = spectra
    norm = float(singular.square().sum().sqrt())
    if not norm > 0 or not math.isfinite(norm):
        return float(aux.delta_sq_norms().sum().sqrt())
    new = Branch(aux.shapes, aux.ranks, aux.scales, torch.zeros_like(aux.flat.data))
    for j, (U, S, V) in mine.items():
        A, B = new.factors(j)
        c = math.sqrt(rho / (aux.scales[j] * norm))
        B.data.copy_(U * S.sqrt() * c)
        A.data.copy_((V * S.sqrt()).T * c)
    engine.all_reduce_sum_(new.flat.data)
    aux.flat.copy_(new.flat.data)
    optimizer.state.pop(aux.flat, None)
    return rho


@torch.no_grad()
def normalized_ascent(bank: AdapterBank, lr: float) -> None:
    """theta2 += lr g2 / ||g2|| over the whole auxiliary."""
    assert bank.aux is not None and bank.aux.flat.grad is not None
    grad = bank.aux.flat.grad
    bank.aux.flat.add_(grad, alpha=lr / (float(grad.norm()) + 1e-12))
