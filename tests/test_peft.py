"""A pruned PEFT (LoRA) model is a PEFT model (prunefx/peft.py).

A tiny random-init Llama (GQA, 2 layers, hidden 64) with LoRA adapters on its q/v/up/down
projections, the user's own ``rank_pattern``/``alpha_pattern`` on q_proj (constant tensors,
lora_B's zeros included, randomised: they hide misaligned slices), traced while it trains:

- the analysis finds each layer's KV slots, MLP channels and every adapter's rank as exact
  groups (heads kept whole, as in the model without adapters);
- ``reconfigure`` with its default emitter returns the model's own PEFT class, equal to
  ``apply_mask`` on a copy at the example shape and at another batch size and sequence
  length; every LoRA layer's ``in_features``/``out_features``/``r`` follow its tensors and
  its ``scaling`` is unchanged; the adapter config gets the pruned ranks (and the alphas
  keeping the scaling) first in its patterns; the transformers config inside says the new
  sizes; the input model and its config are unchanged;
- ``merge_and_unload`` gives a pruned Llama that saves and reloads through
  ``prunefx.transformers.from_pretrained``; the adapter saved by ``save_pretrained`` loads
  onto the pruned base model (``PeftModel.from_pretrained``) into the same model;
- the same on every family of ``tests/test_export_frontend.py`` (GPT-2's fused Conv1D
  ``c_attn`` with ``fan_in_fan_out``, BERT, DeBERTa-v2, ViT, ...), LoRA on its attention and
  MLP projections: equal to ``apply_mask`` at three shapes, every LoRA layer's sizes PEFT's;
- the inspector shows the base model's blocks (heads, MLP), adapters' ranks apart;
- pruning first and adding LoRA afterwards (LLM-Pruner's order) targets the pruned sizes;
- gradient criteria score the frozen base model's channels (Taylor on a fresh adapter equals
  Taylor on the model without it);
- PEFT on a custom model registers a hook that only makes the embeddings' output require
  grad: the capture accepts it and the result keeps it;
- DoRA: heads and MLP channels approximate (0/0 in the masked model), ranks exact;
- other PEFT tuners (IA3): ``ReconfigureError`` by default (their sizes are not updated),
  ``emit="graph"`` works.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers
from test_export_frontend import FAMILIES, _randomize

import prunefx
import prunefx.transformers
from zoo import max_rel_diff, state_copy

pytestmark = pytest.mark.usefixtures("quiet_transformers")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _ids(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


@pytest.fixture(scope="module")
def lora():
    """(LoRA model, its graph traced in training mode, a 50% mask over the exact groups, the
    pruned model, the model's tensors before it was traced and reconfigured)."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS,
                             rank_pattern={"q_proj": 6}, alpha_pattern={"q_proj": 3})
    model = _randomize(peft.get_peft_model(_llama(), config)).train()
    before = state_copy(model)
    graph = prunefx.trace(model, (_ids(),), example_kwargs={"use_cache": False})
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    return model, graph, mask, prunefx.reconfigure(model, mask, graph=graph), before


def _reference(model, graph, mask):
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, graph=graph)
    return ref.eval()


def test_a_lora_model_is_pruned_into_a_peft_model(lora):
    model, graph, mask, small, before = lora
    layer0 = "base_model.model.model.layers.0."
    assert sorted(g.name.removeprefix(layer0) for g in graph.groups if g.exact and g.name.startswith(layer0)) == [
        "mlp.down_proj.lora_A.default", "mlp.gate_proj", "mlp.up_proj.lora_A.default",
        "self_attn.q_proj.base_layer", "self_attn.q_proj.lora_A.default", "self_attn.v_proj.lora_A.default",
    ]
    assert graph.group(f"{layer0}self_attn.q_proj.base_layer").size == 2  # KV slots: heads kept whole
    assert type(small) is type(model) and isinstance(small, peft.PeftModelForCausalLM)
    assert model.training and small.training  # captured in evaluation mode, the modes left as they were
    ref = _reference(model, graph, mask)
    small.eval()
    for ids in (_ids(), _ids(3, 9)):
        assert max_rel_diff(_logits(small, ids), _logits(ref, ids)) < 1e-5

    inner = small.get_base_model()
    assert (inner.config.num_attention_heads, inner.config.num_key_value_heads, inner.config.intermediate_size) == (2, 1, 48)
    scalings = {n: dict(m.scaling) for n, m in _lora_layers(model)}
    config = small.peft_config["default"]
    for name, layer in _lora_layers(small):
        base = layer.get_base_layer()
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
        rank = layer.lora_A["default"].weight.shape[0]
        assert layer.r["default"] == rank == layer.lora_B["default"].weight.shape[1] < (6 if "q_proj" in name else 4)
        assert layer.scaling == scalings[name]
        assert layer.scaling["default"] == pytest.approx(layer.lora_alpha["default"] / rank)
        key = name.removeprefix("base_model.model.")
        assert next(k for k in config.rank_pattern if k in (key, "q_proj") and key.endswith(k)) == key  # first: PEFT takes the first match
        assert config.rank_pattern[key] == rank
    assert config.rank_pattern["q_proj"] == 6 and config.alpha_pattern["q_proj"] == 3  # the user's patterns stay
    # the input model is unchanged
    assert model.peft_config["default"].rank_pattern == {"q_proj": 6}
    assert model.get_base_model().config.intermediate_size == 96
    assert all(layer.r["default"] in (4, 6) for _, layer in _lora_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_inspector_shows_the_base_models_blocks(lora):
    """One row per layer of the Llama inside, its heads and MLP; an adapter's rank group is
    not one of the block's attention or MLP groups."""
    model, graph, *_ = lora
    blocks = prunefx.inspect(model, graph=graph).blocks
    assert [b.name for b in blocks] == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert [(b.heads, b.kv_heads, b.mlp_channels, b.slot) for b in blocks] == [(4, 2, 96, "a KV head with its 2 query heads")] * 2
    assert blocks[0].attention == ("base_model.model.model.layers.0.self_attn.q_proj.base_layer",)
    assert blocks[0].mlp == ("base_model.model.model.layers.0.mlp.gate_proj",)


def test_a_pruned_lora_model_merges_saves_and_reloads(lora, tmp_path):
    small = lora[3]
    small.eval()
    ids = _ids(3, 9)
    want = _logits(small, ids)
    merged = copy.deepcopy(small).merge_and_unload()
    assert type(merged) is transformers.LlamaForCausalLM and merged.config.intermediate_size == 48
    assert max_rel_diff(_logits(merged, ids), want) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    assert max_rel_diff(_logits(prunefx.transformers.from_pretrained(tmp_path / "merged"), ids), want) < 1e-5

    small.save_pretrained(tmp_path / "adapter")
    copy.deepcopy(small).unload().save_pretrained(tmp_path / "base")
    base = prunefx.transformers.from_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert [(n, m.r, m.scaling) for n, m in _lora_layers(reloaded)] == [(n, m.r, m.scaling) for n, m in _lora_layers(small)]
    assert max_rel_diff(_logits(reloaded, ids), want) < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_on_every_family(family: str) -> None:
    make, kwargs, attn, mlp, inputs = FAMILIES[family]
    torch.manual_seed(0)
    targets = [attn.rsplit(".", 1)[-1], mlp.rsplit(".", 1)[-1]]
    model = _randomize(peft.get_peft_model(make(), peft.LoraConfig(r=4, target_modules=targets, fan_in_fan_out=family == "gpt2")))
    x, *others = inputs()
    graph = prunefx.trace(model, (x,), example_kwargs=kwargs)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is type(model)
    ref = _reference(model, graph, mask)
    for inp in (x, *others):
        with torch.no_grad():
            got, want = small(inp, **kwargs), ref(inp, **kwargs)
        assert max_rel_diff(got.logits if hasattr(got, "logits") else got[0], want.logits if hasattr(want, "logits") else want[0]) < 1e-5
    layers = _lora_layers(small)
    assert len(layers) >= 4 and all((m.in_features, m.out_features) == m._get_in_out_features(m.get_base_layer()) for _, m in layers)
    assert all(m.r["default"] == 2 for _, m in layers)
    assert prunefx.transformers.layer_sizes(small.get_base_model())[0].num_attention_heads == 2


def test_dora_heads_are_approximate_and_its_ranks_exact(tmp_path):
    """DoRA divides by the norm of each output row of ``W + scaling * B @ A``: in the masked
    model a removed head's rows are zero, so 0/0. Its heads and MLP channels are approximate
    (said why), its ranks exact, and a mask over the ranks reloads like LoRA."""
    model = _randomize(peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))).eval()
    ids = _ids()
    graph = prunefx.trace(model, (ids,), example_kwargs={"use_cache": False})
    heads = graph.group("base_model.model.model.layers.0.self_attn.q_proj.base_layer")
    assert heads.prunable and not heads.exact and "divides by channels that are zero in the masked model" in heads.reason
    exact = [g.name for g in graph.groups if g.exact]
    assert len(exact) == 8 and all(".lora_A.default" in n for n in exact)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    ref = _reference(model, graph, mask)
    for x in (ids, _ids(3, 9)):
        assert max_rel_diff(_logits(small, x), _logits(ref, x)) < 1e-5
    small.save_pretrained(tmp_path / "adapter")
    copy.deepcopy(small).unload().save_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(prunefx.transformers.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert max_rel_diff(_logits(reloaded.eval(), ids), _logits(small, ids)) < 1e-6


def test_lora_added_after_pruning_targets_the_pruned_sizes():
    llama = _randomize(_llama())
    graph = prunefx.trace(llama, (_ids(),), example_kwargs={"use_cache": False})
    small = prunefx.reconfigure(llama, prunefx.masks.random(graph, 0.5, exact_only=True, seed=1), graph=graph)
    tuned = peft.get_peft_model(small, peft.LoraConfig(r=4, target_modules=TARGETS))
    down = tuned.get_base_model().model.layers[0].mlp.down_proj
    assert down.in_features == down.lora_A["default"].in_features == small.config.intermediate_size == 48
    frozen = {n: p.clone() for n, p in tuned.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    tuned.train()
    for _ in range(2):
        opt.zero_grad()
        tuned(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in tuned.named_parameters() if n in frozen)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in tuned.named_parameters() if "lora_B" in n)


def test_taylor_scores_the_frozen_base_model():
    """A fresh adapter (lora_B = 0) computes what the base model computes, and gradient
    criteria score the frozen base weights: the LoRA model's heads and MLP channels get the
    base model's Taylor scores, not zeros."""
    llama = _randomize(_llama())
    lora = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=4, target_modules=TARGETS)).eval()
    assert not any(p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    ids = _ids()
    scores = [prunefx.masks.saliency.taylor_scores(prunefx.trace(m, (ids,), example_kwargs={"use_cache": False}),
                                                   loss_fn=prunefx.masks.causal_lm_loss, batch=(ids, ids))
              for m in (llama, lora)]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        base, adapted = scores[0][name], scores[1][f"base_model.model.{name}" + (".base_layer" if "q_proj" in name else "")]
        assert (base > 0).all()
        torch.testing.assert_close(adapted, base, rtol=1e-4, atol=0)


class _TinyLM(torch.nn.Module):
    """Not a transformers model, with ``get_input_embeddings``: PEFT registers its own
    input-require-grads hook on it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.out = torch.nn.Linear(32, 50)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.out(h + self.down(torch.relu(self.up(h))))


def _hooks(model) -> list[str]:
    return [h.__name__ for h in model.get_base_model().emb._forward_hooks.values()]


def _trace_without_fx_attempt(model, *inputs) -> prunefx.PruneGraph:
    """``trace`` on a model holding PEFT layers goes straight to torch.export: plain fx never
    traces a tuner layer (it branches on ``x.dtype``), so no fallback warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = prunefx.trace(model, inputs)
    assert graph.frontend == "export" and not [w for w in caught if "prunefx" in str(w.message)], [str(w.message) for w in caught]
    return graph


def test_lora_on_a_custom_model_keeps_peft_hook():
    model = _randomize(peft.get_peft_model(_TinyLM(), peft.LoraConfig(r=4, target_modules=["up", "down"])))
    assert _hooks(model) == ["make_inputs_require_grad"]
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    graph = _trace_without_fx_attempt(model, ids)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is type(model) and _hooks(small) == ["make_inputs_require_grad"]
    assert small.peft_config["default"].rank_pattern == {"up": 2, "down": 2}
    assert small.get_base_model().up.base_layer.out_features == small.get_base_model().up.out_features == 32
    ref = _reference(model, graph, mask)
    for x in (ids, ids[:1, :3]):
        with torch.no_grad():
            assert max_rel_diff(small(x), ref(x)) < 1e-5


def test_another_peft_tuner_is_refused_by_the_module_emitter():
    model = _randomize(peft.get_peft_model(_TinyLM(), peft.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"])))
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    graph = _trace_without_fx_attempt(model, ids)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    before = state_copy(model)
    with pytest.raises(prunefx.ReconfigureError, match=r"'base_model.model.up' is a PEFT ia3.Linear layer.*merge_and_unload"):
        prunefx.reconfigure(model, mask, graph=graph)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    small = prunefx.reconfigure(model, mask, graph=graph, emit="graph")
    ref = _reference(model, graph, mask)
    for x in (ids, ids[:1, :3]):
        with torch.no_grad():
            assert max_rel_diff(small(x), ref(x)) < 1e-5


class _ConvNet(torch.nn.Module):
    """A small CNN: BatchNorm, a residual add, a 3x3 and a 1x1 convolution, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.conv2, self.bn2 = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.conv3 = torch.nn.Conv2d(16, 8, 1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y))) + y
        return self.fc(self.conv3(y).mean((2, 3)))


def test_lora_on_convolutions():
    """LoRA's Conv2d layers (``lora_A`` a conv of the base kernel, ``lora_B`` a 1x1 conv) are
    pruned with their base convolutions: equal to ``apply_mask`` at two image sizes, every LoRA
    layer's sizes PEFT's, and ``merge_and_unload`` gives the pruned CNN."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "conv3", "fc"])
    model = _randomize(peft.get_peft_model(_ConvNet(), config)).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = _trace_without_fx_attempt(model, x)
    exact = {g.name.removeprefix("base_model.model."): g.size for g in graph.groups if g.exact}
    assert exact == {"conv1.base_layer": 16, "conv3.base_layer": 8, **{f"{n}.lora_A.default": 4 for n in ("conv1", "conv2", "conv3", "fc")}}
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is type(model)
    ref = _reference(model, graph, mask)
    for inp in (x, torch.randn(1, 3, 11, 7)):
        with torch.no_grad():
            assert max_rel_diff(small(inp), ref(inp)) < 1e-5
    layers = _lora_layers(small)
    assert len(layers) == 4 and all((m.in_features, m.out_features) == m._get_in_out_features(m.get_base_layer()) for _, m in layers)
    assert all(m.r["default"] == 2 for _, m in layers)
    conv2 = small.get_base_model().conv2
    a, b = conv2.lora_A["default"], conv2.lora_B["default"]
    assert (conv2.in_features, conv2.out_features) == (8, 8)
    assert (a.in_channels, a.out_channels, a.kernel_size, b.in_channels, b.out_channels) == (8, 2, (3, 3), 2, 8)
    merged = copy.deepcopy(small).merge_and_unload()
    assert type(merged) is _ConvNet and merged.conv2.weight.shape == (8, 8, 3, 3)
    with torch.no_grad():
        assert max_rel_diff(merged(x), ref(x)) < 1e-5
