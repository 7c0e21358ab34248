"""Modules that rewrites emit when a torch.nn module cannot represent the pruned shape.

``MultiheadAttention``: ``torch.nn.MultiheadAttention`` ties the attention width to the model
width (``num_heads * head_dim == embed_dim``); after head pruning they differ. This module
computes the same function as ``torch.nn.MultiheadAttention`` (packed q/k/v projection,
scaled dot-product attention per head, output projection) with any number of heads, keeping
the parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
``out_proj.bias``) so state_dict keys do not change.

``shifted_window_attention``: Swin's windowed attention with the same arguments as
torchvision's function, except that the attention width is taken from ``qkv_weight``
(``3 * num_heads * head_dim`` rows) instead of being assumed equal to the stream width, so
heads and the stream can be pruned independently. Unpruned, it computes what torchvision's
computes (``tests/test_transformers.py`` checks both against each other).

``BranchConstant``: what a residual branch computes once every channel feeding it is gone
(PruneTrain's branch removal, ``prunefx/train/branches.py``): a constant, which can differ
between training (BatchNorm normalises a constant to its shift) and evaluation (running
statistics). A leaf of the trace with its own channel rule (its values are sliced with the
stream they join).

``static_sizes``: the check the export front-end puts after a graph's inputs, where
torch.export kept sizes static; ``autocast_device_type``: the device type an inlined autocast
block of an export graph runs under (``prunefx/frontends/export.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from prunefx.errors import TraceError

__all__ = ["MultiheadAttention", "BranchConstant", "shifted_window_attention", "LEAF_MODULES"]


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


def _window_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """-100 between tokens of one window that came from different regions of the shifted map."""
    region = like.new_zeros((pad_h, pad_w))
    count = 0
    for h0, h1 in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[h0:h1, w0:w1] = count
            count += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1]).permute(0, 2, 1, 3)
    region = region.reshape(-1, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def shifted_window_attention(
    input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor, relative_position_bias: torch.Tensor,
    window_size: list[int], num_heads: int, shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None, logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    batch, height, width, _ = input.shape
    inner = qkv_weight.shape[0] // 3  # num_heads * head_dim: independent of the stream width
    head_dim = inner // num_heads
    pad_r = (window_size[1] - width % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - height % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, channels = x.shape
    shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    rows, cols = pad_h // window_size[0], pad_w // window_size[1]
    tokens = window_size[0] * window_size[1]
    x = x.view(batch, rows, window_size[0], cols, window_size[1], channels).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch * rows * cols, tokens, channels)
    if logit_scale is not None and qkv_bias is not None:  # v2: no bias on the keys
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner : 2 * inner]), qkv_bias[2 * inner :]])
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.size(0), tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # v2: cosine attention with a learnt temperature per head
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _window_mask(pad_h, pad_w, window_size, shift, x)
        attn = attn.view(batch, rows * cols, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.size(0), tokens, inner)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    out_channels = x.shape[-1]
    x = x.view(batch, rows, cols, window_size[0], window_size[1], out_channels).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, pad_h, pad_w, out_channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


torch.fx.wrap("shifted_window_attention")  # an opaque call in traced graphs, like torchvision's


class BranchConstant(nn.Module):
    """Returns ``train_value`` in training mode and ``eval_value`` in evaluation mode (the
    same buffer when they agree); both broadcast against the tensor they replace."""

    def __init__(self, train_value: torch.Tensor, eval_value: torch.Tensor, *, modal: bool | None = None) -> None:
        super().__init__()
        self.register_buffer("eval_value", eval_value.detach().clone())
        if modal is False or (modal is None and torch.equal(train_value, eval_value)):
            self.train_value = None
        else:
            self.register_buffer("train_value", train_value.detach().clone())

    def reset_parameters(self) -> None:
        """Training from scratch (``prunefx.reinit``): a branch that does not exist adds nothing."""
        for value in (self.eval_value, self.train_value):
            if value is not None:
                value.zero_()

    def forward(self) -> torch.Tensor:
        if self.training and self.train_value is not None:
            return self.train_value
        return self.eval_value

    def extra_repr(self) -> str:
        return f"shape={tuple(self.eval_value.shape)}, modal={self.train_value is not None}"


LEAF_MODULES: tuple[type, ...] = (MultiheadAttention, BranchConstant)


@torch.fx.node.has_side_effect
def static_sizes(model: str, names: tuple[str, ...], static: tuple[tuple[int | None, ...] | None, ...], *inputs: Any) -> None:
    """Raise a TraceError when an input's size differs from the capture's where the graph
    holds it static (``None``: a dynamic dim). Not checked while torch.export or
    ``torch.compile`` trace the graph (ONNX export): they keep their own guards."""
    if torch.compiler.is_compiling():
        return
    for name, sizes, x in zip(names, static, inputs, strict=True):
        if sizes is None or not isinstance(x, torch.Tensor):
            continue
        if x.dim() != len(sizes) or any(s is not None and s != n for s, n in zip(sizes, x.shape, strict=True)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in sizes) + ")"
            raise TraceError(
                f"{model} was captured by torch.export with static sizes: {name} must have shape {want} "
                f"(* is any size), got {tuple(x.shape)}. What to do: call it at those sizes, or trace and "
                "reconfigure with example inputs of the sizes you will use (image sizes are always static)."
            )


def autocast_device_type(x: torch.Tensor, captured: str) -> str:
    """The device type of an autocast block in an export graph, which torch.export wrote down
    as the capture's (``torch.autocast(x.device.type, enabled=False)``, EfficientViT's float32
    attention, became ``"cpu"``): the input's, so the block follows the model to a GPU, or the
    captured one where autocast does not exist (the meta device)."""
    kind = x.device.type
    return kind if torch.amp.is_autocast_available(kind) else captured
