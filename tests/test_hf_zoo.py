"""A zoo of transformers architectures through prunefx's default path.

``tests/test_export_frontend.py`` and ``tests/test_hf_models.py`` look closely at a few
families. This file is the wide net: 36 more architectures, each tiny (2 layers, hidden
64 or smaller) and random-init, nothing downloaded:

- ``prunefx.trace`` (``frontend="auto"``: torch.export) finds exactly the exact groups of
  layer 0 listed in ``ZOO`` (a change that pins heads, or offers a group it should not, shows
  up here by name);
- a random 50% mask over the exact groups gives, through ``reconfigure``'s default emitter
  (``"module"`` for a transformers model), a model of the same class that equals
  ``apply_mask`` on a copy at the example shape and at another batch size and sequence
  length.

Where prunefx cannot do that, the model is listed with the ``PruneFxError`` it gets and why
(``REFUSED``, ``MODULE_REFUSED``): nothing passes silently.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_export_frontend import _randomize

import prunefx
from zoo import max_rel_diff

V = 128
C = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
GQA = dict(C, num_key_value_heads=2)
ENC = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, max_position_embeddings=70)
VIS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8)

# name: (config class, model class, config kwargs, inputs, layer 0's exact groups (name, slots))
ZOO: dict[str, tuple[str, str, dict, str, set[tuple[str, int]]]] = {
    # causal LMs with rotary embeddings; a head slot is a KV head with its query heads
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(GQA, head_dim=16), "tokens",
               {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.gate_proj", 96)}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(GQA, head_dim=16), "tokens",  # per-head q/k norms
               {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.gate_proj", 96)}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", GQA, "tokens",
             {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.gate_proj", 96)}),
    # q_norm/k_norm normalise over every head at once: heads are approximate, not exact
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", GQA, "tokens", {("model.layers.0.mlp.gate_proj", 96)}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", GQA, "tokens",  # partial rotary
                 {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.gate_proj", 96)}),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(GQA, head_dim=16, pad_token_id=0), "tokens",  # partial, interleaved rotary
            {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.gate_up_proj", 96)}),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(GQA, head_dim=16), "tokens",  # interleaved rotary
               {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.gate_proj", 96)}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", GQA, "tokens",
                {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.gate_proj", 96)}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(GQA, pad_token_id=0), "tokens",
                {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.gate_proj", 96)}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", GQA, "tokens",
                   {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.c_fc", 96)}),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
                "tokens", {("transformer.h.0.attn.qkv_proj", 4), ("transformer.h.0.mlp.fc_in", 256)}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(GQA, head_dim=16, moe_intermediate_size=48, num_experts=4,
                                                                 num_experts_per_tok=2), "tokens",
                  {("model.layers.0.self_attn.q_proj", 2), ("model.layers.0.mlp.experts#1", 48)}),
    # multi-query attention: the one KV head is shared by every query head, so the heads are pinned
    "llama_mqa": ("LlamaConfig", "LlamaForCausalLM", dict(C, num_key_value_heads=1), "tokens", {("model.layers.0.mlp.gate_proj", 96)}),
    "gpt_bigcode_mqa": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                                          multi_query=True), "tokens",
                        {("transformer.h.0.mlp.c_fc", 256)}),
    # FalconLinear computes input @ self.weight.T; its fused multi-query qkv pins the heads
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
               "tokens", {("transformer.h.0.mlp.dense_h_to_4h", 256)}),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=V, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                                word_embed_proj_dim=64), "tokens",
            {("model.decoder.layers.0.self_attn.k_proj", 4), ("model.decoder.layers.0.fc1", 96)}),
    # the ALiBi biases, built for config.n_heads heads, pin the heads; MptAttention reshapes
    # to self.n_heads heads of self.head_dim, so the value channels inside a head are pinned too
    "mpt": ("MptConfig", "MptForCausalLM", dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64),
            "tokens", {("transformer.blocks.0.ffn.up_proj", 256)}),
    # encoders
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=96,
                                                               max_position_embeddings=64), "tokens",
                   {("transformer.layer.0.attention.q_lin", 4), ("transformer.layer.0.ffn.lin1", 96)}),
    "albert": ("AlbertConfig", "AlbertModel", dict(ENC, embedding_size=32), "tokens",  # one layer shared by every depth
               {("encoder.albert_layer_groups.0.albert_layers.0.attention.query", 4),
                ("encoder.albert_layer_groups.0.albert_layers.0.ffn", 96)}),
    "electra": ("ElectraConfig", "ElectraModel", dict(ENC, embedding_size=32), "tokens",
                {("encoder.layer.0.attention.self.query", 4), ("encoder.layer.0.intermediate.dense", 96)}),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaModel", ENC, "tokens",
                    {("encoder.layer.0.attention.self.query", 4), ("encoder.layer.0.intermediate.dense", 96)}),
    # DeBERTa-v3's relative attention repeats its position projections batch-size times
    # (a dynamic repeat of the heads): heads pinned
    "deberta_v3": ("DebertaV2Config", "DebertaV2Model", dict(ENC, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                                                             max_relative_positions=32, norm_rel_ebd="layer_norm", share_att_key=True,
                                                             position_biased_input=False), "tokens",
                   {("encoder.layer.0.intermediate.dense", 96)}),
    "mobilebert": ("MobileBertConfig", "MobileBertModel", dict(ENC, embedding_size=32, intra_bottleneck_size=32), "tokens",
                   {("embeddings.word_embeddings#1", 32), ("encoder.layer.0.attention.output.dense", 32),
                    ("encoder.layer.0.attention.self.query", 4), ("encoder.layer.0.ffn.0.intermediate.dense", 96),
                    ("encoder.layer.0.ffn.2.intermediate.dense", 96), ("encoder.layer.0.intermediate.dense", 96)}),
    # vision
    "deit": ("DeiTConfig", "DeiTModel", VIS, "images", {("layers.0.attention.q_proj", 4), ("layers.0.mlp.fc1", 96)}),
    "beit": ("BeitConfig", "BeitModel", dict(VIS, use_relative_position_bias=True), "images",  # a position bias per head
             {("layers.0.attention.q_proj", 4), ("layers.0.mlp.fc1", 96)}),
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(VIS, mlp_ratio=2), "images",  # layer scale; mask_token unused here
               {("encoder.layer.0.attention.q_proj", 4), ("encoder.layer.0.mlp.fc1", 128)}),
    "swin": ("SwinConfig", "SwinModel", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4, window_size=4),
             "images", {("encoder.layers.0.blocks.0.attention.q_proj", 2), ("encoder.layers.0.blocks.0.mlp.fc1", 64)}),
    "convnext": ("ConvNextConfig", "ConvNextModel", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2), "images",
                 {("encoder.stages.0.layers.0.pwconv1", 64)}),
    "segformer": ("SegformerConfig", "SegformerModel", dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                                            num_attention_heads=[1, 2], mlp_ratios=[2, 2], patch_sizes=[7, 3],
                                                            strides=[4, 2]), "images",
                  {("stages.0.blocks.0.mlp.fc1", 32)}),
    # draws torch.rand noise to shuffle its patches, also in eval mode: compared under one seed
    "vit_mae": ("ViTMAEConfig", "ViTMAEModel", dict(VIS, mask_ratio=0.0), "images", {("layers.0.attention.q_proj", 4), ("layers.0.mlp.fc1", 96)}),
    # its forward stores the sequence length on a module (attention_structure.seq_len)
    "funnel": ("FunnelConfig", "FunnelModel", dict(vocab_size=V, d_model=64, n_head=4, d_head=16, d_inner=96, block_sizes=[1, 1],
                                                   num_decoder_layers=1), "tokens",
               {("encoder.blocks.0.0.ffn.linear_1", 96), ("decoder.layers.0.ffn.linear_1", 96)}),
    "clip_text": ("CLIPTextConfig", "CLIPTextModel", dict(C, max_position_embeddings=64), "tokens",
                  {("encoder.layers.0.self_attn.k_proj", 4), ("encoder.layers.0.mlp.fc1", 96)}),
    "resnet": ("ResNetConfig", "ResNetModel", dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"), "images",
               {("embedder.embedder.convolution", 16), ("encoder.stages.0.layers.0.layer.0.convolution", 4)}),
    # a state-space model: the time-step rank's channels are exact (MambaMixer.time_step_rank follows
    # dt_proj); the rest meets the scan's fixed-size state
    "mamba": ("MambaConfig", "MambaModel", dict(vocab_size=V, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4),
              "tokens", {("layers.0.mixer.x_proj", 4)}),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                                         num_conv_pos_embedding_groups=4), "audio", set()),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=64, n_layer=2, n_head=4), "tokens", set()),
}

# capture refused: the error and why
REFUSED = {
    "bloom": (prunefx.TraceError, "GeLUFunction",  # tests/test_hf_models.py::test_a_custom_function_in_a_transformers_model
              "a custom autograd Function, which torch.export would inline without its backward"),
    "wav2vec2": (prunefx.PruneFxError, "parametrization .*remove_parametrizations",
                 "its positional convolution is weight-normed (a parametrization computed over every channel): bake it first"),
}
# the module emitter refuses (its check finds the class's forward disagreeing with the pruned
# graph; emit="graph" gives the pruned model): none at present (MPT and Mamba were, until their
# records in prunefx/transformers/layers.py)
MODULE_REFUSED: dict[str, str] = {}
# (causal LMs too) Mamba's cache object is no tensor output. Its scan loops over the sequence in
# Python, so torch.export captures it with static shapes (prunefx warns): the graph holds one
# sequence length, the module emitter's result (its own class) runs at any
KWARGS = {"mamba": {"use_cache": False}}


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def _inputs(kind: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "tokens":
        return [torch.randint(1, V, (2, 8), generator=g), torch.randint(1, V, (3, 5), generator=g)]
    if kind == "audio":
        return [torch.randn(2, 400, generator=g), torch.randn(3, 600, generator=g)]
    return [torch.randn(2, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)]


def _out(model, x, kwargs) -> torch.Tensor:
    torch.manual_seed(0)  # the same random draws in each model compared (ViT-MAE)
    with torch.no_grad():
        out = model(x, **kwargs)
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


@pytest.mark.parametrize("name", list(ZOO))
def test_transformers_zoo(name: str) -> None:
    config, cls, kw, kind, exact = ZOO[name]
    torch.manual_seed(0)
    model = _randomize(getattr(transformers, cls)(getattr(transformers, config)(**kw)))
    x, other = _inputs(kind)
    kwargs = {"use_cache": False} if cls.endswith("ForCausalLM") else KWARGS.get(name, {})
    if name in REFUSED:
        error, match, _why = REFUSED[name]
        with pytest.raises(error, match=match):
            prunefx.trace(model, (x,), example_kwargs=kwargs or None)
        return
    graph = prunefx.trace(model, (x,), example_kwargs=kwargs or None)
    assert graph.frontend == "export"
    found = {(g.name, g.size) for g in graph.groups if g.prunable and g.exact and ".1." not in g.name}
    assert found == exact, sorted(found)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    if name in MODULE_REFUSED:
        with pytest.raises(prunefx.ReconfigureError, match=MODULE_REFUSED[name]):
            prunefx.reconfigure(model, mask, graph=graph)
        small = prunefx.reconfigure(model, mask, graph=graph, emit="graph")
    else:
        random_state = torch.get_rng_state()
        small = prunefx.reconfigure(model, mask, graph=graph)
        assert type(small) is type(model)
        assert torch.equal(torch.get_rng_state(), random_state)  # the emitter's check draws from a fork
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    for inp in (x, other):
        got, want = _out(small, inp, kwargs), _out(ref, inp, kwargs)
        assert got.shape == want.shape and max_rel_diff(got, want) <= 1e-4, tuple(inp.shape)
