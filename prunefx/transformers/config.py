"""The config of a pruned transformers model: what ``save_pretrained`` writes and a loader
builds from.

When every layer keeps the same sizes, the config's own fields say them:

    num_attention_heads, num_key_value_heads  := the layers' head counts
    head_dim                                  := unchanged (heads are removed whole), written
                                                 explicitly since it is no longer hidden / heads
    intermediate_size (GPT-2: n_inner, T5: d_ff, BART: encoder_ffn_dim, OPT: ffn_dim,
                      Falcon: ffn_hidden_size) := the layers' MLP width
    decoder_attention_heads, decoder_ffn_dim  := the same for an encoder-decoder model's
                                                 decoder stack (BART, Marian, Whisper)
    moe_intermediate_size (Mixtral: intermediate_size) := the routed experts' width
    hidden_size                               := the token embedding's width (when the
                                                 residual stream was pruned: approximate)

When they differ, each field holds the largest value (no stock loader builds such a model).
A field holding one value per stage (SegFormer's list of head counts) is left as it was.
Either way the config records, under ``config.prunefx``, the per-layer sizes and the sizes
the model was built with (``original``): ``prunefx.transformers.from_pretrained`` builds with
those (so that every size a module derives at construction, such as BERT's head width
``hidden_size / num_attention_heads``, is the original one), then gives each layer its
checkpoint's tensors.

``stock_reason(model)`` says why the model's own ``from_pretrained`` cannot rebuild it (it
builds the class from the config on the meta device and compares every tensor shape), or
``None`` when it can.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from prunefx.errors import ReconfigureError
from prunefx.peft import base_state_dict
from prunefx.transformers.layers import (
    LayerSizes,
    attention_of,
    decoder_layers,
    decoder_stack,
    stack_sizes,
)

__all__ = ["RECORD", "update_config", "stock_reason", "FIELDS", "at_original_sizes", "set_back"]

RECORD = "prunefx"  # the config attribute holding the per-layer sizes

# LayerSizes field -> the config fields that may hold it, first one the config has wins
FIELDS: dict[str, tuple[str, ...]] = {
    "num_attention_heads": ("num_attention_heads",),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim", "ffn_dim", "ffn_hidden_size"),
    "shared_expert_intermediate_size": ("shared_expert_intermediate_size",),
    "expert_intermediate_size": ("moe_intermediate_size", "intermediate_size"),  # Mixtral: its experts' width
}
# the same for the decoder stack of an encoder-decoder model (BART, Marian, Whisper), whose
# config names its sizes apart (the encoder's: num_attention_heads -> encoder_attention_heads)
DECODER_FIELDS: dict[str, tuple[str, ...]] = {
    "num_attention_heads": ("decoder_attention_heads",),
    "intermediate_size": ("decoder_ffn_dim",),
}


def _field(config: Any, options: tuple[str, ...]) -> str | None:
    return next((f for f in options if hasattr(config, f)), None)


def update_config(model: nn.Module, sizes: tuple[LayerSizes, ...]) -> None:
    """Write ``sizes`` into ``model.config`` (shared by every module) and record them."""
    config = model.config
    previous = getattr(config, RECORD, None)
    original = dict(previous["original"]) if previous else {}
    # every field as it was before any is written: a config may alias two of them to one
    # attribute (Whisper: num_attention_heads and num_key_value_heads are encoder_attention_heads)
    was = {f: getattr(config, f, None) for table in (FIELDS, DECODER_FIELDS) for options in table.values() for f in options}
    decoder = stack_sizes(decoder_stack(model))
    for table, stack in ((FIELDS, sizes), (DECODER_FIELDS, decoder)):
        for key, options in table.items():
            values = {getattr(s, key) for s in stack} - {None}
            field = _field(config, options)
            if not values or field is None and key != "head_dim":
                continue
            field = field or "head_dim"
            before = getattr(config, field, None)
            if before is not None and not isinstance(before, int):
                continue  # one value per stage (SegFormer's num_attention_heads list): the record says the sizes
            original.setdefault(field, was.get(field))
            new = max(values)
            if before != new or key == "head_dim":
                setattr(config, field, new)
    hidden = _hidden_size(model)
    if hidden is not None and hasattr(config, "hidden_size") and hidden != config.hidden_size:
        original.setdefault("hidden_size", config.hidden_size)  # the stream was pruned (approximate)
        config.hidden_size = hidden
    _check_config_reads(model, sizes)
    setattr(config, RECORD, {
        "original": original,
        "layers": [dataclasses.asdict(s) for s in sizes],
        "shapes": _changed_shapes(model, original),
    })
    getattr(config, RECORD)["stock_loader"] = stock_reason(model) or "loads it"


_MISSING = object()


def at_original_sizes(config: Any, original: dict[str, Any]) -> dict[str, Any]:
    """Set ``config`` to the sizes the model was built with before pruning; returns the values
    to set back (``_MISSING``: the field was absent)."""
    saved = {k: getattr(config, k, _MISSING) for k in original}
    for k, v in original.items():
        if v is None and k == "head_dim":
            if hasattr(config, k):
                delattr(config, k)  # derived by the class (hidden_size / heads), as it was
        else:
            setattr(config, k, v)
    return saved


def set_back(config: Any, saved: dict[str, Any]) -> None:
    for k, v in saved.items():
        if v is not _MISSING:
            setattr(config, k, v)


class _NoMetaBuild(Exception):
    pass


def _meta_build(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of ``type(model)(model.config)``, built on the meta device."""
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except Exception as exc:  # a class whose construction needs real tensors
        raise _NoMetaBuild(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc
    return {k: tuple(v.shape) for k, v in fresh.state_dict().items()}


def _changed_shapes(model: nn.Module, original: dict[str, Any]) -> dict[str, list[int]]:
    """The tensors whose shape differs from the model built at its original sizes."""
    saved = at_original_sizes(model.config, original)
    try:
        theirs = _meta_build(model)
    except _NoMetaBuild:
        theirs = {}  # then every shape is recorded
    finally:
        set_back(model.config, saved)
    return {k: list(t.shape) for k, t in base_state_dict(model).items() if theirs.get(k) != tuple(t.shape)}


def _hidden_size(model: nn.Module) -> int | None:
    """The residual stream's width, from the token embedding (None: no nn.Embedding input)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if get is not None else None
    except NotImplementedError:
        return None
    return int(emb.weight.shape[1]) if isinstance(emb, nn.Embedding) else None


def _check_config_reads(model: nn.Module, sizes: tuple[LayerSizes, ...]) -> None:
    """A module whose forward reads a head count from the shared config (Phi-3's fused split)
    needs every layer to keep the count the config holds."""
    for (prefix, layer), s in zip(decoder_layers(model), sizes, strict=True):
        found = attention_of(layer)
        if found is None or found[2].refuse is not None:
            continue
        name, attn, kind = found
        for field in kind.config_reads:
            held = getattr(model.config, field)
            if getattr(s, field) != held:
                counts = sorted({getattr(t, field) for t in sizes})
                raise ReconfigureError(
                    f"module '{prefix}.{name}' ({type(attn).__name__}) reads config.{field} in its forward "
                    f"({kind.name}), one value for every layer, but the layers keep {counts}: keep the same "
                    f"count in every layer (prunefx.masks.uniform_layers) or use emit=\"graph\""
                )


def stock_reason(model: nn.Module) -> str | None:
    """Why ``type(model).from_pretrained`` on the saved model would not rebuild it (the first
    tensor whose shape the config does not give), or ``None``."""
    try:
        theirs = _meta_build(model)
    except _NoMetaBuild as exc:
        return (
            f"{type(model).__name__} could not be built from its config on the meta device to compare ({exc}); "
            "load it with prunefx.transformers.from_pretrained"
        )
    for key, t in base_state_dict(model).items():
        if key in theirs and theirs[key] != tuple(t.shape):
            owner = key.rpartition(".")[0]
            kind = type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
            layers = (getattr(model.config, RECORD, None) or {}).get("layers") or []
            why = (
                "its layers keep different sizes, which one config field cannot say"
                if any(entry != layers[0] for entry in layers)
                else "the class derives this size from config fields that cannot say it (e.g. a head width of "
                "hidden_size / num_attention_heads)"
            )
            return (
                f"{type(model).__name__}.from_pretrained would build '{key}' ({kind}) as {theirs[key]}, the pruned "
                f"model holds {tuple(t.shape)}: {why}; load it with prunefx.transformers.from_pretrained"
            )
    return None
