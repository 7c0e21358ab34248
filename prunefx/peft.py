"""PEFT (LoRA) models stay PEFT models after pruning.

A ``peft.PeftModel`` holds a transformers model whose targeted layers are replaced by LoRA
layers: ``y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``. The channel analysis
sees this as ordinary graph: the base layer's output channels and ``lora_B``'s rows are one
group, its input channels and ``lora_A``'s columns another, and the adapter's rank (``lora_A``'s
rows, ``lora_B``'s columns) is a group of its own, exact like any hidden width. The module
emitter (``reconfigure``'s default for a model holding a transformers model) slices those
tensors and updates ``nn.Linear``'s sizes; ``finish`` then writes what PEFT keeps beside them:

    LoRA layer    in_features / out_features   peft's own reading of the base layer
                  r[adapter]                   lora_A's rows (lora_embedding_A's for embeddings)
                  lora_alpha[adapter]          scaling * r (rsLoRA: scaling * sqrt(r)), so that
                                               the layer's scaling, which forward uses, is unchanged
    LoraConfig    rank_pattern / alpha_pattern a layer whose rank changed, by its name in the base
                                               model, so ``save_pretrained`` then
                                               ``PeftModel.from_pretrained`` on the pruned base
                                               model rebuilds the same adapter

The transformers model inside is finished by ``prunefx.transformers`` (head counts, config),
so ``merge_and_unload()`` gives a pruned transformers model that saves and reloads.

Other PEFT tuners (IA3, LoHa, ...) are not known here: a tuner layer of another kind whose
base layer changed sizes is a ``ReconfigureError`` (merge the adapter first, or
``emit="graph"``). peft is imported only when the model holds one of its layers.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prunefx.errors import ReconfigureError
from prunefx.tracing import derives_from

__all__ = ["finish", "holds_peft_layers", "base_layer", "base_state_dict", "adapter_modules"]


def _is(m: Any, name: str, module_prefix: str = "peft.") -> bool:
    """``m`` is an instance of PEFT's class ``name`` (found by name: peft is not imported)."""
    return derives_from(type(m), name, module_prefix)


def _tuner_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if _is(m, "BaseTunerLayer"))


def holds_peft_layers(model: nn.Module) -> bool:
    return "peft" in sys.modules and next(_tuner_layers(model), None) is not None  # (no peft, no walk)


def base_layer(m: nn.Module) -> nn.Module:
    """The layer a PEFT tuner layer wraps (``q_proj.base_layer``), or ``m`` itself: what
    ``prunefx.transformers`` reads sizes from."""
    return m.get_base_layer() if _is(m, "BaseTunerLayer") else m


def adapter_modules(model: nn.Module) -> set[str]:
    """The names of the modules inside ``model``'s tuner layers that are not their base layer
    (``q_proj.lora_A``, ``q_proj.lora_A.default``, ...): the adapters' own modules."""
    out: set[str] = set()
    if "peft" not in sys.modules:
        return out
    for name, layer in _tuner_layers(model):
        base = f"{name}.base_layer"
        out.update(f"{name}.{n}" for n, _ in layer.named_modules() if n and not (f"{name}.{n}" == base or f"{name}.{n}".startswith(base + ".")))
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as the model without its adapters would name it: a tuner
    layer's ``base_layer.`` tensors under the layer's own name, its adapters' tensors left
    out. The shapes ``prunefx.transformers`` records describe the base model, the one
    ``merge_and_unload()`` or ``unload()`` gives and ``save_pretrained`` writes."""
    state = model.state_dict()
    layers = [n for n, _ in _tuner_layers(model)]
    if not layers:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        owner = max((n for n in layers if key.startswith(f"{n}.")), key=len, default=None)
        if owner is None:
            out[key] = t
        elif key.startswith(f"{owner}.base_layer."):
            out[f"{owner}.{key.removeprefix(f'{owner}.base_layer.')}"] = t
    return out


def _kind(layer: nn.Module) -> str:
    """``ia3.Linear``: the tuner's package and the layer's class."""
    return f"{type(layer).__module__.split('.')[-2]}.{type(layer).__name__}"


def _rank(layer: nn.Module, adapter: str) -> int | None:
    if adapter in getattr(layer, "lora_A", {}):
        return int(layer.lora_A[adapter].weight.shape[0])
    if adapter in getattr(layer, "lora_embedding_A", {}):
        return int(layer.lora_embedding_A[adapter].shape[0])
    return None


def _owners(model: nn.Module) -> Iterator[tuple[nn.Module, dict[str, Any]]]:
    """(the module LoRA keys are relative to, its adapters' configs): a PEFT tuner
    (``LoraModel``, whose ``.model`` is the base model) or a transformers model holding
    adapters itself (``model.add_adapter(LoraConfig(...))``)."""
    for _, m in model.named_modules():
        configs = getattr(m, "peft_config", None)
        if not isinstance(configs, dict):
            continue
        if _is(m, "BaseTuner"):
            yield m.model, configs
        elif not _is(m, "PeftModel") and not _is(m, "PeftMixedModel"):  # (those delegate to a tuner)
            yield m, configs


def finish(model: nn.Module) -> None:
    """The LoRA layers' sizes and their adapters' configs from the sliced tensors, in place
    (the module emitter calls it on its copy). See the module docstring."""
    from peft.tuners.tuners_utils import _get_in_out_features
    from peft.utils.other import get_pattern_key

    for name, layer in _tuner_layers(model):
        if not _is(layer, "LoraLayer", "peft.tuners.lora"):
            sizes = _get_in_out_features(layer.get_base_layer())
            if None not in sizes and sizes != (getattr(layer, "in_features", sizes[0]), getattr(layer, "out_features", sizes[1])):
                raise ReconfigureError(
                    f"emit=\"module\": '{name}' is a PEFT {_kind(layer)} layer, and prunefx updates the sizes of "
                    "LoRA layers only; merge the adapter into the model first (merge_and_unload()), or use emit=\"graph\""
                )
            continue
        layer.in_features, layer.out_features = layer._get_in_out_features(layer.get_base_layer())
    for root, configs in _owners(model):
        for key, layer in root.named_modules():
            if _is(layer, "LoraLayer", "peft.tuners.lora"):
                _adapter_sizes(key, layer, configs, get_pattern_key)


def _adapter_sizes(key: str, layer: nn.Module, configs: dict[str, Any], get_pattern_key: Any) -> None:
    for adapter, old in list(layer.r.items()):
        r = _rank(layer, adapter)
        if r is None or r == old:
            continue
        config = configs[adapter]
        scaling = layer.scaling[adapter]
        alpha = scaling * (math.sqrt(r) if getattr(config, "use_rslora", False) else r)
        layer.r[adapter], layer.lora_alpha[adapter] = r, alpha
        config.rank_pattern = _first(config.rank_pattern, key, r)
        configured_alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
        if not math.isclose(configured_alpha, alpha):
            config.alpha_pattern = _first(config.alpha_pattern, key, alpha)


def _first(pattern: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``pattern`` with ``key: value`` first: PEFT takes the first key matching a layer's name,
    and a user's broader pattern (``"q_proj"``) would otherwise match before it."""
    return {key: value, **{k: v for k, v in pattern.items() if k != key}}
