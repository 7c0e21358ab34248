"""prunefx: structured pruning as a graph compiler for PyTorch.

    graph = prunefx.trace(model, x)              # channel groups
    small = prunefx.reconfigure(model, mask)     # a physically smaller model
    prunefx.apply_mask(model, mask)              # the reference: masked channels zeroed
"""

from prunefx import distributed, masks, train
from prunefx.analysis import ChannelGroup
from prunefx.checkpoint import load_state_dict, state_dict
from prunefx.errors import (
    DistributedError,
    ExportError,
    MaskError,
    PruneFxError,
    ReconfigureError,
    TraceError,
)
from prunefx.export import ExportResult, export_onnx, onnx_session
from prunefx.flops import count_flops, count_params
from prunefx.graph import PruneGraph, trace
from prunefx.inspector import Inspector, inspect
from prunefx.reconfigure import apply_mask, reconfigure
from prunefx.train.reinit import reinit

__all__ = [
    "train", "trace", "PruneGraph", "ChannelGroup", "inspect", "Inspector", "reconfigure", "apply_mask", "reinit", "masks", "distributed",
    "state_dict", "load_state_dict", "count_flops", "count_params", "export_onnx", "onnx_session", "ExportResult",
    "PruneFxError", "TraceError", "MaskError", "ReconfigureError", "ExportError", "DistributedError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``prunefx.transformers`` (Hugging Face support) is imported on first use: it imports
    transformers, which most users of prunefx do not need."""
    if name == "transformers":
        import importlib

        return importlib.import_module("prunefx.transformers")
    raise AttributeError(f"module 'prunefx' has no attribute {name!r}")
