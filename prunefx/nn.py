"""Modules that rewrites emit when a torch.nn module cannot represent the pruned shape.

``MultiheadAttention``: ``torch.nn.MultiheadAttention`` ties the attention width to the model
width (``num_heads * head_dim == embed_dim``); after head pruning they differ. This module
computes the same function as ``torch.nn.MultiheadAttention`` (packed q/k/v projection,
scaled dot-product attention per head, output projection) with any number of heads, keeping
the parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
``out_proj.bias``) so state_dict keys do not change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiheadAttention", "LEAF_MODULES"]


class MultiheadAttention(nn.Module):
    def __init__(
        self, embed_dim: int, num_heads: int, head_dim: int, *, batch_first: bool = False, dropout: float = 0.0,
        bias: bool = True, kept_heads: torch.Tensor | None = None, device=None, dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **kw)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        # which heads of the original module these are: selects per-head attention masks
        self.register_buffer("kept_heads", kept_heads if kept_heads is not None else torch.arange(num_heads), persistent=False)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, B, E) from here on
        length, batch, _ = query.shape
        source = key.shape[0]
        h, d = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).reshape(length, batch, h, d).permute(1, 2, 0, 3)
        k = F.linear(key, w_k, b_k).reshape(source, batch, h, d).permute(1, 2, 0, 3)
        v = F.linear(value, w_v, b_v).reshape(source, batch, h, d).permute(1, 2, 0, 3)
        scores = (q / math.sqrt(d)) @ k.transpose(-2, -1)  # (B, h, L, S)
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (B * original heads, L, S)
                attn_mask = attn_mask.reshape(batch, -1, length, source)[:, self.kept_heads]
            scores = _add_mask(scores, attn_mask)
        if is_causal and attn_mask is None:
            causal = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            scores = _add_mask(scores, key_padding_mask[:, None, None, :])
        attn = F.dropout(torch.softmax(scores, dim=-1), p=self.dropout, training=self.training)
        out = (attn @ v).permute(2, 0, 1, 3).reshape(length, batch, h * d)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights


def _add_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


LEAF_MODULES: tuple[type, ...] = (MultiheadAttention,)
