"""The adapter bank: layout, batched norms, gradient bucket and projection against dense references."""

from __future__ import annotations

import math

import torch

from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape

SHAPES = [LayerShape("a", 16, 24), LayerShape("b", 8, 8), LayerShape("c", 16, 24), LayerShape("d", 24, 16)]


def _branch(ranks=(4, 4, 4, 4), scales=(2.0, 0.5, 1.5, 1.0), seed=0, dtype=torch.float32) -> Branch:
    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(r, s.in_features, generator=g, dtype=dtype),
                torch.randn(s.out_features, r, generator=g, dtype=dtype))
               for s, r in zip(SHAPES, ranks)]
    return Branch.from_factors(SHAPES, factors, list(scales))


def test_factors_are_views_into_one_flat_parameter():
    branch = _branch()
    total = sum(4 * (s.in_features + s.out_features) for s in SHAPES)
    assert branch.flat.numel() == total
    A, B = branch.factors(2)
    with torch.no_grad():
        A.fill_(3.0)
    assert float(branch.factors(2)[0].sum()) == 3.0 * A.numel()
    assert A.data_ptr() >= branch.flat.data_ptr()


def test_groups_batch_equal_shapes_and_alias_the_flat_storage():
    branch = _branch()
    groups = {tuple(g.layers): g for g in branch.groups()}
    assert set(groups) == {(0, 2), (1,), (3,)}
    g = groups[(0, 2)]
    assert g.A.shape == (2, 4, 16) and g.B.shape == (2, 24, 4)
    torch.testing.assert_close(g.A[1], branch.factors(2)[0], rtol=0, atol=0)
    torch.testing.assert_close(g.B[0], branch.factors(0)[1], rtol=0, atol=0)


def test_delta_norms_equal_dense_frobenius_norms():
    branch = _branch(ranks=(4, 2, 3, 4))  # heterogeneous ranks split a shape group
    got = branch.delta_sq_norms()
    for i in range(len(SHAPES)):
        A, B = branch.factors(i)
        dense = (branch.scales[i] * B.double() @ A.double()).square().sum()
        assert math.isclose(float(got[i]), float(dense), rel_tol=1e-5)


def test_projection_puts_aux_on_the_rho_sphere_and_leaves_small_aux_alone():
    bank = AdapterBank(SHAPES, _branch(seed=1), _branch(seed=2))
    before = float(bank.aux.delta_sq_norms().sum().sqrt())
    reported = bank.project_aux(rho=0.1 * before)
    assert math.isclose(reported, before, rel_tol=1e-6)
    after = float(bank.aux.delta_sq_norms().sum().sqrt())
    assert math.isclose(after, 0.1 * before, rel_tol=1e-5)
    snapshot = bank.aux.flat.detach().clone()
    bank.project_aux(rho=10 * after)
    torch.testing.assert_close(bank.aux.flat.detach(), snapshot, rtol=0, atol=0)


def test_grad_bucket_views_accumulate_in_place():
    bank = AdapterBank(SHAPES, _branch(seed=1, dtype=torch.float64), _branch(seed=2, dtype=torch.float64))
    bucket = bank.bind_grad_bucket().flat
    ptr = bank.primary.flat.grad.data_ptr()
    x = torch.randn(5, 16, dtype=torch.float64)
    for _ in range(2):
        bank.delta(0, x).square().sum().backward()
    assert bank.primary.flat.grad.data_ptr() == ptr
    assert bucket.numel() == bank.primary.flat.numel() + bank.aux.flat.numel() + 2
    # reference: the same two backward passes on free tensors
    A1, B1 = (t.detach().clone().requires_grad_() for t in bank.primary.factors(0))
    A2, B2 = (t.detach().clone().requires_grad_() for t in bank.aux.factors(0))
    for _ in range(2):
        y = x @ (bank.primary.scales[0] * B1 @ A1 + bank.aux.scales[0] * B2 @ A2).T
        y.square().sum().backward()
    n = A1.numel()
    start = bank.primary.offsets[0]
    torch.testing.assert_close(bucket[start:start + n].view_as(A1), A1.grad)
    aux_start = bank.primary.flat.numel() + bank.aux.offsets[0]
    torch.testing.assert_close(bucket[aux_start + n:aux_start + n + B2.numel()].view_as(B2), B2.grad)


def test_primary_only_switches_the_aux_branch_off():
    bank = AdapterBank(SHAPES, _branch(seed=1), _branch(seed=2))
    x = torch.randn(3, 16)
    A1, B1 = bank.primary.factors(0)
    with bank.primary_only():
        torch.testing.assert_close(bank.delta(0, x), x @ (bank.primary.scales[0] * B1 @ A1).T)
    A2, B2 = bank.aux.factors(0)
    full = x @ (bank.primary.scales[0] * B1 @ A1 + bank.aux.scales[0] * B2 @ A2).T
    torch.testing.assert_close(bank.delta(0, x), full, rtol=1e-5, atol=1e-4)
