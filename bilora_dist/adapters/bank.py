"""The adapter bank: every adapted layer's LoRA factors, one flat tensor per branch.

A branch (primary or auxiliary) stores all layers' factors in a single flat fp32 parameter, so one
all-reduce, one optimizer call and one norm cover the whole model. Layer i owns a slice laid out as
A_i (r_i x n_i) followed by B_i (m_i x r_i). Slices are ordered by shape, so layers of equal shape
sit at a constant stride and form one batched view (used by the norm projection and by squeeze).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bilora_dist.adapters.product import low_rank_product


@dataclass(frozen=True)
class LayerShape:
    """An adapted linear layer: its module path and its weight's shape (out m x in n)."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ShapeGroup:
    """Layers of one (n, m, r) shape, batched: A is (L, r, n), B is (L, m, r), both views of the branch."""

    layers: list[int]
    A: Tensor
    B: Tensor
    scales: Tensor


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
            total += ranks[i] * (shapes[i].in_features + shapes[i].out_features)
        if flat.numel() != total:
            raise ValueError(f"flat tensor has {flat.numel()} elements, layout needs {total}")
        self.order = order
        self.flat = nn.Parameter(flat)

    @classmethod
    def initialized(cls, shapes: list[LayerShape], ranks: list[int], scales: list[float],
                    generator: torch.Generator) -> "Branch":
        """Standard LoRA init: A ~ U(-1/sqrt(n), 1/sqrt(n)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0."""
        total = sum(r * (s.in_features + s.out_features) for s, r in zip(shapes, ranks))
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
        ranks = [A.shape[0] for A, _ in factors]
        total = sum(r * (s.in_features + s.out_features) for s, r in zip(shapes, ranks))
        branch = cls(shapes, ranks, scales, torch.zeros(total, dtype=factors[0][0].dtype))
        with torch.no_grad():
            for i, (A, B) in enumerate(factors):
                dst_A, dst_B = branch.factors(i)
                dst_A.copy_(A)
                dst_B.copy_(B)
        return branch

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """(A_i, B_i) as views of the flat parameter; gradients flow into flat.grad."""
        shape, r, start = self.shapes[i], self.ranks[i], self.offsets[i]
        n, m = shape.in_features, shape.out_features
        A = self.flat[start:start + r * n].view(r, n)
        B = self.flat[start + r * n:start + r * (n + m)].view(m, r)
        return A, B

    def all_factors(self) -> list[tuple[Tensor, Tensor]]:
        """Every layer's (A_i, B_i) from a single split of `flat`.

        Slicing `flat` per layer would make autograd scatter each layer's gradient into its own
        flat-sized zero tensor (O(layers x size) per backward); one split has one backward that
        concatenates all layers' gradients."""
        sizes, where = [], {}
        for i in self.order:
            r, shape = self.ranks[i], self.shapes[i]
            where[i] = len(sizes)
            sizes += [r * shape.in_features, shape.out_features * r]
        pieces = self.flat.split(sizes)
        return [(pieces[where[i]].view(self.ranks[i], s.in_features), pieces[where[i] + 1].view(s.out_features, self.ranks[i]))
                for i, s in enumerate(self.shapes)]

    def _key(self, i: int) -> tuple[int, int, int]:
        return self.shapes[i].in_features, self.shapes[i].out_features, self.ranks[i]

    def groups(self) -> Iterator[ShapeGroup]:
        """Batched views over runs of equal-shape layers."""
        for _, run in itertools.groupby(self.order, key=self._key):
            yield self._group(list(run))

    def _group(self, layers: list[int]) -> ShapeGroup:
        shape, r = self.shapes[layers[0]], self.ranks[layers[0]]
        n, m, stride = shape.in_features, shape.out_features, r * (shape.in_features + shape.out_features)
        block = self.flat[self.offsets[layers[0]]:self.offsets[layers[0]] + stride * len(layers)].view(len(layers), stride)
        scales = torch.tensor([self.scales[i] for i in layers], dtype=self.flat.dtype, device=self.flat.device)
        return ShapeGroup(layers, block[:, :r * n].view(-1, r, n), block[:, r * n:].view(-1, m, r), scales)

    def delta_sq_norms(self) -> Tensor:
        """||s_i B_i A_i||_F^2 for every layer, from r x r Gram products (never forms m x n)."""
        out = torch.empty(len(self.shapes), dtype=self.flat.dtype, device=self.flat.device)
        for g in self.groups():
            gram = (g.B.transpose(1, 2) @ g.B) * (g.A @ g.A.transpose(1, 2))
            out[g.layers] = g.scales.square() * gram.sum(dim=(1, 2))
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

    def delta(self, i: int, x: Tensor) -> Tensor:
        """The low-rank update of layer i applied to x: s1 B1 A1 x (+ s2 B2 A2 x), one matmul pair."""
        A, B = self._factors(0, i)
        B = B * self.primary.scales[i]
        if self.aux is not None and self.aux_active:
            A2, B2 = self._factors(1, i)
            A = torch.cat([A, A2])
            B = torch.cat([B, B2 * self.aux.scales[i]], dim=1)
        return low_rank_product(x, A, B)

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
