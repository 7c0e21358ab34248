"""ONNX export of pruned transformers models: encoders (BERT, ViT) and decoders' forward
(Llama with GQA, GPT-2), with keyword inputs, a dynamic batch and a dynamic sequence length.

Three oracles per model: ``export_onnx``'s own verification (example sizes and other ones);
an independent ONNX Runtime session compared here with the pruned model *and* with the
masked original (``apply_mask`` on a copy) at the example shape and at another batch and
sequence length, with padding; and the file's weights are the pruned ones (fewer
initializer elements than the dense model has parameters, no tensor of the dense MLP width).
Tiny random-init configs; the dynamo exporter (the first choice) except where TorchScript
is the point. Then what cannot be exported is refused naming the module and why: a cache in
or out, an operator without translation (located in torch.export's graph), transformers'
MoE experts kernel (with the implementation that exports); and the attention translation
that makes left-padded batches verify.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import transformers
from test_export import wobble
from torch import nn

import prunefx
from prunefx.export import onnx_session

VOCAB, HIDDEN, MLP = 128, 64, 80  # MLP: the dense intermediate size, which pruning halves
SEQ = {1: "sequence"}


def _randomized(model: nn.Module) -> nn.Module:
    """Non-zero biases and norm weights: zero-initialised ones would hide a wrong slice."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=MLP, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=MLP, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def _vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=MLP, num_labels=10)
    return transformers.ViTForImageClassification(cfg)


def _tokens(batch: int, seq: int, seed: int, pad: str) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask with the first row padded on the ``pad`` side (left:
    how a causal LM's batch is padded for generation; its padded queries see no key at all)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 3] = 0
    if pad == "right":
        mask = mask.flip(1)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen), "attention_mask": mask}


# name -> (factory, make inputs(batch, seq, seed) -> (positional, tensor kwargs), constant kwargs, dynamic axes, exporter)
CASES = {
    "llama_gqa": (_llama, lambda b, s, k: _split(_tokens(b, s, k, "left")), {"use_cache": False}, {"input_ids": SEQ, "attention_mask": SEQ}, "dynamo"),
    "gpt2": (_gpt2, lambda b, s, k: _split(_tokens(b, s, k, "left")), {"use_cache": False}, {"input_ids": SEQ, "attention_mask": SEQ}, "torchscript"),
    "bert": (_bert, lambda b, s, k: _split({**_tokens(b, s, k, "right"), "token_type_ids": (torch.arange(s) >= s // 2).long().expand(b, s).contiguous()}), {}, {"input_ids": SEQ, "attention_mask": SEQ, "token_type_ids": SEQ}, "dynamo"),
    "vit": (_vit, lambda b, s, k: ((torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(k)),), {}), {}, None, "dynamo"),
}


def _split(tokens: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    ids = tokens.pop("input_ids")
    return (ids,), tokens


def _logits(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs).logits


def _max_rel(got: np.ndarray, ref: torch.Tensor) -> float:
    ref_np = ref.numpy()
    return float(np.abs(got - ref_np).max() / np.abs(ref_np).max())


@pytest.mark.parametrize("family", list(CASES))
def test_pruned_transformer_exports_and_matches_the_masked_model(family: str, tmp_path: Path) -> None:
    make, inputs, constants, axes, exporter = CASES[family]
    torch.manual_seed(0)
    model = _randomized(make())
    args, kw = inputs(2, 8, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' config notes, "auto" falling back to torch.export
        graph = prunefx.trace(model, args, example_kwargs=constants or None)
        mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
        small = prunefx.reconfigure(model, mask, graph=graph)
        ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph).eval()
    assert type(small) is type(model)

    result = prunefx.export_onnx(small, tmp_path / "m.onnx", args, example_kwargs={**kw, **constants}, dynamic_axes=axes, exporter=exporter)
    assert result.exporter == exporter and result.max_rel_diff <= 1e-4
    assert result.output_names == ("logits",)
    names = ("input_ids", *kw) if axes else ("pixel_values",)
    assert result.input_names == names
    assert result.verified_batches == (2, 4)
    if axes:  # verified at another sequence length too; the logits follow both axes
        assert [s["sequence"] for s in result.verified_sizes] == [8, 11]
        assert result.dynamic_axes["attention_mask"] == {0: "batch", 1: "sequence"}
        assert result.dynamic_axes["logits"] == ({0: "batch", 1: "sequence"} if family != "bert" else {0: "batch"})

    # an independent session, against the pruned model and the masked original, at two shapes
    sess = onnx_session(result.path, "cpu")
    for batch, seq, seed in ((2, 8, 0), (3, 13, 1)) if axes else ((2, 8, 0), (5, 8, 1)):
        args, kw = inputs(batch, seq, seed)
        feeds = {n: t.numpy() for n, t in zip(names, (*args, *kw.values()), strict=True)}
        (got,) = sess.run(None, feeds)
        assert _max_rel(got, _logits(small, args, {**kw, **constants})) <= 1e-4, (family, batch, seq)
        assert _max_rel(got, _logits(ref, args, {**kw, **constants})) <= 1e-4, (family, batch, seq)

    # the file holds the pruned weights
    weights = onnx.load(str(result.path)).graph.initializer
    dense_params = sum(p.numel() for p in model.parameters())
    assert sum(int(np.prod(t.dims)) for t in weights) <= 0.8 * dense_params
    assert not [t.name for t in weights if MLP in t.dims], "a dense MLP weight in the pruned file"


# ----------------------------------------------------------------------------- attention


class MaskedAttention(nn.Module):
    """SDPA with a boolean mask whose first query row allows no key (a left-padded position)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unsqueeze(1)  # (batch, 1 head, seq, 8)
        allowed = keep[:, None, None, :] & keep[:, None, :, None]
        return F.scaled_dot_product_attention(q, q, q, attn_mask=allowed)


def test_attention_rows_that_see_no_key_match_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch gives zeros where a query may attend to no key; onnxscript's translation (opset
    < 23) attends uniformly there. prunefx's translation makes them agree, and without it the
    verification catches the difference."""
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x, keep = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool)
    keep[0, :2] = False
    with torch.no_grad():
        assert model(x, keep)[0, 0, :2].abs().max() == 0  # the rows that see no key
    result = prunefx.export_onnx(model, tmp_path / "m.onnx", (x, keep), exporter="dynamo", dynamic_axes={"x": SEQ, "keep": SEQ})
    assert result.max_abs_diff <= 1e-5

    from prunefx.export import translations

    monkeypatch.setattr(translations, "_custom_translations", lambda opset: {})
    with pytest.raises(prunefx.ExportError, match=r"does not reproduce PyTorch: output 'output' at batch 2, sequence 6"):
        prunefx.export_onnx(model, tmp_path / "m.onnx", (x, keep), exporter="dynamo", dynamic_axes={"x": SEQ, "keep": SEQ})


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    return _llama().eval()


IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def test_a_cache_output_is_refused_with_what_to_do(llama: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(prunefx.ExportError) as info:  # use_cache defaults to True: the output holds a DynamicCache
        prunefx.export_onnx(llama, tmp_path / "m.onnx", IDS)
    msg = str(info.value)
    assert msg.startswith("LlamaForCausalLM returns a DynamicCache at output ")
    assert "example_kwargs={'use_cache': False}" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_a_cache_input_is_refused(llama: nn.Module, tmp_path: Path) -> None:
    cache = transformers.DynamicCache(config=llama.config)
    with pytest.raises(prunefx.ExportError, match=r"example_kwargs\['past_key_values'\] of LlamaForCausalLM is a DynamicCache .*use_cache=False"):
        prunefx.export_onnx(llama, tmp_path / "m.onnx", IDS, example_kwargs={"past_key_values": cache, "use_cache": False})


@pytest.mark.parametrize(
    "axes, words",
    [
        pytest.param({"ids": SEQ}, ("names the input 'ids'", "['input_ids', 'attention_mask']"), id="unknown-input"),
        pytest.param({"input_ids": {2: "sequence"}}, ("input 'input_ids' has shape (2, 8)",), id="dim-out-of-range"),
        pytest.param({"input_ids": SEQ, "attention_mask": {0: "sequence"}}, ("'sequence' has size 8 at input_ids.shape[1] but 2",), id="one-name-two-sizes"),
    ],
)
def test_bad_dynamic_axes_fail_before_any_work(axes, words, llama: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("prunefx.export._reference_batches", lambda *a: pytest.fail("work started"))
    with pytest.raises(prunefx.ExportError) as info:
        prunefx.export_onnx(llama, tmp_path / "m.onnx", IDS, example_kwargs={"attention_mask": torch.ones_like(IDS), "use_cache": False}, dynamic_axes=axes)
    assert all(w in str(info.value) for w in words), str(info.value)


class Jiggle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wobble(x)  # test_export's operator without an ONNX translation


def test_an_op_without_onnx_translation_names_the_layer(tmp_path: Path) -> None:
    """fx cannot trace a transformers model, so the operator is located in torch.export's
    graph: the module path and the source line of the call."""
    torch.manual_seed(0)
    model = _llama().eval()
    model.model.layers[1].mlp.act_fn = Jiggle()
    with pytest.raises(prunefx.ExportError) as info:
        prunefx.export_onnx(model, tmp_path / "m.onnx", IDS, example_kwargs={"use_cache": False}, exporter="dynamo")
    msg = str(info.value)
    assert msg.startswith("cannot export LlamaForCausalLM to ONNX with the dynamo exporter: ONNX opset cannot express the operator 'prunefx_test::wobble'")
    assert "in module 'model.layers.1.mlp.act_fn' (Jiggle)" in msg and "test_onnx_transformers.py:" in msg
    assert list(tmp_path.iterdir()) == []


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


def test_moe_experts_kernel_is_refused_with_the_alternative_that_exports(tmp_path: Path) -> None:
    """transformers' default grouped_mm experts kernel has no ONNX translation; the error says
    which implementation exports, and the pruned MoE model then exports and verifies."""
    torch.manual_seed(0)
    model = _randomized(_mixtral())
    args, kw = _split(_tokens(2, 8, 0, "left"))
    kw["use_cache"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = prunefx.trace(model, args, example_kwargs={"use_cache": False})
        small = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5, exact_only=True, seed=0), graph=graph)
    assert small.config._experts_implementation == "grouped_mm"
    with pytest.raises(prunefx.ExportError) as info:
        prunefx.export_onnx(small, tmp_path / "m.onnx", args, example_kwargs=kw, exporter="torchscript")
    msg = str(info.value)
    assert "in module 'model.layers.0.mlp.experts' (MixtralExperts)" in msg
    assert "what to do: transformers' grouped_mm experts kernel has no ONNX translation; set model.config._experts_implementation = 'eager'" in msg

    small.config._experts_implementation = "eager"
    result = prunefx.export_onnx(small, tmp_path / "m.onnx", args, example_kwargs=kw, exporter="torchscript", dynamic_axes={"input_ids": SEQ, "attention_mask": SEQ})
    assert result.max_rel_diff <= 1e-4 and [s["sequence"] for s in result.verified_sizes] == [8, 11]
