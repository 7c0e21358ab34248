"""The repeated blocks of a transformers model, one row each: what its attention and MLP
keep and which channel groups prune them (``Inspector.blocks``).

For a Hugging Face ``PreTrainedModel`` the per-node tables are long (an aten graph has
hundreds of nodes per layer) and say little about what matters when pruning it: how many
heads, KV heads and MLP channels each layer has, and which group removes them. A
``BlockRow`` says it per layer:

- ``heads``, ``kv_heads``, ``head_dim``, ``mlp_channels``, ``experts`` and
  ``expert_channels`` (a mixture of experts: how many, and their width): read from the layer's weights
  (``prunefx.transformers.layer_sizes``), so a pruned model shows what it keeps;
- ``attention`` / ``mlp``: the prunable groups whose every member lies in the layer and
  some member in its attention (MLP; for an MoE block, its experts) module, and ``slot``:
  what one channel of the attention group is (a head; under grouped-query attention a KV
  head with its query heads);
- ``params`` (the layer's parameters) and ``flops`` (the FLOPs of the nodes computed
  inside it: the export front-end records which module computed each node).

An encoder-decoder model (BART, T5, Whisper) gets a row per block of both stacks (a decoder
block's attention group is its self-attention's). Models without a ``config`` and a
``ModuleList`` of ``config.num_hidden_layers`` blocks get no rows. A model holding a
transformers model (a PEFT model, a wrapper) gets its rows, and a LoRA adapter's rank group
is not counted as an attention or MLP group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table
from torch import nn

from prunefx import peft
from prunefx.errors import PruneFxError
from prunefx.graph import PruneGraph
from prunefx.inspector.render import human, shorten
from prunefx.inspector.tables import GroupRow, LayerRow
from prunefx.tracing import transformers_models

__all__ = ["BlockRow", "block_rows", "blocks_table"]


@dataclass(frozen=True)
class BlockRow:
    """One repeated block (decoder or encoder layer) of a transformers model."""

    name: str  # the block's qualified name: "model.layers.0"
    heads: int | None  # query heads
    kv_heads: int | None  # key/value heads (== heads without grouped-query attention)
    head_dim: int | None
    mlp_channels: int | None  # the dense MLP's hidden width
    experts: int | None  # routed experts of a mixture-of-experts block
    expert_channels: int | None  # their hidden width (the same for every expert)
    attention: tuple[str, ...]  # prunable groups inside the attention module
    slot: str | None  # what one channel of the attention group is
    mlp: tuple[str, ...]  # prunable groups inside the MLP module
    params: int
    flops: int


def _under(path: str, module: str) -> bool:
    return module == path or module.startswith(path + ".")


def _inside(path: str, modules: Sequence[str]) -> bool:
    return bool(modules) and all(_under(path, m) for m in modules)


def _touches(path: str | None, modules: Sequence[str]) -> bool:
    return path is not None and any(_under(path, m) for m in modules)


def _slot(heads: int | None, kv: int | None, size: int) -> str:
    if heads is None or kv is None:
        return f"{size} channels"
    if size == kv and heads > kv:
        return f"a KV head with its {heads // kv} query heads"
    if size == heads:
        return "a head"
    return "a channel"


def block_rows(model: nn.Module, graph: PruneGraph, layers: Sequence[LayerRow], groups: Sequence[GroupRow]) -> tuple[BlockRow, ...]:
    """A ``BlockRow`` per repeated block of ``model`` (or of the transformers models it holds:
    a PEFT model's base, a wrapper's); empty for other models."""
    inner = transformers_models(model) or ([("", model)] if getattr(model, "config", None) is not None else [])
    if not inner:
        return ()
    owner = {n.name: path for n, path in graph.traced.owners.items()}
    node_owner = [(r, owner.get(r.name) or (r.target if r.op == "call_module" else None)) for r in layers]
    adapters = peft.adapter_modules(model)  # a LoRA rank is no attention or MLP group of the block
    prunable = [g for g in groups if g.prunable and not (g.modules and set(g.modules) <= adapters)]
    rows: list[BlockRow] = []
    for at, hf in inner:
        rows.extend(_rows_of(at, hf, node_owner, prunable))
    return tuple(rows)


def _rows_of(at: str, model: nn.Module, node_owner: list[tuple[LayerRow, str | None]], prunable: list[GroupRow]) -> list[BlockRow]:
    """The rows of one transformers model whose names start with ``at`` in the traced model."""
    if getattr(model, "config", None) is None:
        return []
    from prunefx.transformers.layers import (
        attention_modules,
        attention_of,
        decoder_layers,
        decoder_stack,
        experts_of,
        mlp_of,
        stack_sizes,
    )

    blocks = decoder_layers(model)
    if not blocks:
        return []
    blocks += decoder_stack(model)  # an encoder-decoder model's second stack
    try:
        sizes = stack_sizes(blocks)
    except PruneFxError:  # a layout the size records refuse: no per-block view
        return []
    rows = []
    for (path, layer), s in zip(blocks, sizes, strict=True):
        prefix = at + path
        attn, mlp, experts = attention_of(layer), mlp_of(layer), experts_of(layer)
        attns = [f"{prefix}.{n}" for n, _, _ in attention_modules(layer)]  # its self- (first) and cross-attention
        attn_path = f"{prefix}.{attn[0]}" if attn is not None else None
        if mlp is None and experts is not None:  # an MoE block: its groups are the experts'
            mlp_paths = [prefix + "." + next(n for n, m in layer.named_modules() if m is experts[0])]
        elif mlp is not None and mlp[0]:
            mlp_paths = [f"{prefix}.{mlp[0]}"]
        elif mlp is not None:  # the layer itself holds the MLP's projections (BART's fc1/fc2)
            mlp_paths = [p for p in (f"{prefix}.{n}" for n, _ in layer.named_children()) if not any(_under(p, a) for a in attns)]
        else:
            mlp_paths = []
        # a group of the block that reaches into its attention (MLP) module: BERT's heads also
        # span `attention.output.dense`, outside `attention.self`, and its MLP channels span
        # `intermediate` and `output`
        local = [g for g in prunable if _inside(prefix, g.modules)]
        attention = tuple(g.name for g in local if _touches(attn_path, g.modules))
        mlp_groups = tuple(g.name for g in local if any(_touches(p, g.modules) for p in mlp_paths)
                           and not any(_touches(a, g.modules) for a in attns))
        first = next((g for g in prunable if attention and g.name == attention[0]), None)
        rows.append(BlockRow(
            name=prefix, heads=s.num_attention_heads, kv_heads=s.num_key_value_heads, head_dim=s.head_dim,
            mlp_channels=s.intermediate_size, experts=int(experts[0].down_proj.shape[0]) if experts is not None else None,
            expert_channels=s.expert_intermediate_size, attention=attention,
            slot=_slot(s.num_attention_heads, s.num_key_value_heads, first.size) if first is not None else None,
            mlp=mlp_groups, params=sum(p.numel() for p in layer.parameters()),
            flops=sum(r.flops for r, path in node_owner if path is not None and (path == prefix or path.startswith(prefix + "."))),
        ))
    return rows


def _opt(n: int | None) -> str:
    return "-" if n is None else str(n)


def _local(block: str, groups: tuple[str, ...]) -> str:
    """Group names relative to their block ("self_attn.q_proj"), shortened."""
    names = [g[len(block) + 1:] if g.startswith(block + ".") else g for g in groups]
    return shorten(", ".join(names) or "-", 30)


def blocks_table(rows: Sequence[BlockRow], limit: int | None = None) -> Table:
    """The blocks as a rich Table."""
    shown = list(rows) if limit is None else list(rows)[:limit]
    slots = sorted({r.slot for r in rows if r.slot})
    table = Table(title=f"Transformer blocks ({len(rows)})", title_justify="left", header_style="bold",
                  caption=("one slot of an attention group: " + "; ".join(slots)) if slots else None, caption_justify="left")
    table.add_column("block", no_wrap=True)
    moe = any(r.experts for r in rows)
    for col in ("heads", "KV", "dim", "MLP", *(("experts",) if moe else ())):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("attention group", no_wrap=True)
    table.add_column("MLP group", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("FLOPs", justify="right", no_wrap=True)
    for r in shown:
        table.add_row(escape(r.name), _opt(r.heads), _opt(r.kv_heads), _opt(r.head_dim), _opt(r.mlp_channels),
                      *((f"{r.experts}×{r.expert_channels}" if r.experts else "-",) if moe else ()),
                      escape(_local(r.name, r.attention)), escape(_local(r.name, r.mlp)),
                      human(r.params), human(r.flops))
    if len(shown) < len(rows):
        table.add_row(f"… {len(rows) - len(shown)} more: report.blocks_table(limit=None)", *[""] * (len(table.columns) - 1))
    return table
