"""Per-layer sizes of a transformers model: read from its weights, written to the attributes
its attention and MLP modules read at run time.

A family's attention module keeps its head counts as attributes (``num_heads``,
``num_key_value_groups``, GPT-2's ``split_size``, BERT's ``all_head_size``) and reshapes
with ``-1`` heads of ``head_dim`` channels. prunefx removes heads whole, so ``head_dim``
never changes and the head counts follow from the projections' shapes:

    query heads   = q rows / head_dim            (Phi-3: o_proj columns / head_dim)
    KV heads      = k rows / head_dim            (Phi-3: (qkv rows / head_dim - query heads) / 2)
    KV groups     = query heads / KV heads
    intermediate  = the MLP's hidden width       (down_proj columns, c_fc / fc1 / dense rows)
    experts       = the routed experts' width    (3-D down_proj (experts, hidden, width))

One ``AttentionKind`` / ``MlpKind`` record per layout says how to read it; the attribute
names a module has are then set (``num_heads``, ``num_attention_heads``,
``num_key_value_heads``, ``num_key_value_groups``, ``all_head_size``, ``split_size``,
``intermediate_size``), head counts on every attention module a record describes (also in
the other stack of an encoder-decoder model, and its cross-attention). GPT-2's ``Conv1D`` keeps ``nf``/``nx`` (its forward reshapes to
``nf``), set from its weight (in, out).

A record may ``refuse`` a layout prunefx cannot write yet (T5's attention): once its weights
shrank, a ``ReconfigureError`` names the module and why. A module no record describes keeps
its attributes; if its forward then disagrees with the pruned graph, the emitter's check
names it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunefx.errors import ReconfigureError
from prunefx.peft import base_layer

__all__ = [
    "LayerSizes", "AttentionKind", "MlpKind", "ATTENTION", "MLP", "decoder_layers", "decoder_stack", "layer_sizes", "stack_sizes", "write_sizes", "attention_of",
    "attention_modules", "mlp_of", "experts_of", "SIZE_ATTRIBUTES",
]


@dataclass(frozen=True)
class LayerSizes:
    """What one layer keeps. ``None``: the layer has no such part (or no record reads it)."""

    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None  # MoE blocks with a shared expert (Qwen2-MoE)
    expert_intermediate_size: int | None = None  # the routed experts' hidden width (one for every expert)


def _rows(m: Any) -> int:
    """Output features of a Linear, or of a transformers Conv1D (weight (in, out)); of the
    layer a PEFT (LoRA) layer wraps."""
    m = base_layer(m)
    return int(m.weight.shape[0]) if isinstance(m, nn.Linear) else int(m.weight.shape[1])


def _cols(m: Any) -> int:
    m = base_layer(m)
    return int(m.weight.shape[1]) if isinstance(m, nn.Linear) else int(m.weight.shape[0])


def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(m, n) for n in names)


@dataclass(frozen=True)
class AttentionKind:
    """One layout of an attention module: how to recognise it, its head width, and its head
    counts (query, key/value) from its weights. ``config_reads`` are config fields its forward
    reads at run time (they must hold for every layer)."""

    name: str
    matches: Callable[[Any], bool]
    head_dim: Callable[[Any], int]
    heads: Callable[[Any, int], tuple[int, int]]
    config_reads: tuple[str, ...] = ()
    refuse: Callable[[Any], str | None] | None = None  # why prunefx cannot write it once pruned


def _t5_refusal(m: Any) -> str | None:
    original = int(m.n_heads) * int(m.key_value_proj_dim)
    if all(_rows(p) == original for p in (m.q, m.k, m.v)) and _cols(m.o) == original:
        return None
    return (
        "its forward reshapes to self.n_heads heads of self.key_value_proj_dim channels and adds a position "
        "bias computed for the original heads, which prunefx does not write yet"
    )


def _gpt2_heads(m: Any, d: int) -> tuple[int, int]:
    if getattr(m, "is_cross_attention", False):
        n = _rows(m.q_attn) // d
    else:
        n = _rows(m.c_attn) // (3 * d)
    return n, n


def _fused_heads(m: Any, d: int) -> tuple[int, int]:
    q = _cols(m.o_proj) // d
    return q, (_rows(m.qkv_proj) // d - q) // 2


ATTENTION: tuple[AttentionKind, ...] = (
    # Llama, Mistral, Qwen2/3, Gemma, ViT, ...: separate projections, -1 heads of head_dim
    AttentionKind("q/k/v projections", lambda m: _has(m, "q_proj", "k_proj", "v_proj", "head_dim"),
                  lambda m: int(m.head_dim), lambda m, d: (_rows(m.q_proj) // d, _rows(m.k_proj) // d)),
    # Phi-3: one qkv_proj split at config.num_attention_heads * head_dim
    AttentionKind("fused qkv_proj", lambda m: _has(m, "qkv_proj", "o_proj", "head_dim"),
                  lambda m: int(m.head_dim), _fused_heads, config_reads=("num_attention_heads",)),
    # GPT-NeoX (Pythia): one query_key_value viewed as -1 heads of [q, k, v] (3 * head_size each)
    AttentionKind("GPT-NeoX query_key_value", lambda m: _has(m, "query_key_value", "dense", "head_size"),
                  lambda m: int(m.head_size), lambda m, d: (_rows(m.query_key_value) // (3 * d),) * 2),
    # MPT: Wqkv split in three, each reshaped to self.n_heads heads of self.head_dim (its
    # ALiBi biases, built for config.n_heads, pin the heads; the record pins what is inside one)
    AttentionKind("MPT Wqkv", lambda m: _has(m, "Wqkv", "out_proj", "n_heads", "head_dim"),
                  lambda m: int(m.head_dim), lambda m, d: (_rows(m.Wqkv) // (3 * d),) * 2),
    # GPT-2: Conv1D c_attn split into split_size parts
    AttentionKind("GPT-2 c_attn", lambda m: _has(m, "c_attn", "split_size", "head_dim"),
                  lambda m: int(m.head_dim), _gpt2_heads),
    # BERT, RoBERTa: query/key/value, attention_head_size
    AttentionKind("query/key/value", lambda m: _has(m, "query", "key", "value", "attention_head_size"),
                  lambda m: int(m.attention_head_size), lambda m, d: (_rows(m.query) // d,) * 2),
    # DeBERTa(-v2): query_proj/key_proj/value_proj viewed as num_attention_heads heads (its
    # relative-position projections pos_key_proj/pos_query_proj are laid out alike)
    AttentionKind("query_proj/key_proj/value_proj", lambda m: _has(m, "query_proj", "key_proj", "value_proj", "attention_head_size"),
                  lambda m: int(m.attention_head_size), lambda m, d: (_rows(m.query_proj) // d,) * 2),
    # T5: q/k/v/o reshaped to n_heads x key_value_proj_dim, a relative position bias per head
    AttentionKind("T5 q/k/v/o", lambda m: _has(m, "q", "k", "v", "o", "n_heads", "key_value_proj_dim"),
                  lambda m: int(m.key_value_proj_dim), lambda m, d: (_rows(m.q) // d,) * 2, refuse=_t5_refusal),
)


@dataclass(frozen=True)
class MlpKind:
    """One layout of an MLP: how to recognise it and its hidden width from its weights."""

    name: str
    matches: Callable[[Any], bool]
    width: Callable[[Any], int]


MLP: tuple[MlpKind, ...] = (
    MlpKind("down_proj", lambda m: _has(m, "down_proj") and isinstance(base_layer(m.down_proj), nn.Linear), lambda m: _cols(m.down_proj)),
    MlpKind("GPT-2 c_fc", lambda m: _has(m, "c_fc", "c_proj"), lambda m: _rows(m.c_fc)),
    MlpKind("fc1/fc2", lambda m: _has(m, "fc1", "fc2"), lambda m: _rows(m.fc1)),
    MlpKind("dense_h_to_4h", lambda m: _has(m, "dense_h_to_4h", "dense_4h_to_h"), lambda m: _rows(m.dense_h_to_4h)),  # GPT-NeoX, Falcon
    MlpKind("fc_in/fc_out", lambda m: _has(m, "fc_in", "fc_out"), lambda m: _rows(m.fc_in)),  # GPT-J, CodeGen
    MlpKind("lin1/lin2", lambda m: _has(m, "lin1", "lin2"), lambda m: _rows(m.lin1)),  # DistilBERT
    MlpKind("T5 wi/wo", lambda m: _has(m, "wo") and (_has(m, "wi") or _has(m, "wi_0")), lambda m: _cols(m.wo)),
    MlpKind("BERT intermediate", lambda m: _has(m, "dense", "intermediate_act_fn"), lambda m: _rows(m.dense)),
)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks: the ModuleList of ``config.num_hidden_layers`` modules
    (``model.layers``, ``transformer.h``, ``encoder.layer``)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and n:
            return [(f"{name}.{i}", layer) for i, layer in enumerate(m)]
    return []


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, AttentionKind]]:
    """Every attention module a record describes, wherever it is: besides each layer's
    self-attention, an encoder-decoder model's other stack and its cross-attention
    (Whisper's ``decoder.layers.N.encoder_attn``), which ``decoder_layers`` does not list."""
    return list(_first(model, ATTENTION))


def decoder_stack(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """An encoder-decoder model's decoder blocks (``config.decoder_layers`` or
    ``num_decoder_layers`` of them), when ``decoder_layers`` lists the encoder's; else []."""
    n = getattr(model.config, "decoder_layers", None) or getattr(model.config, "num_decoder_layers", None)
    first = {id(layer) for _, layer in decoder_layers(model)}
    if not isinstance(n, int) or not n or not first:
        return []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and "decoder" in name and not first & {id(x) for x in m}:
            return [(f"{name}.{i}", layer) for i, layer in enumerate(m)]
    return []


def _first(layer: nn.Module, kinds: tuple, skip: Collection[int] = ()) -> Iterator[tuple[str, nn.Module, Any]]:
    for name, m in layer.named_modules():
        if id(m) in skip:
            continue
        kind = next((k for k in kinds if k.matches(m)), None)
        if kind is not None:
            yield name, m, kind


def attention_of(layer: nn.Module) -> tuple[str, nn.Module, AttentionKind] | None:
    """The layer's (self-)attention module: the first one a record describes."""
    return next(_first(layer, ATTENTION), None)


def _mlp_of(layer: nn.Module, skip: Collection[int] = ()) -> tuple[str, nn.Module, MlpKind] | None:
    """The layer's dense MLP (not an MoE block's experts)."""
    return next(_first(layer, MLP, skip), None)


def mlp_of(layer: nn.Module) -> tuple[str, nn.Module, MlpKind] | None:
    """The layer's dense MLP (a shared expert or the experts of an MoE block are not it)."""
    return _mlp_of(layer, _moe_shared_width(layer)[1])


def experts_of(layer: nn.Module) -> tuple[nn.Module, int] | None:
    """The layer's routed experts (3-D ``gate_up_proj``/``up_proj`` and ``down_proj`` of shape
    (experts, out, in), or (experts, in, out) when ``is_transposed``) and their hidden width."""
    for m in layer.modules():
        down = getattr(m, "down_proj", None)
        if isinstance(down, nn.Parameter) and down.dim() == 3:
            return m, int(down.shape[1] if getattr(m, "is_transposed", False) else down.shape[2])
    return None


def _moe_shared_width(layer: nn.Module) -> tuple[int | None, set[int]]:
    """A sparse MoE block's shared expert width, and the modules inside MoE blocks (not the
    layer's dense MLP)."""
    for m in layer.modules():
        if hasattr(m, "experts"):
            inside = {id(x) for x in m.modules()}
            shared = getattr(m, "shared_expert", None)
            if shared is not None and isinstance(base_layer(getattr(shared, "down_proj", None)), nn.Linear):
                return _cols(shared.down_proj), inside
            return None, inside
    return None, set()


def _heads(path: str, attn: nn.Module, kind: AttentionKind) -> tuple[int, int, int]:
    """(query heads, key/value heads, head width) of an attention module, from its weights;
    a ReconfigureError when its record refuses the layout or no head count expresses it."""
    why = kind.refuse(attn) if kind.refuse is not None else None
    if why:
        raise ReconfigureError(
            f"module '{path}' ({type(attn).__name__}, {kind.name}) lost channels: {why}; keep its "
            'attention whole (protect=[...] in the mask source) or use emit="graph"'
        )
    d = kind.head_dim(attn)
    heads, kv = kind.heads(attn, d)
    if heads < 1 or kv < 1 or heads % kv:
        raise ReconfigureError(
            f"module '{path}' ({type(attn).__name__}, {kind.name}): its weights hold {heads} query "
            f"and {kv} key/value heads of {d} channels, which no head count expresses"
        )
    return heads, kv, d


def _sizes(prefix: str, layer: nn.Module) -> LayerSizes:
    heads = kv = d = width = None
    found = attention_of(layer)
    if found is not None:
        name, attn, kind = found
        heads, kv, d = _heads(f"{prefix}.{name}", attn, kind)
    shared, moe = _moe_shared_width(layer)
    mlp = _mlp_of(layer, moe)
    if mlp is not None:
        width = mlp[2].width(mlp[1])
    experts = experts_of(layer)
    return LayerSizes(heads, kv, d, width, shared, experts[1] if experts is not None else None)


def layer_sizes(model: nn.Module) -> tuple[LayerSizes, ...]:
    """Every layer's sizes, read from its weights."""
    return stack_sizes(decoder_layers(model))


def stack_sizes(layers: list[tuple[str, nn.Module]]) -> tuple[LayerSizes, ...]:
    """The sizes of these (prefix, layer) blocks, read from their weights."""
    return tuple(_sizes(prefix, layer) for prefix, layer in layers)


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "all_head_size", "split_size")


def _write_heads(attn: nn.Module, heads: int, kv: int, d: int) -> None:
    values = {
        "num_heads": heads,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_key_value_groups": heads // kv,
        "all_head_size": heads * d,
        "split_size": heads * d,
    }
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, values[attr])


# Other int attributes a forward reads that follow a weight of the same module:
# (which modules have it, the attribute, its value from the weights)
SIZE_ATTRIBUTES: tuple[tuple[Callable[[Any], bool], str, Callable[[Any], int]], ...] = (
    # Mamba: x_proj's output is split at time_step_rank, the input width of dt_proj
    (lambda m: _has(m, "x_proj", "dt_proj", "time_step_rank"), "time_step_rank", lambda m: _cols(m.dt_proj)),
)


def write_sizes(model: nn.Module) -> tuple[LayerSizes, ...]:
    """Set every size attribute the attention/MLP modules and GPT-2's Conv1D read at run time
    from their weights; returns the per-layer sizes."""
    from transformers.pytorch_utils import Conv1D

    for m in model.modules():
        if isinstance(m, Conv1D):  # forward reshapes to nf; weight (nx, nf)
            m.nx, m.nf = int(m.weight.shape[0]), int(m.weight.shape[1])
        for matches, attr, value in SIZE_ATTRIBUTES:
            if matches(m) and isinstance(getattr(m, attr), int):
                setattr(m, attr, value(m))
    sizes = layer_sizes(model)
    for path, attn, kind in attention_modules(model):  # every layer's, and those of another stack
        if kind.refuse is not None and kind.refuse(attn) is None:
            continue  # a layout prunefx does not write, left whole (once pruned, _heads refuses it)
        try:
            kind.head_dim(attn)
        except (AttributeError, TypeError, ValueError):
            continue  # no head width to read (layer_sizes already refused one inside a layer)
        _write_heads(attn, *_heads(path, attn, kind))
    for (_, layer), s in zip(decoder_layers(model), sizes, strict=True):
        mlp = mlp_of(layer)
        if mlp is not None and isinstance(getattr(mlp[1], "intermediate_size", None), int):
            setattr(mlp[1], "intermediate_size", s.intermediate_size)  # noqa: B010 - a module attribute
        experts = experts_of(layer)
        if experts is not None and isinstance(getattr(experts[0], "intermediate_dim", None), int):
            experts[0].intermediate_dim = experts[1]
    return sizes
