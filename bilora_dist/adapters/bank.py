"""The adapter bank: every adapted layer's LoRA factors, one flat tensor per branch.

A branch (primary or auxiliary) stores all layers' factors in a single flat fp32 parameter, so one
all-reduce, one optimizer call and one norm cover the whole model. Layer i owns a slice laid out as
A_i (r_i x n_i) followed by B_i (m_i x r_i). Slices are ordered by shape, so layers of equal shape
sit at a constant stride and form one batched view (used by the norm projection and by squeeze).

A fused mixture-of-experts projection (a 3-D parameter of E experts) is one layer whose slice holds every
expert's factors, A (E x r x n) followed by B (E x m x r): per expert e, ΔW_e = s·B_e A_e, one rank and one
scale for the whole tensor (as PEFT's `target_parameters` stores it).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bilora_dist.adapters.product import low_rank_product

if TYPE_CHECKING:
    from bilora_dist.training.gradient_sketch import GradientSketch


@dataclass(frozen=True)
class LayerShape:
    """An adapted layer: its path and its weight's shape (out m x in n); `experts` > 0 for a fused expert
    projection (the parameter's path) holding that many m x n expert weights, 0 for a linear layer."""

    name: str
    in_features: int
    out_features: int
    experts: int = 0

    @property
    def copies(self) -> int:
        """How many m x n weights the layer holds (its experts, or 1)."""
        return max(self.experts, 1)

    def numel(self, rank: int) -> int:
        """Elements of the layer's factors at `rank`."""
        return self.copies * rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class ShapeGroup:
    """Layers of one (n, m, r, experts) shape, batched over their L·c weights (c = copies per layer, 1 for
    linear layers): A is (L·c, r, n), B is (L·c, m, r), `scales` (L·c,); views of the branch when c is 1,
    copies otherwise (read them, do not write them)."""

    layers: list[int]
    A: Tensor
    B: Tensor
    scales: Tensor
    copies: int = 1


class Branch(nn.Module):
    """One LoRA branch over all layers: factors of layer i are views into `flat`."""

    def __init__(self, shapes: list[LayerShape], ranks: list[int], scales: list[float], flat: Tensor):
        super().__init__()
        self.shapes, self.ranks, self.scales = shapes, list(ranks), list(scales)
        order = sorted(range(len(shapes)), key=self._key)
        self.offsets = [0] * len(shapes)
        total = 0
        for i in order:
            self.offsets[i] = total
            total += shapes[i].numel(ranks[i])
        if flat.numel() != total:
            raise ValueError(f"flat tensor has {flat.numel()} elements, layout needs {total}")
        self.order = order
        self.flat = nn.Parameter(flat)

    @classmethod
    def initialized(cls, shapes: list[LayerShape], ranks: list[int], scales: list[float],
                    generator: torch.Generator) -> "Branch":
        """Standard LoRA init: A ~ U(-1/sqrt(n), 1/sqrt(n)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0."""
        total = sum(s.numel(r) for s, r in zip(shapes, ranks))
        branch = cls(shapes, ranks, scales, torch.zeros(total))
        with torch.no_grad():
            for i, shape in enumerate(shapes):
                A, _ = branch.factors(i)
                bound = 1.0 / math.sqrt(shape.in_features)
                A.copy_(torch.rand(A.shape, generator=generator) * 2 * bound - bound)
        return branch

    @classmethod
    def from_factors(cls, shapes: list[LayerShape], factors: list[tuple[Tensor, Tensor]],
                     scales: list[float]) -> "Branch":
        """Build a branch holding the given per-layer (A, B) pairs (used after a rank change)."""
        ranks = [A.shape[-2] for A, _ in factors]
        total = sum(s.numel(r) for s, r in zip(shapes, ranks))
        branch = cls(shapes, ranks, scales, torch.zeros(total, dtype=factors[0][0].dtype))
        with torch.no_grad():
            for i, (A, B) in enumerate(factors):
                dst_A, dst_B = branch.factors(i)
                dst_A.copy_(A)
                dst_B.copy_(B)
        return branch

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """(A_i, B_i) as views of the flat parameter, (r, n) and (m, r), or (E, r, n) and (E, m, r) for a
        fused expert projection; gradients flow into flat.grad."""
        shape, r, start = self.shapes[i], self.ranks[i], self.offsets[i]
        size_A = shape.copies * r * shape.in_features
        return self._views(i, self.flat[start:start + size_A], self.flat[start + size_A:start + shape.numel(r)])

    def _views(self, i: int, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        shape, r = self.shapes[i], self.ranks[i]
        lead = (shape.experts,) if shape.experts else ()
        return A.view(*lead, r, shape.in_features), B.view(*lead, shape.out_features, r)

    def all_factors(self) -> list[tuple[Tensor, Tensor]]:
        """Every layer's (A_i, B_i) from a single split of `flat`.

        Slicing `flat` per layer would make autograd scatter each layer's gradient into its own
        flat-sized zero tensor (O(layers x size) per backward); one split has one backward that
        concatenates all layers' gradients."""
        sizes, where = [], {}
        for i in self.order:
            r, shape = self.ranks[i], self.shapes[i]
            where[i] = len(sizes)
            sizes += [shape.copies * r * shape.in_features, shape.copies * shape.out_features * r]
        pieces = self.flat.split(sizes)
        return [self._views(i, pieces[where[i]], pieces[where[i] + 1]) for i in range(len(self.shapes))]

    def _key(self, i: int) -> tuple[int, int, int, int]:
        shape = self.shapes[i]
        return shape.in_features, shape.out_features, self.ranks[i], shape.experts

    def groups(self) -> Iterator[ShapeGroup]:
        """Batched views over runs of equal-shape layers."""
        for _, run in itertools.groupby(self.order, key=self._key):
            yield self._group(list(run))

    def _group(self, layers: list[int]) -> ShapeGroup:
        shape, r = self.shapes[layers[0]], self.ranks[layers[0]]
        n, m, c, stride = shape.in_features, shape.out_features, shape.copies, shape.numel(r)
        block = self.flat[self.offsets[layers[0]]:self.offsets[layers[0]] + stride * len(layers)].view(len(layers), stride)
        scales = torch.tensor([self.scales[i] for i in layers], dtype=self.flat.dtype, device=self.flat.device)
        return ShapeGroup(layers, block[:, :c * r * n].reshape(-1, r, n), block[:, c * r * n:].reshape(-1, m, r),
                          scales.repeat_interleave(c), c)

    def grad_peaks(self) -> Tensor:
        """max |g| over each layer's slice of flat.grad (A and B, all of a fused projection's experts): one
        reduction per shape group, no temporary of the gradient's size (a max cannot underflow as a sum of
        squares would)."""
        grad = self.flat.grad
        assert grad is not None
        out = torch.empty(len(self.shapes), dtype=grad.dtype, device=grad.device)
        for _, run in itertools.groupby(self.order, key=self._key):
            layers = list(run)
            start, stride = self.offsets[layers[0]], self.shapes[layers[0]].numel(self.ranks[layers[0]])
            block = grad[start:start + stride * len(layers)].view(len(layers), stride)
            out[layers] = torch.linalg.vector_norm(block, float("inf"), dim=1)
        return out

    def delta_sq_norms(self) -> Tensor:
        """||s_i B_i A_i||_F^2 for every layer (summed over a fused projection's experts), from r x r Gram
        products (never forms m x n)."""
        out = torch.empty(len(self.shapes), dtype=self.flat.dtype, device=self.flat.device)
        for g in self.groups():
            gram = (g.B.transpose(1, 2) @ g.B) * (g.A @ g.A.transpose(1, 2))
            out[g.layers] = (g.scales.square() * gram.sum(dim=(1, 2))).view(len(g.layers), g.copies).sum(1)
        return out


class GradBucket:
    """One flat buffer holding every branch's gradient (each branch's `.grad` is a view of it) followed by
    two named slots, the summed token loss and the token count, so one all-reduce sums all of them."""

    def __init__(self, branches: list[Branch]):
        sizes = [b.flat.numel() for b in branches]
        flat0 = branches[0].flat
        self.flat = torch.zeros(sum(sizes) + 2, dtype=flat0.dtype, device=flat0.device)
        for branch, chunk in zip(branches, self.flat.split(sizes + [2])):
            branch.flat.grad = chunk

    def zero_(self) -> None:
        self.flat.zero_()

    def add_loss(self, loss_sum: Tensor, tokens: int) -> None:
        """Accumulate one micro-batch's summed loss and token count."""
        self.flat[-2] += loss_sum.detach()
        self.flat[-1] += tokens

    @property
    def loss_sum(self) -> float:
        return float(self.flat[-2])

    @property
    def tokens(self) -> int:
        return int(self.flat[-1])


class AdapterBank(nn.Module):
    """All adapters of a model: the primary branch and, for Bi-LoRA, the auxiliary branch."""

    def __init__(self, shapes: list[LayerShape], primary: Branch, aux: Branch | None = None):
        super().__init__()
        self.shapes = shapes
        self.primary = primary
        self.aux = aux
        self.aux_active = aux is not None
        self.grad_bucket: GradBucket | None = None
        self._pass_factors: list[list[tuple[Tensor, Tensor]]] | None = None
        self.sketch: GradientSketch | None = None  # set for a step whose weight gradients are sketched

    def begin_pass(self) -> None:
        """Split every branch into its layers' factors once for the coming forward pass (a root pre-hook)."""
        self._pass_factors = [branch.all_factors() for branch in self.branches()]

    def end_pass(self) -> None:
        """Drop the pass's factor views (a root forward hook): a later forward never sees stale ones."""
        self._pass_factors = None

    def replace_branch(self, which: str, branch: Branch) -> None:
        """Put `branch` in place of the primary or auxiliary one; a bound gradient bucket is re-bound to it."""
        setattr(self, which, branch)
        if self.grad_bucket is not None:
            self.bind_grad_bucket()

    def _factors(self, branch: int, i: int) -> tuple[Tensor, Tensor]:
        if self._pass_factors is not None:
            return self._pass_factors[branch][i]
        return self.branches()[branch].factors(i)

    def update_factors(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's update s1 B1 A1 (+ s2 B2 A2) as one factor pair (A, B) with the scales in B: the active
        branches' ranks side by side ((r, n) and (m, r), or batched over a fused projection's experts)."""
        A, B = self._factors(0, i)
        B = B * self.primary.scales[i]
        if self.aux is not None and self.aux_active:
            A2, B2 = self._factors(1, i)
            B2 = B2 * self.aux.scales[i] if self.aux.scales[i] != 1.0 else B2  # no copy at the default scale
            if A.shape[-2] == 0:  # an empty primary (the trainer integrations' PEFT model holds the primary)
                return A2, B2
            A = torch.cat([A, A2], dim=-2)
            B = torch.cat([B, B2], dim=-1)
        return A, B

    def delta(self, i: int, x: Tensor) -> Tensor:
        """The low-rank update of linear layer i applied to x: s1 B1 A1 x (+ s2 B2 A2 x), one matmul pair."""
        return low_rank_product(x, *self.update_factors(i))

    @contextmanager
    def primary_only(self) -> Iterator[None]:
        """Switch the auxiliary branch off (evaluation, export, SAM's probe) and back on afterwards."""
        previous, self.aux_active = self.aux_active, False
        try:
            yield
        finally:
            self.aux_active = previous

    def digest(self) -> str:
        """SHA-256 of every branch's exact bytes: equal on two ranks iff their adapters are bit-identical."""
        h = hashlib.sha256()
        for branch in self.branches():
            h.update(branch.flat.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def branches(self) -> list[Branch]:
        return [b for b in (self.primary, self.aux) if b is not None]

    def bind_grad_bucket(self) -> GradBucket:
        """Make every branch's .grad a view of one new zeroed GradBucket (kept until a branch is replaced)."""
        self.grad_bucket = GradBucket(self.branches())
        return self.grad_bucket

    @torch.no_grad()
    def project_aux(self, rho: float) -> float:
        """Scale the auxiliary onto the global ball sqrt(sum_j ||E_j||_F^2) <= rho; return the norm before.

        Scaling A2 and B2 of every layer by sqrt(rho/c) scales each E_j by rho/c, so scaling the
        whole flat tensor is the projection.
        """
        assert self.aux is not None
        c = float(self.aux.delta_sq_norms().sum().sqrt())
        if c > rho:
            self.aux.flat.mul_(math.sqrt(rho / c))
        return c
