"""The compression operator against dense SVDs, and the post-hoc tool against PEFT."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
from safetensors.torch import save_file

from bilora_dist.adapters.bank import Branch, LayerShape
from bilora_dist.squeeze import assign_layers, energy_rank, factored_svd, randomized_svd, squeeze_branch
from tests_support import ROOT, random_branch, relative_error, run_cmd, run_ok, two_ranks

# the fp32 factored SVD rebuilds s·BA to a few float32 ulps of ||s·BA|| (7e-7 observed, any thread count)
FP32_RTOL = 1e-5


def decaying_factors(m: int, n: int, r: int, gen: torch.Generator, deficient: int = 0,
                     dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x n), B (m x r) whose product has singular values ~ 0.6^i; `deficient` zeroes that many directions."""
    Qb, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=dtype))
    Qa, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=dtype))
    s = 0.6 ** torch.arange(r, dtype=dtype)
    if deficient:
        s[r - deficient:] = 0
    mix = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=dtype))[0]
    return (mix @ (s[:, None] * Qa.T)), (Qb @ mix.T) * 3.0


def dense(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return s * B @ A


def truncated(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


@pytest.mark.parametrize("deficient", [0, 5])
def test_factored_path_equals_dense_truncated_svd(deficient):
    gen = torch.Generator().manual_seed(0)
    layers = [decaying_factors(48, 40, 12, gen, deficient) for _ in range(3)]
    A = torch.stack([a for a, _ in layers])
    B = torch.stack([b for _, b in layers])
    scales = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    found = factored_svd(A, B, scales)
    for layer in range(3):
        M = dense(A[layer], B[layer], float(scales[layer]))
        torch.testing.assert_close(found.S[layer], torch.linalg.svdvals(M)[:12], rtol=0, atol=1e-10 * float(M.norm()))
        for k in (1, 4, 7):
            approx = found.U[layer, :, :k] @ torch.diag(found.S[layer, :k]) @ found.V[layer, :, :k].T
            assert float((approx - truncated(M, k)).norm() / truncated(M, k).norm()) < 1e-6


def test_factored_svd_splits_the_batch_over_threads_each_matrix_single_threaded(monkeypatch):
    """Issue 31: LAPACK's threaded QR of a tall, thin factor is slower than one thread and stalls when another
    process holds a core; the batch goes to the threads in shares, each factorised on one thread, so the result
    is the one-thread result bit for bit and the thread count is restored."""
    gen = torch.Generator().manual_seed(4)
    A, B = torch.randn(6, 8, 40, generator=gen), torch.randn(6, 48, 8, generator=gen)
    scales = torch.linspace(0.5, 2.0, 6)
    calls, geqrf = [], torch.geqrf
    monkeypatch.setattr(torch, "geqrf", lambda x: (calls.append((torch.get_num_threads(), x.shape[0])), geqrf(x))[1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = factored_svd(A, B, scales, k=3)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = factored_svd(A, B, scales, k=3)
    finally:
        torch.set_num_threads(threads)
    assert sorted(calls[:4]) == [(1, 3)] * 4 and calls[4:] == [(1, 6)] * 2  # 2 shares of 3, then the whole batch
    for got, want in zip((two.U, two.S, two.V), (one.U, one.S, one.V)):
        assert torch.equal(got, want)


def test_squeeze_branch_builds_the_new_factors_once_per_shape_group(monkeypatch):
    """Issue 31: the new factors of a group of equal-shape layers come from one batched call, not one per layer."""
    import bilora_dist.squeeze.branch as squeeze_module

    calls, balanced = [], squeeze_module.balanced_factors
    monkeypatch.setattr(squeeze_module, "balanced_factors", lambda *a: (calls.append(a[1].shape), balanced(*a))[1])
    branch = random_branch()
    new, _ = squeeze_branch(branch, 3)
    assert len(calls) == len(list(branch.groups())) == 6 and new.ranks == [3] * 12  # 12 layers, 6 shapes


def test_squeeze_branch_reproduces_truncated_dense_delta_and_keeps_scale():
    gen = torch.Generator().manual_seed(1)
    shapes = [LayerShape(f"l{i}", 40, 48 if i % 2 else 32) for i in range(4)]
    pairs = [decaying_factors(s.out_features, s.in_features, 10, gen, deficient=3 * (i == 2), dtype=torch.float32)
             for i, s in enumerate(shapes)]
    branch = Branch.from_factors(shapes, pairs, [2.0, 2.0, 0.5, 2.0])
    new, reports = squeeze_branch(branch, 4)
    assert new.ranks == [4] * 4 and new.scales == branch.scales
    for i in range(4):
        M = dense(*[t.double() for t in pairs[i]], branch.scales[i])
        A, B = new.factors(i)
        got = dense(A.double(), B.double(), new.scales[i])
        assert float((got - truncated(M, 4)).norm() / M.norm()) < FP32_RTOL
        S = torch.linalg.svdvals(M)
        assert reports[i].kept_energy == pytest.approx(float(S[:4].square().sum() / S.square().sum()), rel=1e-6)
        # balanced split: B' and A' carry the same singular values
        torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_keep_alpha_policy_moves_the_scale_into_s_and_keeps_the_delta():
    gen = torch.Generator().manual_seed(5)
    shapes = [LayerShape("a", 40, 32), LayerShape("b", 24, 48)]
    pairs = [decaying_factors(s.out_features, s.in_features, 10, gen, dtype=torch.float32) for s in shapes]
    branch = Branch.from_factors(shapes, pairs, [2.0, 0.5])
    new, _ = squeeze_branch(branch, 4, keep_alpha=True)
    assert new.scales == pytest.approx([2.0 * 10 / 4, 0.5 * 10 / 4])  # alpha' = s'·k = s·r = alpha
    for i in range(2):
        M = dense(*[t.double() for t in pairs[i]], branch.scales[i])
        A, B = new.factors(i)
        assert float((dense(A.double(), B.double(), new.scales[i]) - truncated(M, 4)).norm() / M.norm()) < FP32_RTOL


def test_squeeze_to_the_same_rank_is_the_identity_on_each_layer():
    """The factors are re-factorised (rotated within their rank-6 subspace); each layer's s·BA is unchanged."""
    gen = torch.Generator().manual_seed(2)
    shapes = [LayerShape("a", 24, 16), LayerShape("b", 24, 16), LayerShape("c", 16, 40)]
    pairs = [(torch.randn(6, s.in_features, generator=gen), torch.randn(s.out_features, 6, generator=gen))
             for s in shapes]
    branch = Branch.from_factors(shapes, pairs, [16 / 6] * 3)
    new, _ = squeeze_branch(branch, 6)
    assert new.ranks == branch.ranks and new.scales == branch.scales
    for i in range(len(shapes)):
        want = dense(*[t.detach().double() for t in branch.factors(i)], branch.scales[i])
        assert relative_error(dense(*[t.double() for t in new.factors(i)], new.scales[i]), want) < FP32_RTOL
        # dropping the weakest of the 6 directions would miss by its share of ||s·BA||, far above the tolerance
        assert float(torch.linalg.svdvals(want)[5] / want.norm()) > 1000 * FP32_RTOL


def test_energy_threshold_picks_the_smallest_sufficient_rank():
    S = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # energies 9, 4, 1 of 14: 9/14 = .643, 13/14 = .929; uniform: .25 per value
    assert energy_rank(S, 0.9, 4) == [2, 4]
    assert energy_rank(S, 0.6, 4) == [1, 3]
    assert energy_rank(S, 0.6, 2) == [1, 2]


def test_randomized_svd_is_near_optimal_on_a_decaying_spectrum():
    gen = torch.Generator().manual_seed(3)
    m, n, k = 300, 200, 16
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    S = 0.85 ** torch.arange(n, dtype=torch.float64)
    M = (U * S) @ V.T
    found = randomized_svd(M[None], k, oversample=10, power_iters=2, generator=gen)
    err = float((M - found.U[0] @ torch.diag(found.S[0]) @ found.V[0].T).norm())
    optimal = float(S[k:].square().sum().sqrt())
    assert (err - optimal) / optimal < 1e-4


def test_layer_assignment_balances_cost():
    shapes = [LayerShape(str(i), 64 * (1 + i % 3), 64) for i in range(10)]
    branch = Branch(shapes, [8] * 10, [1.0] * 10, torch.zeros(sum(8 * (s.in_features + 64) for s in shapes)))
    owner = assign_layers(branch, 2)
    cost = [sum((s.in_features + 64) for s, o in zip(shapes, owner) if o == rank) for rank in (0, 1)]
    assert set(owner) == {0, 1} and abs(cost[0] - cost[1]) <= 192


def test_cli_squeezed_adapter_loads_in_peft_with_the_truncated_delta(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(4)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    tensors, deltas, r, alpha = {}, {}, 8, 16.0
    for name in names:
        lin = model.get_submodule(name)
        A = torch.randn(r, lin.in_features, generator=gen) * 0.3
        B = torch.randn(lin.out_features, r, generator=gen) * torch.logspace(0, -3, r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
        deltas[name] = (alpha / r) * B.double() @ A.double()
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "base_model_name_or_path": "",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    out = tmp_path / "squeezed"
    run_ok([sys.executable, "launch/squeeze.py", "--adapter", str(src), "--rank", "3", "--out", str(out),
            "--energy", "0.999"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    ranks = set()
    for name in names:
        layer = peft_model.base_model.model.get_submodule(name)
        ranks.add(layer.r["default"])
        k = layer.r["default"]
        want = truncated(deltas[name], k)
        got = layer.get_delta_weight("default").double()
        assert float((got - want).norm() / deltas[name].norm()) < 1e-5
        S = torch.linalg.svdvals(deltas[name])
        assert float(S[:k].square().sum() / S.square().sum()) >= 0.999 or k == 3
    assert max(ranks) <= 3
    # keeping alpha instead of the scale: same deltas, lora_alpha unchanged
    run_ok([sys.executable, "launch/squeeze.py", "--adapter", str(src), "--rank", "3", "--out",
            str(tmp_path / "keep-alpha"), "--alpha-policy", "keep-alpha"])
    assert json.loads((tmp_path / "keep-alpha" / "adapter_config.json").read_text())["lora_alpha"] == alpha
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           str(tmp_path / "keep-alpha"))
    for name in names:
        got = peft_model.base_model.model.get_submodule(name).get_delta_weight("default").double()
        assert float((got - truncated(deltas[name], 3)).norm() / deltas[name].norm()) < 1e-5
    # a second squeeze onto an existing directory is refused and leaves it intact
    before = (out / "adapter_model.safetensors").read_bytes()
    proc = run_cmd([sys.executable, "launch/squeeze.py", "--adapter", str(src), "--rank", "2", "--out", str(out)])
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --out") and len(proc.stderr.splitlines()) == 1
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_cli_extracts_a_lora_from_a_full_finetune(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from bilora_dist.export.peft_io import read_peft_adapter

    gen = torch.Generator().manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.add_(torch.randn(p.shape[0], 4, generator=gen) @ torch.randn(4, p.shape[1], generator=gen) * 0.01)
    model.save_pretrained(tmp_path / "ft")
    out = tmp_path / "extracted"
    run_ok([sys.executable, "launch/squeeze.py", "--delta", str(tiny_model_dir), str(tmp_path / "ft"), "--rank", "4",
            "--out", str(out)])
    branch, _ = read_peft_adapter(out)
    assert len(branch.shapes) == 14
    ft = dict(model.named_parameters())
    for i, shape in enumerate(branch.shapes):
        A, B = branch.factors(i)
        delta = ft[shape.name + ".weight"].detach() - base[shape.name + ".weight"]
        torch.testing.assert_close(branch.scales[i] * B @ A, delta, rtol=0, atol=1e-5)  # a rank-4 delta: exact


def test_two_rank_compression_gives_the_one_rank_factors_bit_for_bit(tmp_path):
    run_ok(two_ranks("torchrun") + [str(ROOT / "tests" / "squeeze_worker.py"), str(tmp_path)], cwd=ROOT / "tests")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: bit-for-bit holds for the same code path on the same threads
    try:
        one, reports = squeeze_branch(random_branch(), 3, energy=0.95)
    finally:
        torch.set_num_threads(threads)
    assert len(set(one.ranks)) > 1  # the energy threshold made ranks heterogeneous
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["ranks"] == one.ranks and got["kept"] == [r.kept_energy for r in reports]
        assert torch.equal(got["flat"], one.flat.detach())


def test_schedules_parse_into_compression_events():
    from bilora_dist.squeeze.schedule import parse_squeeze

    s = parse_squeeze("in:64->8/3", 400, 64, 100)
    assert s.events == ((100, 32), (200, 16), (300, 8))
    assert parse_squeeze("in:64->8/2", 300, 64, 20, "linear").events == ((100, 36), (200, 8))
    assert parse_squeeze("cont:16->4@30", 100, 16, 20).events == ((30, 4),)
    assert parse_squeeze("post:16->4", 100, 16, 20).events == ((100, 4),)


@pytest.mark.parametrize("spec, message", [
    ("in:64->8/3", "each must last at least --squeeze-min-stage 100"),
    ("cont:64->8@350", "each must last at least"),
    ("in:32->8/3", "starts at rank 32 but --rank is 64"),
    ("post:64->64", "target rank must be between 1 and 63"),
    ("in:64->8", "expected post:R->K"),
    ("squash:64->8", "expected post:R->K"),
])
def test_bad_schedules_are_refused_with_one_line(spec, message):
    from bilora_dist.errors import UserError
    from bilora_dist.squeeze.schedule import parse_squeeze

    with pytest.raises(UserError, match=re.escape(message)):
        parse_squeeze(spec, 399, 64, 100)


@pytest.mark.parametrize("optimizer_state", ["reset", "project"])
def test_training_with_a_squeeze_exports_the_compressed_rank(tiny_model_dir, small_data, tmp_path, optimizer_state):
    from peft import LoraConfig

    from bilora_dist.config.train import parse_config
    from bilora_dist.recipe.train import train

    out = tmp_path / "run"
    train(parse_config(["--model", str(tiny_model_dir), "--data", str(small_data[0]), "--eval-data",
                        str(small_data[1]), "--max-steps", "4", "--micro-batch-size", "4", "--rank", "8",
                        "--squeeze", "cont:8->3@2", "--squeeze-min-stage", "2", "--squeeze-optimizer",
                        optimizer_state, "--output-dir", str(out)]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in rows if "loss" in r] == [8, 3, 3, 3]
    event = next(r for r in rows if "squeeze_rank" in r)
    assert event["step"] == 2 and 0 < event["kept_energy_min"] <= event["kept_energy"] <= 1
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert LoraConfig.from_pretrained(str(out / "adapter")).r == 3


def _linear_loss_grads(branch: Branch, G: list[torch.Tensor]) -> torch.Tensor:
    """d/d(flat) of L = sum_i <G_i, s_i B_i A_i>: the factor gradients s BᵀG and s G Aᵀ, by autograd."""
    view = Branch(branch.shapes, branch.ranks, branch.scales, branch.flat.detach().clone())
    sum((g * dense(*view.factors(i), view.scales[i])).sum() for i, g in enumerate(G)).backward()
    return view.flat.grad


def test_projected_moments_are_the_new_gradients_after_a_lossless_squeeze():
    """Rank-3 updates stored in rank-6 factors, squeezed to rank 3 (ΔW unchanged), with moments m = g and
    v = g² (one step of plain accumulation): the projected first moments equal the gradients of the new factors
    (1e-6 relative, both A and B); second moments stay non-negative, and are exact when the new factors are the
    old ones selected (factors already in SVD form: S and T pick coordinates)."""
    from bilora_dist.squeeze.schedule import _project_moments

    gen = torch.Generator().manual_seed(11)
    shapes = [LayerShape(f"l{i}", 24, 16) for i in range(3)]
    layers = [decaying_factors(16, 24, 6, gen, deficient=3) for _ in shapes]
    old = Branch.from_factors(shapes, layers, [0.5, 2.0, 1.0])
    G = [torch.randn(16, 24, generator=gen, dtype=torch.float64) for _ in shapes]
    grad = _linear_loss_grads(old, G)
    new, _ = squeeze_branch(old, 3)
    state = _project_moments(old, new, {"step": torch.tensor(1.0), "exp_avg": grad, "exp_avg_sq": grad.square()})
    want = _linear_loss_grads(new, G)
    for i in range(len(shapes)):
        for got_part, want_part in zip(Branch(shapes, new.ranks, new.scales, state["exp_avg"]).factors(i),
                                       Branch(shapes, new.ranks, new.scales, want).factors(i)):
            assert relative_error(got_part, want_part) <= 1e-6
    assert (state["exp_avg_sq"] >= 0).all() and state["step"] == 1

    svd_form = new  # balanced SVD factors: squeezing them again keeps their leading columns (S, T selections)
    grad = _linear_loss_grads(svd_form, G)
    new, _ = squeeze_branch(svd_form, 2)
    state = _project_moments(svd_form, new, {"exp_avg": grad, "exp_avg_sq": grad.square()})
    torch.testing.assert_close(state["exp_avg_sq"], _linear_loss_grads(new, G).square(), rtol=1e-6, atol=1e-12)


def _moe_branch() -> Branch:
    """Two linear layers and two fused expert projections of 3 experts, rank 6, decaying spectra."""
    gen = torch.Generator().manual_seed(11)
    shapes = [LayerShape("dense0", 20, 24), LayerShape("experts.gate_up_proj", 20, 16, 3),
              LayerShape("dense1", 20, 24), LayerShape("experts.down_proj", 8, 20, 3)]
    pairs = []
    for s in shapes:
        lead = (s.experts,) if s.experts else ()
        pairs.append((torch.randn(*lead, 6, s.in_features, generator=gen) * torch.logspace(0, -2, 6)[:, None],
                      torch.randn(*lead, s.out_features, 6, generator=gen)))
    return Branch.from_factors(shapes, pairs, [2.0, 0.5, 2.0, 1.0])


def test_expert_projections_squeeze_per_expert_with_one_rank_per_tensor():
    branch = _moe_branch()
    new, reports = squeeze_branch(branch, 4)
    for i, s in enumerate(branch.shapes):
        A, B = (t.double() for t in branch.factors(i))
        A_new, B_new = (t.double() for t in new.factors(i))
        for e in range(s.copies):
            pick = (lambda t: t[e]) if s.experts else (lambda t: t)
            M = branch.scales[i] * pick(B) @ pick(A)
            got = new.scales[i] * pick(B_new) @ pick(A_new)
            assert float((got - truncated(M, 4)).norm() / M.norm()) < FP32_RTOL
    # energy-driven: one rank per tensor, the smallest keeping the energy of all its experts together
    new, reports = squeeze_branch(branch, 6, energy=0.99)
    for i, s in enumerate(branch.shapes):
        A, B = (t.double() for t in branch.factors(i))
        spectra = torch.linalg.svdvals(branch.scales[i] * B @ A).reshape(s.copies, -1)[:, :6]
        energy = spectra.square().sum(0).cumsum(0) / spectra.square().sum()
        k = int((energy < 0.99 - 1e-12).sum()) + 1
        assert new.ranks[i] == k and reports[i].kept_energy == pytest.approx(float(energy[k - 1]), rel=1e-5)
    assert len(set(new.ranks)) > 1


def test_cli_squeezes_a_peft_moe_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
    from bilora_dist.export.peft import save_peft_adapter
    from bilora_dist.export.peft_io import read_peft_adapter
    from tests_support import tiny_moe_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_moe_config("qwen3_moe", 96)).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 8, 16.0, None, 1.0, 0)
    with torch.no_grad():
        bank.primary.flat.normal_(0, 0.1)
    save_peft_adapter(bank.primary, tmp_path / "src", ["k_proj", "o_proj", "q_proj", "v_proj"],
                      str(tmp_path / "base"), {})
    read, _ = read_peft_adapter(tmp_path / "src")
    by_name = {s.name: i for i, s in enumerate(read.shapes)}
    for i, s in enumerate(bank.primary.shapes):  # the PEFT layout reads back exactly
        assert read.shapes[by_name[s.name]] == s and read.scales[by_name[s.name]] == bank.primary.scales[i]
        assert all(torch.equal(a, b) for a, b in zip(read.factors(by_name[s.name]), bank.primary.factors(i)))
    run_ok([sys.executable, "launch/squeeze.py", "--adapter", str(tmp_path / "src"), "--rank", "3",
            "--out", str(tmp_path / "squeezed")])
    squeezed, _ = read_peft_adapter(tmp_path / "squeezed")
    for i, s in enumerate(squeezed.shapes):
        j = [t.name for t in bank.primary.shapes].index(s.name)
        A, B = (t.double() for t in bank.primary.factors(j))
        M = bank.primary.scales[j] * B @ A
        A3, B3 = (t.double() for t in squeezed.factors(i))
        got = squeezed.scales[i] * B3 @ A3
        want = torch.stack([truncated(m, 3) for m in M]) if s.experts else truncated(M, 3)
        assert float((got - want).norm() / M.norm()) < FP32_RTOL
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ours = build_bank(squeezed.shapes, 3, 6.0, None, 1.0, 0)
    ours.replace_branch("primary", squeezed)
    inject(model, ours)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "squeezed")
        torch.testing.assert_close(peft(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
