"""Hugging Face transformers models stay transformers models after pruning.

The module emitter (``reconfigure(..., emit="auto")`` on a ``PreTrainedModel``) slices the
weights; this package then makes the copy a working model of its class:

    layers.py   per-layer sizes read from the weights; the attributes attention/MLP modules
                read at run time (head counts, KV groups, GPT-2's split size, Conv1D.nf)
    config.py   the config's fields (num_attention_heads, num_key_value_heads, head_dim,
                intermediate_size) and the per-layer record under ``config.prunefx``;
                ``stock_reason``: why the class's own ``from_pretrained`` cannot rebuild it
    loading.py  ``from_pretrained(path)``: build, give each layer its checkpoint's tensors
    heads.py    ``whole_heads``: the analysis of a transformers model pins groups inside a head
                (its modules read ``head_dim`` from the config; ``prunefx.trace`` applies it)

Example::

    >>> import transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
    ...                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> llama = transformers.LlamaForCausalLM(cfg).eval()
    >>> graph = prunefx.trace(llama, (torch.randint(0, 128, (2, 8)),), example_kwargs={"use_cache": False})
    >>> small = prunefx.reconfigure(llama, prunefx.masks.random(graph, 0.5, exact_only=True), graph=graph)
    >>> small.config.num_attention_heads, small.config.intermediate_size
    (2, 48)
"""

from prunefx.transformers.config import stock_reason
from prunefx.transformers.layers import LayerSizes, layer_sizes
from prunefx.transformers.loading import from_pretrained

__all__ = ["from_pretrained", "layer_sizes", "LayerSizes", "stock_reason", "finish"]


def finish(model) -> None:  # noqa: ANN001 - a transformers PreTrainedModel
    """Size attributes and config of a pruned copy, in place (the module emitter calls it)."""
    from prunefx.transformers.config import update_config
    from prunefx.transformers.layers import write_sizes

    update_config(model, write_sizes(model))
