"""`packed` attention: packed rows reach the kernel as documents, never through a dense block-causal mask.

Registered with transformers' attention and mask interfaces under PACKED. A batch without a padding mask (what
`collate_packed` gives) is cut into its documents where the position ids restart at 0 (across all rows at once:
a row always starts a document). On CUDA in half precision they go to torch's variable-length flash attention
(`torch.nn.attention.varlen.varlen_attn`) in one call; elsewhere each document goes to SDPA with `is_causal`,
which needs no mask either. A padded batch (evaluation) keeps transformers' SDPA path, mask and all.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED = "packed"
UNSUPPORTED = ("sliding_window", "softcap", "s_aux")  # attention variants the document path does not compute


def packed_supported(config: Any) -> bool:
    """Whether every attention layer of `config` is plain causal attention (no sliding window, soft cap or sinks)."""
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
        getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True))
    return not sliding and getattr(config, "attn_logit_softcapping", None) is None and config.model_type != "gpt_oss"


def document_bounds(position_ids: Tensor) -> Tensor:
    """Cumulative offsets (int32, N + 1) of the documents in the flattened rows: each starts at a position id 0."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def _varlen(query: Tensor, key: Tensor, value: Tensor, bounds: Tensor, scaling: float | None) -> Tensor | None:
    """torch's varlen flash attention on (tokens, heads, dim), causal per document; None where it cannot run."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    longest = int((bounds[1:] - bounds[:-1]).max())
    if query.shape[1] != key.shape[1] and "enable_gqa" not in inspect.signature(varlen_attn).parameters:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
    return varlen_attn(query, key, value, bounds, bounds, longest, longest, scale=scaling, window_size=(-1, 0), **extra)


def packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Causal attention within each document of (batch, heads, seq, dim) q/k/v; output (batch, seq, heads, dim)."""
    if attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout or any(kwargs.get(name) is not None for name in UNSUPPORTED):
        raise NotImplementedError(f"{PACKED} attention computes plain causal attention without dropout; this "
                                  f"model asks for {[n for n in UNSUPPORTED if kwargs.get(n) is not None] or 'dropout'}")
    batch, heads, seq, dim = query.shape
    positions = kwargs.get("position_ids")
    positions = positions.expand(batch, seq) if positions is not None else torch.arange(seq).expand(batch, seq)
    bounds = document_bounds(positions.to(query.device))
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value))
    out = _varlen(q, k, v, bounds, scaling)
    if out is None:
        gqa = q.shape[1] != k.shape[1]
        out = torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                        v[a:b].transpose(0, 1), is_causal=True, scale=scaling,
                                                        enable_gqa=gqa).transpose(0, 1)
                         for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())])
    return out.reshape(batch, seq, heads, dim), None


def packed_mask(**kwargs: Any) -> Tensor | None:
    """No mask for a batch without padding (documents come from the position ids); SDPA's mask otherwise."""
    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, packed_mask)
