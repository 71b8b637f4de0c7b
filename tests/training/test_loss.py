"""The chunked head loss against full fp32 logits + F.cross_entropy, and what it keeps for backward.

The 2-rank equality (ZeRO-3 and FSDP2 against one process, tied and untied heads, Gemma softcap) is
test_architectures.py::test_training_steps_match_one_process: its worker attaches the loss with 5-token chunks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, PretrainedConfig

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.data import IGNORE, Example, collate
from bilora_dist.training.loss import attach_head_loss, token_loss_sum
from tests_support import random_adapted_model, relative_error, tiny_llama_config

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def config(arch: str) -> PretrainedConfig:
    """Tiny configs: Llama with a tied and an untied head; Gemma-2 with a softcap that bends its logits
    (which are about 0.1 in a random model); Cohere, which rescales its logits after the head."""
    if arch == "llama-untied":
        cfg = tiny_llama_config(VOCAB)
        cfg.tie_word_embeddings = False
        return cfg
    return {"llama-tied": lambda: tiny_llama_config(VOCAB),
            "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=0.1),
            "cohere": lambda: CohereConfig(**COMMON, logit_scale=0.25, eos_token_id=2)}[arch]()


def adapted(arch: str):
    """A random frozen model of `arch` with a Bi-LoRA bank of random (nonzero) factors injected."""
    return random_adapted_model(config(arch))


def batch() -> dict:
    """Left padding, unsupervised prompts of different lengths and a masked span inside a completion."""
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (9, 14, 6)]
    labels = [[IGNORE] * 4 + ids[0][4:], [IGNORE] * 6 + ids[1][6:9] + [IGNORE] * 2 + ids[1][11:],
              [IGNORE] + ids[2][1:]]
    return collate([Example(i, lab) for i, lab in zip(ids, labels)], 0)


def reference_loss(model, b: dict) -> torch.Tensor:
    """Every position's fp32 logits, shifted by hand, summed cross-entropy."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                   use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def loss_and_grads(bank, loss_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`loss_fn()` and the gradients of every adapter factor (primary and auxiliary) it gives."""
    loss = loss_fn()
    loss.backward()
    grads = [branch.flat.grad.clone() for branch in bank.branches()]
    for branch in bank.branches():
        branch.flat.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [1, 7, 0])
@pytest.mark.parametrize("arch", ["llama-untied", "llama-tied", "gemma2"])
def test_loss_and_adapter_gradients_match_full_logits(arch, chunk):
    model, bank = adapted(arch)
    b = batch()
    assert 1 < b["logits_to_keep"] < b["input_ids"].shape[1]
    want, want_grads = loss_and_grads(bank, lambda: reference_loss(model, b))
    last = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1).logits

    head_loss = attach_head_loss(model, chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to full logits
        got, got_grads = loss_and_grads(bank, lambda: token_loss_sum(model, b)[0])
        with torch.no_grad():
            no_grad, tokens = token_loss_sum(model, b)
    assert head_loss.verified
    assert tokens == (b["labels"] != IGNORE).sum()
    assert float(got) == pytest.approx(float(want), rel=1e-5) and float(no_grad) == pytest.approx(float(want), rel=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert w.abs().max() > 0 and relative_error(g, w) < 1e-5
    # outside token_loss_sum the head is untouched: evaluation's accuracy pass reads real logits
    torch.testing.assert_close(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     logits_to_keep=1).logits, last, rtol=0, atol=0)


def test_a_model_that_rescales_its_logits_falls_back_to_full_logits_once():
    model, bank = adapted("cohere")
    b = batch()
    want, want_grads = loss_and_grads(bank, lambda: reference_loss(model, b))
    head_loss = attach_head_loss(model, 4)
    with pytest.warns(UserWarning, match="CohereForCausalLM post-processes its logits"):
        first = token_loss_sum(model, b)[0]
    assert head_loss.verified is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once
        got, got_grads = loss_and_grads(bank, lambda: token_loss_sum(model, b)[0])
    assert float(first.detach()) == float(got) == pytest.approx(float(want), rel=1e-5)
    assert all(relative_error(g, w) < 1e-5 for g, w in zip(got_grads, want_grads))


def largest_saved(loss_fn) -> int:
    """The largest number of elements of any tensor autograd saves while `loss_fn` runs."""
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return max(sizes)


def test_nothing_of_vocabulary_size_is_kept_for_backward():
    """A 128k-vocabulary head: the full-logits loss keeps logits (and the head's weight) for backward,
    the chunked loss nothing with a vocabulary dimension."""
    vocab = 128_000
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab)
    cfg.hidden_size, cfg.intermediate_size, cfg.tie_word_embeddings = 16, 32, False
    model = AutoModelForCausalLM.from_config(cfg).requires_grad_(False)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0, None, 1.0, 0)
    inject(model, bank)
    gen = torch.Generator().manual_seed(2)
    b = collate([Example(ids, ids) for ids in torch.randint(1, vocab, (2, 40), generator=gen).tolist()], 0)
    assert largest_saved(lambda: reference_loss(model, b)) >= vocab * 16
    attach_head_loss(model, 8)
    assert largest_saved(lambda: token_loss_sum(model, b)[0].backward()) < vocab
    assert bank.primary.flat.grad.abs().max() > 0
