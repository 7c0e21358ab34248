"""PruneTrain on a tiny random-init transformers causal LM (Llama, GQA): the group lasso over
attention heads (a KV head with its query heads) and MLP channels, traced with the export
front-end (``example_kwargs={"use_cache": False}``), periodic shrinks during AdamW training,
the model staying a ``LlamaForCausalLM`` whose config and per-layer sizes follow."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from layouts import kept_indices, sliced_to

import prunefx
import prunefx.transformers

VOCAB = 128
KW = {"use_cache": False}


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


def _sizes(model) -> list[tuple[int, int, int]]:
    return [(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size) for s in prunefx.transformers.layer_sizes(model)]


def _loss(model, x) -> float:
    with torch.no_grad():
        return float(model(input_ids=x, labels=x, **KW).loss)




def _train(pt, model, opt, x, steps: int) -> None:
    """``steps`` AdamW steps on the causal-LM loss with PruneTrain's lasso and proximal step."""
    for _ in range(steps):
        loss = model(input_ids=x, labels=x, **KW).loss
        opt.zero_grad()
        pt.regularize(loss).backward()
        opt.step()
        pt.after_step()


def test_lasso_and_proximal_steps_on_a_causal_lm():
    """The lasso's groups are the heads and MLP channels of every layer, found through the
    export front-end, and proximal steps put MLP channels at exact zeros."""
    model, x = _llama(), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lasso = prunefx.train.GroupLasso(model, (x,), example_kwargs=KW, lam=20.0)
    pt = prunefx.train.PruneTrain(model, opt, example_inputs=(x,), example_kwargs=KW, mode="proximal", lasso=lasso)
    assert [g.name for g in lasso.groups] == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.gate_proj")]
    assert lasso.num_channels == 2 * (2 + 96)  # a slot is a KV head with its 2 query heads
    _train(pt, model, opt, x, 30)
    zeros = {name: int((n == 0).sum()) for name, n in lasso.channel_norms().items()}
    assert sum(zeros.values()) > 0, zeros


@pytest.mark.filterwarnings("ignore")
def test_prunetrain_shrinks_a_causal_lm_and_adamw_follows():
    model, x = _llama(), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # weights by sqrt(size): a head slot (6144 weights) goes at the pace of an MLP channel (192)
    lasso = prunefx.train.GroupLasso(model, (x,), example_kwargs=KW, lam=0.5, weighting="size")
    pt = prunefx.train.PruneTrain(model, opt, example_inputs=(x,), example_kwargs=KW, every=1, start_after=1, stop_after=5,
                                  mode="proximal", lasso=lasso, threshold=1e-8)
    shrinks: list[dict] = []
    for epoch in range(6):  # shrinks after epochs 1 to 4; epoch 5 trains the last architecture
        model = pt.model
        model.train()
        _train(pt, model, opt, x, 10)
        if shrinks and "loss_after" not in shrinks[-1]:
            shrinks[-1]["loss_after"] = _loss(model, x)
        if not pt.due(epoch):
            continue
        before = {"loss": _loss(model, x), "sizes": _sizes(model), "model": copy.deepcopy(model).eval(),
                  "kept": {n: kept_indices(model, n, p.shape) for n, p in model.named_parameters()},
                  "state": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}}
        small = pt.epoch_end(epoch)
        if small is model:
            continue
        assert type(small) is transformers.LlamaForCausalLM  # emit="auto": the module emitter
        sizes = _sizes(small)
        assert sizes != before["sizes"] and all(a <= b for s, t in zip(sizes, before["sizes"], strict=True) for a, b in zip(s, t, strict=True))
        for layer, (heads, kv, inter) in zip(small.model.layers, sizes, strict=True):
            assert layer.mlp.gate_proj.out_features == layer.mlp.down_proj.in_features == inter
            assert layer.self_attn.q_proj.out_features == heads * small.config.head_dim
            assert layer.self_attn.k_proj.out_features == kv * small.config.head_dim
        small.eval()
        with torch.no_grad():  # the removed channels were exact zeros: the same function, at another shape too
            for ids in (x, x[:3, :11]):
                torch.testing.assert_close(small(input_ids=ids, **KW).logits, before["model"](input_ids=ids, **KW).logits,
                                           atol=1e-5, rtol=1e-5)
        params = dict(small.named_parameters())
        assert set(params) <= set(before["state"]), "a constant fold gave a bias-free Linear of the Llama a bias"
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params.values()}
        for name, p in params.items():  # AdamW's state: the pre-shrink state at the kept indices, exactly
            old_state, new_state = before["state"][name], opt.state[p]
            new_kept = kept_indices(small, name, p.shape)
            assert torch.equal(new_state["step"], old_state["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new_state[key], sliced_to(old_state[key], before["kept"][name], new_kept)), (name, key)
        shrinks.append({"epoch": epoch, "before": before["sizes"], "after": sizes, "loss": before["loss"], "loss_at_shrink": _loss(small, x)})
    assert shrinks, "no shrink removed a head or an MLP channel"
    fewer = [(a[0] < b[0], a[2] < b[2]) for s in shrinks for a, b in zip(s["after"], s["before"], strict=True)]
    assert any(h for h, _ in fewer) and any(m for _, m in fewer), shrinks  # heads and MLP channels both go
    for s in shrinks:
        assert s["loss_after"] < s["loss_at_shrink"], s  # training goes on improving the smaller model


def test_size_weighting_counts_the_weights_of_a_slot():
    """weighting="size": a KV-head slot holds 2 query heads' q rows and o columns and one
    head's k and v rows (6144 weights at hidden 64, head_dim 16), an MLP channel a gate row,
    an up row and a down column (192); the penalty weighs each norm by sqrt of that count and
    the proximal step shrinks each norm by step * sqrt(count)."""
    model, x = _llama(), _batch()
    lasso = prunefx.train.GroupLasso(model, (x,), example_kwargs=KW, lam=1.0, weighting="size")
    plain = prunefx.train.GroupLasso(model, (x,), example_kwargs=KW, lam=1.0)
    counts = torch.tensor([6144.0] * 2 + [192.0] * 96, dtype=torch.float64).repeat(2)
    norms = torch.cat(list(plain.channel_norms().values()))
    with torch.no_grad():
        torch.testing.assert_close(lasso.penalty().double(), (counts.sqrt() * norms).sum(), rtol=1e-5, atol=0)
    step = 2e-3
    lasso.prox_(step)
    after = torch.cat(list(plain.channel_norms().values()))
    torch.testing.assert_close(after, (norms - step * counts.sqrt()).clamp_min(0), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="weighting"):
        prunefx.train.GroupLasso(model, (x,), example_kwargs=KW, weighting="heads")


@pytest.mark.filterwarnings("ignore")
def test_shrink_of_a_model_whose_config_turns_the_cache_off():
    """Training setups turn config.use_cache off; a Llama without a cache calls .item() on
    its position ids, which meta tensors cannot do. The shrink's FLOPs of an export capture
    come from the cost model of its graph (exact here), not from the model run on meta
    tensors, and equal a real count of the graphs before and after."""
    model, x = _llama(), _batch()
    model.config.use_cache = False
    with torch.no_grad():  # MLP channels 0-39 of layer 0 dead
        mlp = model.model.layers[0].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[:40] = 0
        mlp.down_proj.weight[:, :40] = 0
    small, report = prunefx.train.shrink(model.eval(), example_inputs=(x,), example_kwargs=KW)
    assert report.changed and report.channels["model.layers.0.mlp.gate_proj"] == (96, 56)
    g_before = prunefx.trace(model, (x,), example_kwargs=KW)
    g_after = prunefx.trace(small, (x,), example_kwargs=KW)
    assert report.flops == (prunefx.count_flops(g_before.module, g_before.flat_inputs),
                            prunefx.count_flops(g_after.module, g_after.flat_inputs))
