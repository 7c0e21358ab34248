"""torchvision detection models: the channel-carrying parts, captured as one traceable model.

A whole detection model does not capture on torch 2.14: fx stops at the loop over the image
list, and ``torch.export`` at data-dependent guards in ``batched_nms``. But every parameter
lives in the backbone (with its FPN) and in the heads, and what lies between them (the image
transform, anchors, box decoding, NMS, the RoI level mapping) reads no channel. So prunefx
captures a *surrogate*: a module whose children are the detection model's own ``backbone``,
``rpn``/``roi_heads`` or ``head`` (same names, so group members and mask keys carry the
model's qualified names), and whose ``forward(images, boxes)`` runs every channel-carrying
path of the real forward on a batched image tensor:

    features = backbone(images)                           # FPN levels
    rpn.head(levels) / head's towers and predictors       # on every level, as the model does
    roi_align(level, boxes) for each pooled level -> box/mask/keypoint heads and predictors

RoI pooling is ``torchvision.ops.roi_align`` on every level the model's ``MultiScaleRoIAlign``
reads (concatenated, as the pooler scatters boxes of every level into one tensor); it is
per-channel, so the FPN channels cross into the box head's first Linear exactly as in the
real model. The pruned model is the module emitter's copy of the detection model (same class,
detection API kept) and is checked, before it is returned, against the masked model through
the real detection API (a list of images in, boxes/labels/scores/masks/keypoints out).

Example::

    >>> import torch, torchvision, prunefx
    >>> det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
    ...     weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128).eval()
    >>> g = prunefx.trace(det, [torch.rand(3, 128, 128)])
    >>> g.group_of("rpn.head.conv.0.0").size
    256
"""

from __future__ import annotations

import copy
import importlib
import sys
from typing import Any

import torch
from torch import nn

from prunefx.errors import ReconfigureError, TraceError

__all__ = ["detection_leaves", "is_detection", "surrogate", "surrogate_inputs", "emit_detection"]


def _families() -> dict[type, str]:
    if "torchvision" not in sys.modules:  # torchvision is optional; without it no model is one of its detectors
        return {}
    from torchvision.models import detection as d

    return {d.generalized_rcnn.GeneralizedRCNN: "rcnn", d.RetinaNet: "dense", d.FCOS: "dense", d.ssd.SSD: "ssd"}


def _family(model: Any) -> str | None:
    for cls, family in _families().items():
        if isinstance(model, cls):
            return family
    return None


def is_detection(model: Any) -> bool:
    """Whether ``model`` is a torchvision detection model (R-CNN family, RetinaNet, FCOS, SSD)."""
    return _family(model) is not None


def detection_leaves() -> tuple[type, ...]:
    """Modules the fx front-end keeps opaque in a detection model: ``FrozenBatchNorm2d`` (its
    op record treats its weight/bias buffers as what they are, a BatchNorm's parameters)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    return (FrozenBatchNorm2d,)


def _roi_align(feature: torch.Tensor, boxes: torch.Tensor, pool: nn.Module, level: int) -> torch.Tensor:
    # looked up in its own module at call time: torch.fx.wrap patches it there while tracing,
    # so it stays one call_function node (the `roi_align` op record)
    roi_align = importlib.import_module("torchvision.ops.roi_align").roi_align
    # the scale only places the boxes; any value computes the same channels
    return roi_align(feature, boxes, pool.output_size, spatial_scale=1.0 / 2 ** (level + 2), sampling_ratio=pool.sampling_ratio)


def _pool(pool: nn.Module, features: dict[str, torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """``MultiScaleRoIAlign`` on fixed boxes: every level it reads (of those the backbone
    gives, as the pooler filters them), concatenated."""
    names = [name for name in pool.featmap_names if name in features]
    return torch.cat([_roi_align(features[name], boxes, pool, i) for i, name in enumerate(names)])


class DetectionSurrogate(nn.Module):
    """The channel-carrying computation of a torchvision detection model (see the module
    docstring). Its children are the detection model's own modules, under the same names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.family = _family(model)
        self.detector = type(model).__name__
        names = ("backbone", "rpn", "roi_heads") if self.family == "rcnn" else ("backbone", "head")
        for name in names:
            self._modules[name] = getattr(model, name)
        self.training = model.training  # not .train(): that would set the model's own children

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(images)
        if not isinstance(features, dict):  # a backbone without FPN returns one tensor
            features = {"0": features}
        levels = list(features.values())
        if self.family == "rcnn":
            return self._rcnn(features, levels, boxes)
        if self.family == "ssd":
            heads = (self.head.classification_head, self.head.regression_head)
            return tuple(h.module_list[i](f) for h in heads for i, f in enumerate(levels))
        out = []
        for f in levels:  # RetinaNet, FCOS: one tower and its predictors per head, on every level
            cls = self.head.classification_head
            out.append(cls.cls_logits(cls.conv(f)))
            reg = self.head.regression_head
            r = reg.conv(f)
            out.append(reg.bbox_reg(r))
            if hasattr(reg, "bbox_ctrness"):  # FCOS
                out.append(reg.bbox_ctrness(r))
        return tuple(out)

    def _rcnn(self, features: dict[str, torch.Tensor], levels: list[torch.Tensor], boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        objectness, deltas = self.rpn.head(levels)
        out = [*objectness, *deltas]
        rh = self.roi_heads
        x = rh.box_head(_pool(rh.box_roi_pool, features, boxes)).flatten(1)
        out += [rh.box_predictor.cls_score(x), rh.box_predictor.bbox_pred(x)]
        if rh.has_mask():
            out.append(rh.mask_predictor(rh.mask_head(_pool(rh.mask_roi_pool, features, boxes))))
        if rh.has_keypoint():
            out.append(rh.keypoint_predictor.kps_score_lowres(rh.keypoint_head(_pool(rh.keypoint_roi_pool, features, boxes))))
        return tuple(out)


def surrogate(model: nn.Module) -> DetectionSurrogate | None:
    """The surrogate of a torchvision detection model, or None for any other model."""
    return DetectionSurrogate(model) if is_detection(model) else None


def _images(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    """The model's own input: a list of 3-D images (also accepted: one image, a 4-D batch, or
    the list as the single positional input). Default: one random image of the model's
    ``min_size``."""
    x = example_inputs
    if isinstance(x, tuple) and len(x) == 1 and isinstance(x[0], (list, tuple, torch.Tensor)):
        x = x[0]
    if x is None:
        size = max(getattr(model.transform, "min_size", (224,)))
        p = next(model.parameters())
        return [torch.rand(3, size, size, device=p.device, dtype=p.dtype)]
    if isinstance(x, torch.Tensor):
        x = [x] if x.dim() == 3 else list(x) if x.dim() == 4 else None
    if not isinstance(x, (list, tuple)) or not x or not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in x):
        raise TraceError(
            f"{type(model).__name__} takes a list of 3-D images (C, H, W): pass example_inputs=[torch.rand(3, H, W)] "
            f"(got {type(example_inputs).__name__})"
        )
    return list(x)


def surrogate_inputs(model: nn.Module, example_inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, boxes) for the surrogate: the model's transform (resize, normalise, batch) on
    its example images, in evaluation mode, and two fixed RoIs per image."""
    images = _images(model, example_inputs)
    transform = copy.deepcopy(model.transform).eval()  # never touch the model's own mode
    with torch.no_grad():
        batch = transform(images)[0].tensors
    h, w = batch.shape[-2:]
    rois = [[i, 0.0, 0.0, w / 2, h / 2] for i in range(len(images))] + [[i, w / 4, h / 4, w - 1.0, h - 1.0] for i in range(len(images))]
    return batch, torch.tensor(rois, dtype=batch.dtype, device=batch.device)


def emit_detection(model: nn.Module, graph: Any, state: Any) -> nn.Module:
    """The pruned detection model: the module emitter's copy of the surrogate (checked against
    the pruned graph), put back into a copy of ``model`` of the same class, then checked
    against the masked model through the detection API."""
    from prunefx.emit import emit_module
    from prunefx.provenance import LAYOUT_ATTR

    sur = DetectionSurrogate(model)
    small_parts = emit_module(sur, graph, state)
    memo: dict[int, Any] = {id(getattr(model, name)): getattr(small_parts, name) for name in sur._modules}
    small = copy.deepcopy(model, memo)
    fpn = getattr(small.backbone, "fpn", None)
    if fpn is not None and hasattr(small.backbone, "out_channels"):  # read by no forward; keep it true
        sizes = {_out_channels(b) for b in fpn.layer_blocks}
        if len(sizes) == 1:
            small.backbone.out_channels = sizes.pop()
    setattr(small, LAYOUT_ATTR, getattr(small_parts, LAYOUT_ATTR))
    _check_api(model, small, graph, state)
    return small


def _out_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


# where a detection model's forward decides (which proposals, which detections) on values
# that pruning changes only by float rounding: the check feeds the masked model's decisions
# to the pruned one, so near-tied random-init scores cannot make the two diverge
_DECISIONS = {"rcnn": ("rpn",), "dense": (), "ssd": ()}
_HEADS = {
    "rcnn": ("rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor", "roi_heads.keypoint_predictor"),
    "dense": ("head",),
    "ssd": ("head",),
}


def _check_api(model: nn.Module, small: nn.Module, graph: Any, state: Any) -> None:
    """The pruned model against the masked one, through the detection API on the example
    images (evaluation mode): every head's outputs agree (with the masked model's proposals
    and detections fed to the pruned one), and the outputs have the same structure."""
    from prunefx.reconfigure import zero_dropped

    _check_covered(model, state)
    images = _images(model, graph.model_inputs)
    family = _family(model)
    ref = copy.deepcopy(model)
    zero_dropped(ref, graph, state.plan.keep)
    heads = [n for n in _HEADS[family] if _has(model, n)]
    want: dict[str, list[Any]] = {}
    decisions: dict[str, list[Any]] = {}
    with _recording(ref, heads, want), _recording(ref, _DECISIONS[family], decisions), _postprocess(ref, decisions, record=True):
        ref.eval()
        with torch.no_grad():
            want_out = ref(images)
    got: dict[str, list[Any]] = {}
    was = small.training
    try:
        with _recording(small, heads, got), _forcing(small, decisions), _postprocess(small, decisions, record=False):
            small.eval()
            with torch.no_grad():
                got_out = small(images)
    except Exception as exc:  # the pruned model must run
        raise ReconfigureError(f"the pruned {type(model).__name__} does not run through its detection API: {exc}".splitlines()[0]) from exc
    finally:
        small.train(was)
    problem = _compare_structure(want_out, got_out)
    for name in heads:
        if problem is None:
            problem = _compare_values(name, want.get(name, []), got.get(name, []))
    if problem is not None:
        raise ReconfigureError(
            f"the pruned {type(model).__name__} differs from the masked model on the example images: {problem}; "
            "please report this model (prunefx.trace(model, images) shows the groups)"
        )


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _check_covered(model: nn.Module, state: Any) -> None:
    """Every parameter of the model is on the surrogate's paths: a custom head or a module the
    surrogate does not run could otherwise read pruned channels unseen."""
    aliases = state.plan.analysis.aliases
    for name, _ in model.named_parameters():
        if aliases.get(name, name) not in state.tensors:
            raise ReconfigureError(
                f"parameter '{name}' of {type(model).__name__} is not on the paths prunefx captures for torchvision "
                "detection models (backbone, FPN, the standard heads): prune its backbone or heads on their own"
            )


class _recording:
    """Forward hooks appending each call's output of the named submodules to ``into``."""

    def __init__(self, model: nn.Module, names: tuple[str, ...] | list[str], into: dict[str, list[Any]]) -> None:
        self.handles = [
            model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: into.setdefault(n, []).append(o)) for n in names
        ]

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


class _forcing(_recording):
    """Forward hooks replacing each call's output of the named submodules by the recorded one."""

    def __init__(self, model: nn.Module, recorded: dict[str, list[Any]]) -> None:
        calls = {n: iter(outs) for n, outs in recorded.items() if n != _POSTPROCESS}
        self.handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: next(calls[n])) for n in calls]


_POSTPROCESS = "roi_heads.postprocess_detections"


class _postprocess:
    """R-CNN: record (``record=True``) or replay the masked model's detections
    (``RoIHeads.postprocess_detections``, a method: patched on the instance, then removed)."""

    def __init__(self, model: nn.Module, decisions: dict[str, list[Any]], record: bool) -> None:
        self.heads = getattr(model, "roi_heads", None)
        self.decisions, self.record = decisions, record

    def __enter__(self) -> None:
        if self.heads is None:
            return
        original = self.heads.postprocess_detections
        if self.record:
            def run(*args: Any) -> Any:
                out = original(*args)
                self.decisions.setdefault(_POSTPROCESS, []).append(out)
                return out
        else:
            replay = iter(self.decisions.get(_POSTPROCESS, []))

            def run(*args: Any) -> Any:
                return next(replay)
        self.heads.postprocess_detections = run

    def __exit__(self, *exc: object) -> None:
        if self.heads is not None:
            del self.heads.postprocess_detections


def _compare_structure(want: list[dict[str, torch.Tensor]], got: list[dict[str, torch.Tensor]]) -> str | None:
    if len(want) != len(got):
        return f"{len(got)} results instead of {len(want)}"
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if w.keys() != g.keys():
            return f"image {i} gives {sorted(g)} instead of {sorted(w)}"
        for key in w:
            if w[key].dtype != g[key].dtype or w[key].shape[1:] != g[key].shape[1:]:
                return f"image {i}'s '{key}' is {g[key].dtype}{tuple(g[key].shape)} instead of {w[key].dtype}{tuple(w[key].shape)}"
    return None


def _compare_values(name: str, want: list[Any], got: list[Any]) -> str | None:
    from prunefx.emit import differs, tensor_leaves

    ws, gs = tensor_leaves(want), tensor_leaves(got)
    if len(ws) != len(gs):
        return f"'{name}' was called with different results ({len(gs)} tensors instead of {len(ws)})"
    for w, g in zip(ws, gs, strict=True):
        problem = differs(g, w, reference="the masked model")
        if problem:
            return f"'{name}': {problem}"
    return None
