"""Error classes. Exceptions are for misuse (bad masks, untraceable models); a model
part that cannot be pruned is *data* (a pinned group with a reason), never an exception."""

from __future__ import annotations

__all__ = ["PruneFxError", "TraceError", "MaskError", "ReconfigureError", "ExportError", "DistributedError"]


class PruneFxError(Exception):
    """Base class of every error raised by prunefx."""


class TraceError(PruneFxError):
    """The model could not be traced or its shapes could not be propagated."""


class MaskError(PruneFxError):
    """A mask does not fit the model's channel groups."""


class ReconfigureError(PruneFxError):
    """The pruned model cannot be expressed in the requested form (e.g. ``emit="module"`` on a
    model whose forward hard-codes a size that no attribute controls)."""


class ExportError(PruneFxError):
    """ONNX export or its verification failed."""


class DistributedError(PruneFxError):
    """torch.distributed is not set up, or the ranks could not reconfigure together."""
