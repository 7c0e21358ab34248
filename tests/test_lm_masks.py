"""Mask sources and the inspector on language models (issue 14, item 3): gradient criteria
with a causal-LM loss through the export front-end, ``to_budget(params=)``, the inspector's
per-layer heads / KV heads / MLP channels, and heads kept whole once a layer has one KV head
left."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import prunefx
from prunefx.masks.saliency import gradient_flow_scores, snip_scores, taylor_scores

VOCAB = 128
KW = {"use_cache": False}


def _llama(kv: int = 2, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm weights of 1 hide misaligned slices
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def llama():
    model = _llama()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, ids, prunefx.trace(model, (ids,), example_kwargs=KW)


def test_causal_lm_loss_is_the_models_own_loss(llama) -> None:
    model, ids, _ = llama
    out = model(ids, **KW)
    expected = model(ids, labels=ids, **KW).loss
    for given in (out, out.logits, (out.logits,)):
        torch.testing.assert_close(prunefx.masks.causal_lm_loss(given, ids), expected)
    labels = ids.clone()
    labels[:, :4] = -100  # ignored positions, as in transformers
    torch.testing.assert_close(prunefx.masks.causal_lm_loss(out, labels), model(ids, labels=labels, **KW).loss)
    with pytest.raises(ValueError, match="causal_lm_loss takes"):
        prunefx.masks.causal_lm_loss(out, ids[:, :3])


@pytest.mark.parametrize("scores", [taylor_scores, snip_scores, gradient_flow_scores], ids=["taylor", "snip", "gradient_flow"])
def test_gradient_criteria_on_a_causal_lm(llama, scores) -> None:
    """The export capture runs with the graph's keyword inputs (use_cache=False) and returns
    the model's own output type; scoring it equals scoring the model itself, with inputs
    given positionally or by keyword. gradient_flow's second derivative goes through SDPA."""
    model, ids, g = llama
    through_graph = scores(g, loss_fn=prunefx.masks.causal_lm_loss, batch=(ids, ids))
    through_model = scores(g, loss_fn=prunefx.masks.causal_lm_loss, batch=({"input_ids": ids}, ids), model=model)
    assert set(through_graph) == {gr.name for gr in g.groups if gr.prunable}
    for name, s in through_graph.items():
        torch.testing.assert_close(s, through_model[name], rtol=1e-4, atol=1e-10)
        assert torch.isfinite(s).all() and (s > 0).any(), name
    assert through_graph["model.layers.0.self_attn.q_proj"].shape == (2,)  # a KV head with its query heads
    assert all(p.grad is None for p in model.parameters())


def test_taylor_is_the_first_order_change_of_the_loss(llama) -> None:
    """For one KV-head slot, Taylor's score is (sum w * dL/dw)^2 over every weight the slot
    writes or reads, i.e. the squared first-order loss change of removing the slot."""
    model, ids, g = llama
    s = taylor_scores(g, loss_fn=prunefx.masks.causal_lm_loss, batch=(ids, ids))["model.layers.1.self_attn.q_proj"]
    loss = prunefx.masks.causal_lm_loss(model(ids, **KW), ids)
    attn = model.model.layers[1].self_attn
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight]
    grads = torch.autograd.grad(loss, weights)
    d = attn.head_dim
    by_hand = []
    for slot in range(2):  # KV head `slot` with query heads 2*slot and 2*slot + 1
        q, kv = slice(2 * slot * d, (2 * slot + 2) * d), slice(slot * d, (slot + 1) * d)
        total = ((weights[0][q] * grads[0][q]).sum() + (weights[1][kv] * grads[1][kv]).sum()
                 + (weights[2][kv] * grads[2][kv]).sum() + (weights[3][:, q] * grads[3][:, q]).sum())
        by_hand.append(float(total.detach()) ** 2)
    torch.testing.assert_close(s.double(), torch.tensor(by_hand, dtype=torch.double), rtol=1e-4, atol=1e-12)


def test_to_budget_params_and_taylor_mask_on_a_causal_lm(llama) -> None:
    model, ids, g = llama
    mask = prunefx.masks.to_budget(g, "taylor", params=0.75, scope="local", exact_only=True,
                                   loss_fn=prunefx.masks.causal_lm_loss, batch=(ids, ids))
    small = prunefx.reconfigure(model, mask, graph=g)
    kept = prunefx.count_params(small) / prunefx.count_params(model)
    assert abs(kept - prunefx.masks.estimate_cost(g, mask).params_ratio) < 1e-9
    assert abs(kept - 0.75) < 0.03, kept  # a head slot is 8% of this tiny model: the closest reachable
    masked = prunefx.apply_mask(copy.deepcopy(model), mask, graph=g)
    with torch.no_grad():
        for x in (ids, ids[:1, :5]):
            torch.testing.assert_close(small(x, **KW).logits, masked(x, **KW).logits, atol=1e-5, rtol=1e-5)


def test_inspector_shows_heads_kv_heads_and_mlp_per_layer(llama) -> None:
    model, ids, g = llama
    report = prunefx.inspect(model, graph=g)
    assert [b.name for b in report.blocks] == ["model.layers.0", "model.layers.1"]
    b = report.blocks[1]
    assert (b.heads, b.kv_heads, b.head_dim, b.mlp_channels) == (4, 2, 16, 96)
    assert b.attention == ("model.layers.1.self_attn.q_proj",) and b.mlp == ("model.layers.1.mlp.gate_proj",)
    assert b.slot == "a KV head with its 2 query heads"
    assert b.params == sum(p.numel() for p in model.model.layers[1].parameters())
    assert 0 < b.flops < report.totals.flops
    text = report.render(groups=0, layers=0)
    assert "Transformer blocks (2)" in text and "a KV head with its 2 query heads" in text
    mask = dict(prunefx.masks.random(g, 0.5, exact_only=True, seed=0))
    mask["model.layers.0.self_attn.q_proj"] = torch.tensor([True, True])  # layer 0 keeps its heads
    small = prunefx.reconfigure(model, mask, graph=g)
    after = prunefx.inspect(small, (ids,), example_kwargs=KW).blocks
    assert [(a.heads, a.kv_heads, a.mlp_channels) for a in after] == [(4, 2, 48), (2, 1, 48)]


def test_inspector_of_a_model_without_blocks_has_none() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    report = prunefx.inspect(model, torch.randn(2, 4))
    assert report.blocks == () and "Transformer blocks" not in report.render()


def test_one_kv_head_left_keeps_heads_whole() -> None:
    """With one KV head, view(b, s, -1, head_dim) is an unsqueeze and each value channel is
    exactly removable in the graph, but a LlamaAttention reads head_dim from its config: the
    value channels are pinned with that reason, and a second reconfiguration (PruneTrain's
    next shrink) works on what is left."""
    model = _llama(kv=1)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    g = prunefx.trace(model, (ids,), example_kwargs=KW)
    v = g.group_of("model.layers.0.self_attn.v_proj")
    assert not v.prunable and "heads are kept or removed whole" in v.reason and "head_dim=16" in v.reason
    with pytest.raises(prunefx.MaskError, match="heads are kept or removed whole"):
        prunefx.reconfigure(model, {"model.layers.0.self_attn.v_proj": torch.arange(16) < 8}, graph=g)
    mask = prunefx.masks.random(g, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=g)
    g2 = prunefx.trace(small, (ids,), example_kwargs=KW)
    smaller = prunefx.reconfigure(small, prunefx.masks.random(g2, 0.5, exact_only=True, seed=1), graph=g2)
    assert type(smaller) is transformers.LlamaForCausalLM
    assert prunefx.count_params(smaller) < prunefx.count_params(small) < prunefx.count_params(model)


def test_flop_counter_counts_grouped_matmuls() -> None:
    """torch has no FLOP formula for a mixture of experts' grouped matmul: prunefx's counter
    (count_flops, the inspector, the cost model) counts 2 * S * K * N for it."""
    import transformers.integrations.moe  # noqa: F401  registers transformers::grouped_mm_fallback

    from prunefx.flops import flop_counter

    x, w = torch.randn(5, 8), torch.randn(2, 8, 3)
    offs = torch.tensor([2, 5], dtype=torch.int32)
    with flop_counter() as counter:
        out = torch.ops.transformers.grouped_mm_fallback(x, w, offs)
    assert out.shape == (5, 3) and counter.get_total_flops() == 2 * 5 * 8 * 3
    torch.testing.assert_close(out, torch.cat([x[:2] @ w[0], x[2:] @ w[1]]))
