"""In-training squeeze schedules (`--squeeze post:R->K | cont:R->K@STEP | in:R->K/STAGES`) and the
rank change they apply to a live run: the bank's primary branch and its optimizer state are replaced;
model, engine, data and learning-rate schedule carry on untouched."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from bilora_dist.adapters.bank import AdapterBank, Branch
from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError
from bilora_dist.squeeze.branch import LayerReport, squeeze_branch

_SPEC = re.compile(r"^(?P<mode>post|cont|in):(?P<src>\d+)->(?P<dst>\d+)(?:@(?P<at>\d+)|/(?P<stages>\d+))?$")


@dataclass(frozen=True)
class SqueezeSchedule:
    """Compress the primary to `rank` right after optimizer step `step` (1-based), for each event."""

    mode: str
    source: int
    target: int
    events: tuple[tuple[int, int], ...]


def stage_ranks(source: int, target: int, stages: int, shape: str) -> list[int]:
    """Ranks after each of the `stages` compressions: geometric r_j = round(R (K/R)^(j/n)) or linear."""
    if shape == "geometric":
        ranks = [round(source * (target / source) ** (j / stages)) for j in range(1, stages + 1)]
    else:
        ranks = [round(source + (target - source) * j / stages) for j in range(1, stages + 1)]
    return [max(r, target) for r in ranks[:-1]] + [target]


def parse_squeeze(spec: str, total_steps: int, train_rank: int, min_stage: int,
                  shape: str = "geometric") -> SqueezeSchedule:
    """The schedule of `--squeeze`; every mistake is a UserError naming it."""
    m = _SPEC.match(spec.replace(" ", ""))
    if not m or (m["mode"] == "cont") != (m["at"] is not None) or (m["mode"] == "in") != (m["stages"] is not None):
        raise UserError(f"--squeeze '{spec}': expected post:R->K, cont:R->K@STEP or in:R->K/STAGES")
    mode, src, dst = m["mode"], int(m["src"]), int(m["dst"])
    if src != train_rank:
        raise UserError(f"--squeeze '{spec}' starts at rank {src} but --rank is {train_rank}; pass --rank {src}")
    if not 1 <= dst < src:
        raise UserError(f"--squeeze '{spec}': the target rank must be between 1 and {src - 1}")
    if mode == "post":
        return SqueezeSchedule(mode, src, dst, ((total_steps, dst),))
    if mode == "cont":
        at = int(m["at"])
        if min(at, total_steps - at) < min_stage:
            raise UserError(f"--squeeze '{spec}': stages of {at} and {total_steps - at} steps; each must last at "
                            f"least --squeeze-min-stage {min_stage} of the run's {total_steps} steps")
        return SqueezeSchedule(mode, src, dst, ((at, dst),))
    stages = int(m["stages"])
    if stages < 1:
        raise UserError(f"--squeeze '{spec}': at least one stage")
    length = total_steps // (stages + 1)
    if length < min_stage:
        raise UserError(f"--squeeze '{spec}': {stages + 1} stages of {length} steps in a {total_steps}-step run; "
                        f"each must last at least --squeeze-min-stage {min_stage}")
    ranks = stage_ranks(src, dst, stages, shape)
    return SqueezeSchedule(mode, src, dst, tuple(((j + 1) * length, k) for j, k in enumerate(ranks)))


@torch.no_grad()
def _project_moments(old: Branch, new: Branch, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AdamW moments carried into the new factors, mapped as gradients are mapped.

    The new factors span subspaces of the old ones: B' = B S with S = B⁺B' (r x k), A' = T A with T = A'A⁺
    (k x r). For a loss gradient G of ΔW, the factor gradients g_A = s BᵀG and g_B = s G Aᵀ become
    g_A' = (s'/s) Sᵀ g_A and g_B' = (s'/s) g_B Tᵀ: first moments, linear in the gradients, map the same way.
    Second moments map through the elementwise squares (s'/s)² (S∘S)ᵀ and (T∘T)ᵀ: non-negative, and exact when
    S and T are diagonal or permutations (each new coordinate one old coordinate, rescaled)."""
    out = {k: v for k, v in state.items() if k not in ("exp_avg", "exp_avg_sq")}
    moments = {name: Branch(old.shapes, old.ranks, old.scales, state[name].detach().clone())
               for name in ("exp_avg", "exp_avg_sq")}
    targets = {name: Branch(new.shapes, new.ranks, new.scales, torch.zeros_like(new.flat)) for name in moments}
    for i in range(len(old.shapes)):
        (A, B), (A_new, B_new) = old.factors(i), new.factors(i)
        ratio = new.scales[i] / old.scales[i]
        S, T = torch.linalg.pinv(B) @ B_new, A_new @ torch.linalg.pinv(A)
        for name, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            m_A, m_B = moments[name].factors(i)
            dst_A, dst_B = targets[name].factors(i)
            dst_A.copy_(ratio ** power * S.pow(power).mT @ m_A)  # batched over a fused projection's experts
            dst_B.copy_(ratio ** power * m_B @ T.pow(power).mT)
    return out | {name: target.flat.detach() for name, target in targets.items()}


def apply_rank_change(bank: AdapterBank, rank: int, optimizer: torch.optim.Optimizer, engine: Engine,
                      optimizer_state: str, squeeze_aux: bool = False) -> list[LayerReport]:
    """Squeeze the primary (and, if asked, the auxiliary) in place of the running bank; the optimizer's
    param groups get the new tensors with reset (empty) or projected moments, and the bank's gradient
    bucket is re-bound to them. Returns the primary's report."""
    reports: list[LayerReport] = []
    for which in ("primary", "aux") if squeeze_aux and bank.aux is not None else ("primary",):
        old: Branch = getattr(bank, which)
        k = min(rank, max(old.ranks))
        new, layer_reports = squeeze_branch(old, k, engine=engine)
        reports = reports or layer_reports
        group = next(g for g in optimizer.param_groups if g["params"][0] is old.flat)
        state = optimizer.state.pop(old.flat, {})
        group["params"] = [new.flat]
        if optimizer_state == "project" and state:
            optimizer.state[new.flat] = _project_moments(old, new, state)
        bank.replace_branch(which, new)
    return reports
