"""A pruned transformers model is a transformers model (issue 14, items 1-2).

Tiny random-init Llama (GQA), Qwen2, Mistral, GPT-2, BERT and ViT (2 layers, hidden 64;
nothing downloaded), each traced once through the export front-end:

- a random 50% mask over the exact groups (the same keep count in every layer) gives a model
  of the same class with >= 20% fewer parameters, equal to ``apply_mask`` on a copy at the
  example shape and at another batch size and sequence length; its config says the new
  sizes; ``save_pretrained`` + the stock ``from_pretrained`` reproduce it where the config
  can say the sizes (Llama, Qwen2, Mistral, ViT: ``head_dim`` is a config field), and where
  it cannot (GPT-2, BERT: the head width is hidden_size / heads) the stock loader fails,
  ``stock_reason`` says why and ``prunefx.transformers.from_pretrained`` reproduces it;
  causal LMs ``generate`` the masked model's tokens, before and after the reload;
- a mask whose layers keep different counts reloads through
  ``prunefx.transformers.from_pretrained`` only (with the per-layer sizes recorded), and
  ``prunefx.masks.uniform_layers`` makes it uniform again (stock-loadable), with ``round_to``;
- CLIP's vision tower and Whisper's encoder stay their class too (CLIP reloads through
  prunefx's loader); so do encoder-decoder models (BART, Whisper, T5: both stacks'
  attention, the decoder's cross-attention included; they reload through prunefx's loader,
  and with an MLP-only mask through the stock one, the config saying both stacks' widths);
- SegFormer, whose config lists one head count per stage: the list is left as it was;
- mixtures of experts (Qwen2-MoE, Mixtral): the experts' channels, heads and the shared expert are
  exact, whole experts pinned;
- a pruned residual stream (approximate) sets ``config.hidden_size``; Qwen2-MoE's shared
  expert sets ``shared_expert_intermediate_size``; the loader checks the record;
- layouts prunefx cannot write (T5's attention, Phi-3's config-read split with per-layer head
  counts) raise a ``ReconfigureError`` naming the module and why.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_export_frontend import FAMILIES, _randomize

import prunefx
import prunefx.transformers
from zoo import max_rel_diff

CAUSAL = {"llama_gqa", "qwen2", "mistral", "gpt2"}
STOCK_LOADS_UNIFORM = {"llama_gqa", "qwen2", "mistral", "vit"}  # head_dim is read from the config


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def _out(model, inp, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(inp, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _sizes(model) -> list[tuple]:
    return [(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size) for s in prunefx.transformers.layer_sizes(model)]


def _uneven(mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer 1 keeps the first slot of each group only, layer 0 what ``mask`` keeps."""
    out = {}
    for name, keep in mask.items():
        if ".1." in name:
            keep = torch.zeros_like(keep)
            keep[0] = True
        out[name] = keep
    return out


def _same_outputs(a, b, inputs, kwargs) -> None:
    for inp in inputs:
        assert max_rel_diff(_out(a, inp, kwargs), _out(b, inp, kwargs)) <= 1e-4, tuple(inp.shape)


def _generates_alike(small, ref, x) -> None:
    tokens = small.generate(x, max_new_tokens=5, do_sample=False)
    assert tokens.shape == (x.shape[0], x.shape[1] + 5)
    assert torch.equal(tokens, ref.generate(x, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "mistral", "gpt2", "bert", "vit"])
def test_pruned_model_is_a_transformers_model(family: str, tmp_path) -> None:
    make, kwargs, _, _, inputs = FAMILIES[family]
    torch.manual_seed(0)
    model = _randomize(make())
    x, other, _ = inputs()  # the example, and another batch size and sequence length
    graph = prunefx.trace(model, (x,), example_kwargs=kwargs or None, frontend="export")

    # uniform: the same count in every layer
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)  # emit="auto": the module emitter
    assert type(small) is type(model)
    assert _params(small) <= 0.8 * _params(model), _params(small) / _params(model)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    _same_outputs(small, ref, (x, other), kwargs)
    heads, kv, width = _sizes(small)[0]
    assert _sizes(small) == [(heads, kv, width)] * 2
    assert (small.config.num_attention_heads, prunefx.transformers.layer_sizes(small)[0].head_dim) == (heads, 16)
    assert width < (96 if family != "gpt2" else 256)
    assert model.config.num_attention_heads == 4, "the input model's config changed"

    small.save_pretrained(tmp_path / "uniform")
    reason = prunefx.transformers.stock_reason(small)
    if family in STOCK_LOADS_UNIFORM:
        assert reason is None, reason
        again = type(model).from_pretrained(tmp_path / "uniform")
    else:
        assert reason is not None and "hidden_size / num_attention_heads" in reason, reason
        with pytest.raises(RuntimeError, match="mismatch"):
            type(model).from_pretrained(tmp_path / "uniform")
        again = prunefx.transformers.from_pretrained(tmp_path / "uniform")
    assert type(again) is type(model) and _sizes(again) == _sizes(small)
    _same_outputs(again, small, (x, other), kwargs)
    if family in CAUSAL:
        _generates_alike(small, ref, x)
        _generates_alike(again, ref, x)

    # per-layer sizes: only prunefx's loader can build it
    uneven = _uneven(mask)
    small = prunefx.reconfigure(model, uneven, graph=graph)
    assert _sizes(small)[0] != _sizes(small)[1]
    assert "layers keep different sizes" in prunefx.transformers.stock_reason(small)
    ref = prunefx.apply_mask(copy.deepcopy(model), uneven, graph=graph)
    _same_outputs(small, ref, (x, other), kwargs)
    small.save_pretrained(tmp_path / "uneven")
    again = prunefx.transformers.from_pretrained(tmp_path / "uneven")
    assert type(again) is type(model) and _sizes(again) == _sizes(small)
    _same_outputs(again, small, (x, other), kwargs)
    if family in CAUSAL:
        _generates_alike(again, ref, x)

    # made uniform again, MLP widths rounded to multiples of 8
    even = prunefx.masks.uniform_layers(graph, uneven, scores="magnitude", round_to={"*mlp*": 8, "*intermediate*": 8})
    small = prunefx.reconfigure(model, even, graph=graph)
    sizes = _sizes(small)
    assert sizes[0] == sizes[1] and sizes[0][2] % 8 == 0, sizes
    if family in STOCK_LOADS_UNIFORM:
        assert prunefx.transformers.stock_reason(small) is None


@pytest.fixture(scope="module")
def llama():
    make, kwargs, _, _, inputs = FAMILIES["llama_gqa"]
    torch.manual_seed(0)
    model = _randomize(make())
    x, other, _ = inputs()
    return model, prunefx.trace(model, (x,), example_kwargs=kwargs, frontend="export"), (x, other)


def test_pruned_hidden_stream_sets_hidden_size(llama, tmp_path) -> None:
    """The residual stream (approximate) pruned uniformly: config.hidden_size follows and the
    stock loader rebuilds the model."""
    model, graph, inputs = llama
    mask = {"model.embed_tokens#1": torch.arange(64) % 4 != 0, **prunefx.masks.random(graph, 0.5, exact_only=True, seed=1)}
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert small.config.hidden_size == 48 and small.model.norm.weight.shape == (48,)
    assert prunefx.transformers.stock_reason(small) is None
    small.save_pretrained(tmp_path)
    _same_outputs(transformers.LlamaForCausalLM.from_pretrained(tmp_path), small, inputs, {"use_cache": False})


def test_uniform_layers_counts_and_rounding(llama) -> None:
    """The mean count per part, rounded to round_to; the highest scores kept; pinned sizes."""
    graph = llama[1]
    mlp0, mlp1 = "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"
    mask = {mlp0: torch.arange(96) < 90, mlp1: torch.arange(96) < 30}  # mean 60
    out = prunefx.masks.uniform_layers(graph, mask)
    assert [int(out[n].sum()) for n in (mlp0, mlp1)] == [60, 60]
    assert bool(out[mlp1][:30].all()), "the channels the mask kept are kept first"
    out = prunefx.masks.uniform_layers(graph, mask, round_to=16)
    assert [int(out[n].sum()) for n in (mlp0, mlp1)] == [64, 64]
    scores = {mlp0: torch.arange(96.0), mlp1: -torch.arange(96.0)}
    out = prunefx.masks.uniform_layers(graph, mask, scores=scores, round_to={"*.mlp.*": 8, "*": 1})
    assert bool(out[mlp0][-64:].all()) and bool(out[mlp1][:64].all()) and int(out[mlp0].sum()) == 64
    with pytest.raises(prunefx.MaskError, match="round_to must be an integer"):
        prunefx.masks.uniform_layers(graph, mask, round_to=0)
    with pytest.raises(prunefx.MaskError, match="unknown criterion"):
        prunefx.masks.uniform_layers(graph, mask, scores="loudness")
    with pytest.raises(prunefx.MaskError):
        prunefx.masks.uniform_layers(graph, {"model.layers.0.mlp.nope": torch.ones(96, dtype=torch.bool)})


def test_t5_attention_is_refused_by_name() -> None:
    """T5's attention reshapes to n_heads heads of key_value_proj_dim channels: the value
    channels the graph could remove inside a head are pinned, the mask naming the module."""
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    model = transformers.T5EncoderModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    graph = prunefx.trace(model, (ids,), frontend="export")
    v = graph.group_of("encoder.block.0.layer.0.SelfAttention.v")
    with pytest.raises(prunefx.MaskError, match=r"'encoder\.block\.0\.layer\.0\.SelfAttention' \(T5Attention\).*heads are kept or removed whole"):
        prunefx.reconfigure(model, {v.name: torch.arange(v.size) < 8}, graph=graph)
    # its MLP alone is pruned by a mask over the exact groups, and the config's d_ff follows
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    assert all("DenseReluDense" in k for k in mask)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert small.config.d_ff == 48 and type(small) is type(model)


def test_phi3_per_layer_heads_are_refused_by_name() -> None:
    """Phi-3 splits its fused qkv_proj at config.num_attention_heads: one count for all layers."""
    make, kwargs, _, _, inputs = FAMILIES["phi3"]
    model = _randomize(make())
    graph = prunefx.trace(model, (inputs()[0],), example_kwargs=kwargs, frontend="export")
    heads = {g.name: torch.tensor([True, i == 0]) for i, g in enumerate(g for g in graph.groups if g.name.endswith("qkv_proj") and g.exact)}
    with pytest.raises(prunefx.ReconfigureError, match=r"module 'model\.layers\.1\.self_attn' \(Phi3Attention\) reads config\.num_attention_heads"):
        prunefx.reconfigure(model, heads, graph=graph)
    small = prunefx.reconfigure(model, prunefx.masks.uniform_layers(graph, heads), graph=graph)
    assert _sizes(small)[0] == _sizes(small)[1] and small.config.num_attention_heads == 4  # the mean, 1.5 KV heads, rounds up


def _clip():
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    return transformers.CLIPVisionModel(cfg), [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]


def _whisper_config():
    return transformers.WhisperConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                      decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=16,
                                      max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=0,
                                      eos_token_id=0, decoder_start_token_id=0)


def _whisper_encoder():
    return transformers.WhisperModel(_whisper_config()).get_encoder(), [torch.randn(2, 16, 32), torch.randn(3, 16, 32)]


@pytest.mark.parametrize("make", [_clip, _whisper_encoder], ids=["clip_vision", "whisper_encoder"])
def test_other_encoders_stay_their_class(make, tmp_path) -> None:
    """CLIP's vision tower and Whisper's encoder: heads and MLP channels through the module
    emitter; CLIP (head width embed_dim / heads) reloads through prunefx's loader."""
    torch.manual_seed(0)
    model, (x, other) = make()
    model = _randomize(model)
    graph = prunefx.trace(model, (x,), frontend="export")
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is type(model) and _params(small) <= 0.8 * _params(model)
    assert _sizes(small) == [(2, 2, 48)] * 2
    _same_outputs(small, prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph), (x, other), {})
    if isinstance(model, transformers.CLIPVisionModel):
        assert "hidden_size / num_attention_heads" in prunefx.transformers.stock_reason(small)
        small.save_pretrained(tmp_path)
        _same_outputs(prunefx.transformers.from_pretrained(tmp_path), small, (x, other), {})


def test_per_stage_config_fields_are_left_to_the_record(tmp_path) -> None:
    """SegFormer's config holds one head count per stage (a list): the pruned model keeps
    that list as it was (writing one int there raised transformers' config validation
    error), equals apply_mask, and reloads through prunefx's loader from its record."""
    cfg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                       num_attention_heads=[1, 2], mlp_ratios=[2, 2], patch_sizes=[7, 3], strides=[4, 2])
    torch.manual_seed(0)
    model = _randomize(transformers.SegformerModel(cfg))
    x, other = torch.randn(2, 3, 32, 32), torch.randn(1, 3, 40, 40)
    graph = prunefx.trace(model, (x,), frontend="export")
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is type(model) and _params(small) <= 0.8 * _params(model)
    assert small.config.num_attention_heads == [1, 2] and model.config.num_attention_heads == [1, 2]
    _same_outputs(small, prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph), (x, other), {})
    assert "prunefx.transformers.from_pretrained" in prunefx.transformers.stock_reason(small)
    small.save_pretrained(tmp_path)
    _same_outputs(prunefx.transformers.from_pretrained(tmp_path), small, (x, other), {})


def _bart():
    cfg = transformers.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return transformers.BartForConditionalGeneration(cfg), torch.randint(3, 128, (2, 12)), torch.randint(3, 128, (2, 7))


def _whisper():
    return transformers.WhisperForConditionalGeneration(_whisper_config()), torch.randn(2, 16, 32), torch.randint(1, 128, (2, 5))


def _t5():
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg), torch.randint(1, 128, (2, 12)), torch.randint(1, 128, (2, 7))


def _grown(x: torch.Tensor, dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One more sample, and (token inputs) a longer decoder sequence."""
    longer = torch.cat([dec, dec[:, :2]], 1)
    return torch.cat([x, x[:1]]), torch.cat([longer, longer[:1]])


@pytest.mark.parametrize("make", [_bart, _whisper, _t5], ids=["bart", "whisper", "t5"])
def test_encoder_decoder_models(make, tmp_path) -> None:
    """Both stacks of an encoder-decoder model: every attention module (the decoder's self-
    and cross-attention too) gets the head counts of its weights, groups inside a head are
    pinned in either stack (T5's decoder: its attention is left whole), and the model reloads
    through prunefx's loader (Whisper's config aliases num_key_value_heads to
    encoder_attention_heads: the sizes it was built with are recorded before any is written);
    with the MLPs alone pruned, the config says both stacks' widths and the stock loader
    rebuilds it."""
    torch.manual_seed(0)
    model, x, dec = make()
    model = _randomize(model.eval())
    kwargs = {"decoder_input_ids": dec, "use_cache": False}
    graph = prunefx.trace(model, (x,), example_kwargs=kwargs, frontend="export")
    # the inspector's blocks: both stacks, each block's MLP group (BART's fc1/fc2 are the
    # layer's own), its self-attention's heads (T5's are kept whole)
    rows = prunefx.inspect(model, graph=graph).blocks
    assert [r.name.split(".")[-3] for r in rows] == ["encoder", "encoder", "decoder", "decoder"]
    assert all(len(r.mlp) == 1 and r.mlp[0].startswith(r.name + ".") and r.mlp_channels == 96 for r in rows)
    assert all(r.attention == () if make is _t5 else len(r.attention) == 1 and ".self_attn." in r.attention[0] for r in rows)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is type(model) and _params(small) <= 0.9 * _params(model)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    x2, dec2 = _grown(x, dec)
    for inp, d in ((x, dec), (x2, dec2)):
        _same_outputs(small, ref, [inp], {"decoder_input_ids": d, "use_cache": False})
    attentions = prunefx.transformers.layers.attention_modules(small)
    assert len(attentions) == 6 and any(".decoder." in n or n.startswith("decoder.") for n, _, _ in attentions)
    for name, attn, kind in attentions:
        heads, kv = kind.heads(attn, kind.head_dim(attn))
        assert getattr(attn, "num_heads", getattr(attn, "n_heads", heads)) == heads, name
    if make is _t5:  # the decoder's heads are pinned by name, as the encoder's
        pinned = graph.group_of("decoder.block.0.layer.0.SelfAttention.v")
        assert not pinned.prunable and "T5Attention" in pinned.reason
        assert all("DenseReluDense" in k for k in mask)
    else:  # heads of the decoder's self- and cross-attention were removed
        assert [a.num_heads for n, a, _ in attentions if "decoder" in n] == [2, 2, 2, 2]
    small.save_pretrained(tmp_path)
    reloaded = prunefx.transformers.from_pretrained(tmp_path)
    _same_outputs(reloaded, small, [x], kwargs)
    # the MLPs alone: the config says both stacks' widths, and the stock loader rebuilds it
    mlp = {k: v for k, v in mask.items() if k.endswith((".fc1", ".DenseReluDense.wi"))}
    assert len(mlp) == 4
    small = prunefx.reconfigure(model, mlp, graph=graph)
    config = small.config
    assert [getattr(config, f, 48) for f in ("encoder_ffn_dim", "decoder_ffn_dim", "d_ff")] == [48, 48, 48]
    assert prunefx.transformers.stock_reason(small) is None
    small.save_pretrained(tmp_path / "mlp")
    stock = type(model).from_pretrained(tmp_path / "mlp")
    for inp, d in ((x, dec), (x2, dec2)):
        _same_outputs(stock, small, [inp], {"decoder_input_ids": d, "use_cache": False})


def test_loader_checks_the_record(llama, tmp_path) -> None:
    """A config whose record disagrees with the checkpoint is refused, naming both."""
    import json

    model, graph, _ = llama
    small = prunefx.reconfigure(model, _uneven(prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)), graph=graph)
    small.save_pretrained(tmp_path)
    record = small.config.prunefx
    assert record["layers"][0] != record["layers"][1] and "layers keep different sizes" in record["stock_loader"]
    assert record["original"]["intermediate_size"] == 96 and record["shapes"]["model.layers.1.mlp.down_proj.weight"] == [64, 1]
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["prunefx"]["layers"][1]["intermediate_size"] = 2
    path.write_text(json.dumps(config))
    with pytest.raises(prunefx.PruneFxError, match="come from different models"):
        prunefx.transformers.from_pretrained(tmp_path)


def _moe(family: str):
    if family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                                          shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
        return transformers.Qwen2MoeForCausalLM, cfg, "moe_intermediate_size"
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM, cfg, "intermediate_size"


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_moe_experts_channels_heads_and_shared_expert(family: str, tmp_path) -> None:
    """MoE: each expert's MLP channels (one group per layer: the grouped matmul keeps the same
    width for every expert, so a channel goes from every expert), the heads and Qwen2-MoE's
    shared expert are exact; whole experts are pinned (the router picks them per token). The
    experts' width goes to the config (moe_intermediate_size; Mixtral: intermediate_size)
    and the stock loader rebuilds the model."""
    cls, cfg, width_field = _moe(family)
    torch.manual_seed(0)
    model = _randomize(cls(cfg))
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    graph = prunefx.trace(model, (x,), example_kwargs={"use_cache": False}, frontend="export")
    experts = graph.group("model.layers.0.mlp.experts")  # the expert dim of its weights
    assert not experts.prunable and "the router picks them per token" in experts.reason and experts.size == 4
    with pytest.raises(prunefx.MaskError, match="router picks them per token"):
        prunefx.reconfigure(model, {experts.name: torch.tensor([True, True, True, False])}, graph=graph)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    channels = [k for k in mask if k.startswith("model.layers.0.mlp.experts")]
    assert len(channels) == 1 and graph.group(channels[0]).size == getattr(cfg, width_field)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is cls and _params(small) <= 0.8 * _params(model)
    assert getattr(small.config, width_field) == getattr(cfg, width_field) // 2 and small.config.num_attention_heads == 2
    assert [s.expert_intermediate_size for s in prunefx.transformers.layer_sizes(small)] == [getattr(cfg, width_field) // 2] * 2
    if family == "qwen2_moe":
        assert small.config.shared_expert_intermediate_size == 48
    masked = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    _same_outputs(small, masked, (x, x[:1, :5], torch.randint(0, 128, (3, 11))), {"use_cache": False})
    assert prunefx.transformers.stock_reason(small) is None
    small.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    _same_outputs(again, small, (x,), {"use_cache": False})
    _generates_alike(again, masked, x)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_prunefx_checkpoint_of_a_causal_lm(family: str, tmp_path) -> None:
    """prunefx.state_dict / load_state_dict: the layout records the front-end and the keyword
    inputs (use_cache=False), so a fresh model is traced as the pruned one was."""
    make, kwargs, _, _, inputs = FAMILIES[family]
    torch.manual_seed(0)
    model = _randomize(make())
    x, other, _ = inputs()
    graph = prunefx.trace(model, (x,), example_kwargs=kwargs, frontend="export")
    small = prunefx.reconfigure(model, _uneven(prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)), graph=graph)
    state = prunefx.state_dict(small)
    assert state["prunefx"]["frontend"] == "export" and state["prunefx"]["kwargs"] == {"use_cache": {"value": False}}
    torch.save(state, tmp_path / "small.pt")
    back = prunefx.load_state_dict(make().eval(), torch.load(tmp_path / "small.pt", weights_only=True))
    assert type(back) is type(model) and _sizes(back) == _sizes(small)
    _same_outputs(back, small, (x, other), kwargs)

    state["prunefx"]["kwargs"] = {"use_cache": {"value": object()}}
    with pytest.raises(prunefx.PruneFxError, match=r"\['kwargs'\]\['use_cache'\]"):
        prunefx.load_state_dict(make().eval(), state)


def test_a_training_model_is_captured_in_evaluation_mode() -> None:
    """PruneTrain traces a model while it trains. torch.export would bake dropout (p=0.1 in
    GPT-2) into the graph as a random op; a transformers model is captured in evaluation mode
    instead, every module's flag left as it was, and the pruned model (its own class) keeps
    training with dropout."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=32)
    model = _randomize(transformers.GPT2LMHeadModel(cfg)).train()
    model.transformer.h[1].mlp.eval()  # a mixed state, restored exactly
    flags = [m.training for m in model.modules()]
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    graph = prunefx.trace(model, (x,), example_kwargs={"use_cache": False})
    assert [m.training for m in model.modules()] == flags
    dropouts = [n for n in graph.module.graph.nodes if n.target is torch.ops.aten.dropout.default]
    assert dropouts and not any(n.args[2] for n in dropouts)  # dropout(x, p, train=False): the identity
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is type(model) and small.training
    masked = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph).eval()
    _same_outputs(small.eval(), masked, (x, torch.randint(0, 128, (3, 11))), {"use_cache": False})
    small.train()
    first, second = (small(x, use_cache=False).logits for _ in range(2))
    assert not torch.equal(first, second)  # dropout is live in training mode
    with pytest.warns(UserWarning, match="captured its graph in evaluation mode .a transformers model"):
        prunefx.reconfigure(model, mask, graph=graph, emit="graph")  # a GraphModule cannot follow the mode


def test_a_custom_function_in_a_transformers_model(monkeypatch) -> None:
    """BLOOM's MLP calls a custom autograd Function (GeLUFunction), which torch.export would
    inline without its backward: the capture is refused, and since fx cannot trace a
    transformers model the message says what works instead; doing it (the module runs the
    Function's forward ops while it is pruned) prunes the MLP exactly, and the pruned BLOOM
    calls the Function again."""
    from transformers.models.bloom import modeling_bloom

    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    model = _randomize(transformers.BloomForCausalLM(cfg))
    x, other = torch.randint(1, 128, (2, 8)), torch.randint(1, 128, (3, 5))
    kwargs = {"use_cache": False}
    with pytest.raises(prunefx.TraceError, match="GeLUFunction.*fx cannot trace a transformers model"):
        prunefx.trace(model, (x,), example_kwargs=kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(modeling_bloom.BloomGelu, "forward", lambda self, h: modeling_bloom.bloom_gelu_forward(h))
        graph = prunefx.trace(model, (x,), example_kwargs=kwargs)
        mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
        small = prunefx.reconfigure(model, mask, graph=graph)
        ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    assert any(k.endswith("mlp.dense_h_to_4h") for k in mask) and _params(small) < 0.8 * _params(model)
    _same_outputs(small, ref, (x, other), kwargs)
    seen, todo = set(), [small(x, **kwargs).logits.grad_fn]
    while todo:  # the autograd graph of the pruned model's output
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    assert any(type(fn).__name__ == "GeLUFunctionBackward" for fn in seen)


class _Classifier(torch.nn.Module):
    """A user's model holding a transformers model: BERT and a head of its own."""

    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, hidden_dropout_prob=0.1)
        self.bert = transformers.BertModel(cfg)
        self.head = torch.nn.Linear(64, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(ids).last_hidden_state[:, 0])


def test_a_model_holding_a_transformers_model(tmp_path) -> None:
    """The transformers model inside is treated like one at top level: captured by torch.export
    in evaluation mode, heads kept whole, and the default emitter gives the user's class with
    the inner model's head counts and config updated, so it saves and reloads."""
    torch.manual_seed(0)
    model = _randomize(_Classifier()).train()
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    graph = prunefx.trace(model, (x,))
    assert graph.frontend == "export"
    assert [g.size for g in graph.groups if g.exact and g.name.startswith("bert.encoder.layer.0.")] == [4, 96]  # heads, MLP
    # the inspector's block rows name them, though BERT's head group also spans
    # `attention.output.dense` and its MLP spans `intermediate` and `output`
    rows = prunefx.inspect(model, graph=graph).blocks
    assert [(b.name, b.heads, b.mlp_channels, b.attention, b.mlp, b.slot) for b in rows] == [
        (f"bert.encoder.layer.{i}", 4, 96, (f"bert.encoder.layer.{i}.attention.self.query",),
         (f"bert.encoder.layer.{i}.intermediate.dense",), "a head") for i in (0, 1)]
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is _Classifier and small.training and _sizes(small.bert) == [(2, 2, 48)] * 2
    assert (small.bert.config.num_attention_heads, small.bert.config.intermediate_size) == (2, 48)
    masked = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph).eval()
    small.eval()
    for ids in (x, torch.randint(0, 128, (3, 11))):
        with torch.no_grad():
            assert max_rel_diff(small(ids), masked(ids)) < 1e-5
    small.bert.save_pretrained(tmp_path)
    with torch.no_grad():
        assert max_rel_diff(prunefx.transformers.from_pretrained(tmp_path).eval()(x).last_hidden_state,
                            small.bert(x).last_hidden_state) < 1e-6
