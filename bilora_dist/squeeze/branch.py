"""Squeezing a whole adapter branch, its layers split across data-parallel ranks.

Every rank holds the whole branch, so every rank could compress every layer; instead each rank takes
the layers assigned to it (balanced by the (m + n)·r² cost of the factored SVD), and two sum
all-reduces share the results: first the singular values (so all ranks pick the same per-layer
ranks), then the new factors, each written by its owner into an otherwise zero tensor. A sum of one
value and zeros is exact, so all ranks end bit-identical, and equal to a one-rank squeeze.

A fused expert projection is one layer of E experts, each compressed by its own factored SVD (batched with
the others of its shape); it keeps one rank for all its experts, as PEFT's layout stores one rank per tensor,
so its energy-driven rank is chosen from the spectrum energy summed over the experts, per rank position.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from bilora_dist.adapters.bank import Branch
from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError
from bilora_dist.squeeze.operator import Spectrum, balanced_factors, energy_rank, factored_svd


@dataclass(frozen=True)
class LayerReport:
    name: str
    old_rank: int
    new_rank: int
    kept_energy: float


def kept_energy_summary(reports: list[LayerReport]) -> dict[str, float]:
    """Mean and smallest kept energy over the layers of one compression, as histories and metrics record it."""
    kept = [r.kept_energy for r in reports]
    return {"kept_energy_mean": sum(kept) / len(kept), "kept_energy_min": min(kept)}


def assign_layers(branch: Branch, world: int) -> list[int]:
    """Owner rank of every layer: longest-processing-time greedy on the cost (m + n)·r²."""
    cost = [s.copies * (s.in_features + s.out_features) * r * r for s, r in zip(branch.shapes, branch.ranks)]
    owner = [0] * len(cost)
    loads = [(0, rank) for rank in range(world)]
    for i in sorted(range(len(cost)), key=lambda i: (-cost[i], i)):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + cost[i], rank))
    return owner


def squeeze_branch(branch: Branch, rank: int, energy: float | None = None, engine: Engine | None = None,
                   keep_alpha: bool = False) -> tuple[Branch, list[LayerReport]]:
    """A new branch with every layer's s·BA truncated to `rank` (or, with `energy`, to the smallest rank
    keeping that fraction of ||ΔW||², at most `rank`). Each layer keeps its scale s (alpha' = alpha·k/r), or
    with `keep_alpha` its alpha (s' = alpha/k); the factors absorb the difference, ΔW' is the same."""
    engine = engine or Engine()
    if rank < 1 or rank > max(branch.ranks):
        raise UserError(f"squeeze: target rank {rank} must be between 1 and the current rank {max(branch.ranks)}")
    owner = assign_layers(branch, engine.world_size)
    width = max(branch.ranks)
    found_groups: list[tuple[list[int], int, Spectrum]] = []  # (this rank's layers, copies, their spectra)
    singular = torch.zeros(len(branch.shapes), width, dtype=torch.float32, device=branch.flat.device)
    with torch.no_grad():
        for group in branch.groups():
            mine = [j for j, layer in enumerate(group.layers) if owner[layer] == engine.rank]
            if not mine:
                continue
            c = group.copies
            pick = slice(None) if len(mine) == len(group.layers) else [j * c + e for j in mine for e in range(c)]
            found = factored_svd(group.A[pick], group.B[pick], group.scales[pick], k=rank)
            layers = [group.layers[j] for j in mine]
            S = found.S.float()
            # a fused projection's energy per rank position, summed over its experts (one rank per tensor)
            singular[layers, :S.shape[1]] = S if c == 1 else S.square().view(len(layers), c, -1).sum(1).sqrt()
            found_groups.append((layers, c, found))
        engine.all_reduce_sum_(singular)
        caps = [min(rank, r) for r in branch.ranks]
        if energy is None:
            new_ranks = caps
        else:
            new_ranks = [min(k, cap) for k, cap in zip(energy_rank(singular, energy, width), caps)]
        scales = [s * r / k if keep_alpha else s for s, r, k in zip(branch.scales, branch.ranks, new_ranks)]
        new = Branch(branch.shapes, new_ranks, scales,
                     torch.zeros(sum(s.numel(k) for s, k in zip(branch.shapes, new_ranks)),
                                 dtype=branch.flat.dtype, device=branch.flat.device))
        for layers, c, found in found_groups:  # the new factors of a whole group at once, then one copy per layer
            top = max(new_ranks[layer] for layer in layers)
            row_scales = torch.tensor([scales[layer] for layer in layers], dtype=found.S.dtype,
                                      device=found.S.device).repeat_interleave(c)
            A, B = balanced_factors(found.U[..., :top], found.S[:, :top], found.V[..., :top], row_scales)
            for row, layer in enumerate(layers):
                k, rows = new_ranks[layer], slice(row * c, (row + 1) * c)
                dst_A, dst_B = new.factors(layer)
                dst_A.copy_(A[rows, :k].view_as(dst_A))
                dst_B.copy_(B[rows, :, :k].view_as(dst_B))
        engine.all_reduce_sum_(new.flat.data)
    total = singular.square().sum(1)
    kept = [singular[i, :k].square().sum() / total[i] if total[i] > 0 else torch.tensor(1.0)
            for i, k in enumerate(new_ranks)]
    reports = [LayerReport(s.name, r, k, float(e)) for s, r, k, e in zip(branch.shapes, branch.ranks, new_ranks, kept)]
    return new, reports
