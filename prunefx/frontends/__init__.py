"""Front-ends: how a model becomes a graph (stage 1 of the pipeline).

- ``fx`` (``prunefx.tracing``): ``torch.fx.symbolic_trace``; modules stay ``call_module``
  nodes, Python functions and methods stay as written.
- ``export`` (``prunefx.frontends.export``): ``torch.export``; an aten-level graph whose
  parameters are ``get_attr`` nodes with the model's qualified names.
- ``detection`` (``prunefx.frontends.detection``): a torchvision detection model is captured
  (with either of the two) as a surrogate of its channel-carrying parts, backbone and heads.

Both give a ``prunefx.tracing.Traced``; everything after (shapes, channel analysis, masks,
passes) is shared.
"""

from prunefx.frontends.export import export_trace

__all__ = ["export_trace"]
