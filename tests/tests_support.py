"""Helpers shared by tests and the worker scripts they launch."""

from pathlib import Path

import torch

from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape
from bilora_dist.checkpoint import save_checkpoint
from bilora_dist.engines.base import Engine

# AdamW divides by sqrt(v) + eps: in the few entries whose gradient is near zero, float-order noise becomes update
# noise of up to ~lr (a 1-ulp change of every base weight moves single adapter entries by 4e-4 after 6 steps).
# A trained tensor is therefore compared as a whole (relative Frobenius error) and by its bulk (median error),
# never element by element; a 1-ulp change of the base reaches 2.4e-4 and 2.4e-6 of them.
TRAINED_RTOL, TRAINED_BULK_RTOL = 1e-3, 1e-5


def random_branch(seed: int = 7) -> Branch:
    """Twelve layers of four shapes with decaying spectra, scale 2."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [LayerShape(f"l{i}", (24, 40, 16)[i % 3], (32, 16)[i % 2]) for i in range(12)]
    pairs = [(torch.randn(8, s.in_features, generator=gen) * torch.logspace(0, -2, 8)[:, None],
              torch.randn(s.out_features, 8, generator=gen)) for s in shapes]
    return Branch.from_factors(shapes, pairs, [2.0] * len(shapes))


def fixture_bank() -> AdapterBank:
    """A Bi-LoRA bank over three small layers with random primary and auxiliary factors."""
    shapes = [LayerShape(f"l{i}", 12, 10) for i in range(3)]
    gen = torch.Generator().manual_seed(3)
    primary = Branch(shapes, [4] * 3, [2.0] * 3, torch.randn(3 * 4 * 22, generator=gen))
    aux = Branch(shapes, [2] * 3, [1.0] * 3, torch.randn(3 * 2 * 22, generator=gen))
    return AdapterBank(shapes, primary, aux)


def checkpoint_fixture(out, step: int, keep_last: int = 0, return_state: bool = False):
    """Save a checkpoint of a fixture bank after one AdamW step, as the trainer would at `step`."""
    bank = fixture_bank()
    optimizer = torch.optim.AdamW([bank.primary.flat, bank.aux.flat], lr=1e-2)
    bank.primary.flat.grad = torch.ones_like(bank.primary.flat)
    bank.aux.flat.grad = torch.ones_like(bank.aux.flat)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"step": step, "consumed": 8 * step, "total_steps": 10, "global_batch": 8, "world_size": 1,
             "squeeze_history": [], "identity": {}}
    save_checkpoint(Path(out), state, bank, optimizer, scheduler, "", Engine(), keep_last)
    return (bank, optimizer) if return_state else None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius, in float64): float-order noise scales with the tensor, not the entry."""
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm())


def assert_trained_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Tensors trained by AdamW agree up to summation order: each within TRAINED_RTOL relative Frobenius error,
    and its median entry error within TRAINED_BULK_RTOL of its median magnitude (a whole layer off by 1e-3 fails)."""
    assert got.keys() == want.keys()
    for key, ref in want.items():
        ref = ref.detach().double()
        error = relative_error(got[key], ref)
        bulk = float((got[key].detach().double() - ref).abs().median() / ref.abs().median())
        assert error < TRAINED_RTOL and bulk < TRAINED_BULK_RTOL, f"{key}: relative error {error:.2e}, bulk {bulk:.2e}"
