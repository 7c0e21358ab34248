"""torchvision detection models: backbone, FPN and heads pruned exactly, detection API kept.

The models run in float64 here: random-init detectors score thousands of near-identical
anchors, and in float32 the rounding of a smaller sum is enough to flip an NMS decision
(an IoU at the 0.7 threshold, a top-k cut), so two exact models can return different boxes.
In float64 the pruned model returns the masked model's detections to 1e-12.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision as tv
from torch import nn

import prunefx
from prunefx.errors import ReconfigureError, TraceError

D = tv.models.detection

SMALL = dict(weights=None, weights_backbone=None, min_size=96, max_size=128)
RCNN = dict(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_detections_per_img=10)


def _frozen_bn_resnet18() -> nn.Module:
    """What a user with pretrained weights has: FrozenBatchNorm2d, frozen early layers."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = D.backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    return D.FasterRCNN(backbone, num_classes=4, min_size=96, max_size=128, **RCNN)


BUILDERS = {
    "fasterrcnn_resnet18_frozenbn_fpn": _frozen_bn_resnet18,
    "fasterrcnn_mobilenet_v3_large_fpn": lambda: D.fasterrcnn_mobilenet_v3_large_fpn(num_classes=4, **SMALL, **RCNN),
    "fasterrcnn_resnet50_fpn_v2": lambda: D.fasterrcnn_resnet50_fpn_v2(num_classes=4, **SMALL, **RCNN),
    "maskrcnn_resnet50_fpn": lambda: D.maskrcnn_resnet50_fpn(num_classes=4, **SMALL, **RCNN),
    "keypointrcnn_resnet50_fpn": lambda: D.keypointrcnn_resnet50_fpn(num_keypoints=5, **SMALL, **RCNN),
    "retinanet_resnet50_fpn": lambda: D.retinanet_resnet50_fpn(num_classes=4, score_thresh=0.0, detections_per_img=10, **SMALL),
    "fcos_resnet50_fpn": lambda: D.fcos_resnet50_fpn(num_classes=4, score_thresh=0.0, detections_per_img=10, **SMALL),
    "ssd300_vgg16": lambda: D.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=4, detections_per_img=10),
    "ssdlite320_mobilenet_v3_large": lambda: D.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4, detections_per_img=10),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    det = BUILDERS[name]().eval()
    gen = torch.Generator().manual_seed(1)
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, tv.ops.misc.FrozenBatchNorm2d)
    with torch.no_grad():  # default statistics (0/1) and norm weights (1) would hide misaligned slices
        for m in det.modules():
            if isinstance(m, norms):
                for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                    if t.is_floating_point():
                        scale = n in ("weight", "running_var")
                        t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if scale else torch.randn(t.shape, generator=gen) * 0.3)
        if name.startswith("ssdlite"):  # its init (std 0.03, batch-norm'd towers) scores every anchor alike to 1e-12
            for p in det.head.parameters():
                p.normal_(0, 1.0, generator=gen)
        if hasattr(det.backbone, "scale_weight"):  # SSD's L2Norm scale, 20 everywhere
            det.backbone.scale_weight.uniform_(10, 30, generator=gen)
    return det.double()


def _images(*sizes: tuple[int, int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(h * w for h, w in sizes))
    return [torch.rand(3, h, w, generator=gen, dtype=torch.float64) for h, w in sizes]


def _canonical(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detections in one order: exactly tied scores (identical clipped boxes) may come out in
    either order."""
    key = torch.cat([d["labels"][:, None].double(), d["scores"][:, None].double(), d["boxes"].double()], 1).tolist()
    order = sorted(range(len(key)), key=lambda i: key[i])
    return {k: v[order] for k, v in d.items()}


def _assert_same_detections(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g, w = _canonical(g), _canonical(w)
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].shape == w[k].shape, k
            if w[k].numel():
                diff = (g[k].double() - w[k].double()).abs().flatten(1).amax(1) if w[k].dim() > 1 else (g[k].double() - w[k].double()).abs()
                bad = (diff > 1e-9 * max(1.0, float(w[k].double().abs().max()))).nonzero().flatten().tolist()
                assert not bad, f"'{k}' differs at detections {bad[:5]} (scores {w['scores'][bad[:5]].tolist()} vs {g['scores'][bad[:5]].tolist()})"


def _half_of_exact(g: prunefx.PruneGraph) -> dict[str, torch.Tensor]:
    exact = [gr for gr in g.groups if gr.prunable and gr.exact]
    return {gr.name: torch.arange(gr.size) % 2 == 0 for gr in exact[::2]}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_detection_prunes_exactly(name: str) -> None:
    det = _build(name)
    images = _images((96, 120), (110, 96))
    before = {k: v.clone() for k, v in det.state_dict().items()}
    g = prunefx.trace(det, images)
    assert g.frontend == "fx"
    mask = _half_of_exact(g)
    small = prunefx.reconfigure(det, mask, example_inputs=images)
    assert type(small) is type(det)

    ref = copy.deepcopy(det)
    prunefx.apply_mask(ref, mask, example_inputs=images)
    with torch.no_grad():
        for imgs in (images, _images((90, 128), (128, 90), (96, 96))):  # and at other sizes, another batch
            want, got = ref(imgs), small(imgs)
            assert sum(len(w["boxes"]) for w in want) > 0
            _assert_same_detections(got, want)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (det, small))
    assert n1 <= 0.8 * n0, f"{n0} -> {n1}"
    assert all(torch.equal(before[k], v) for k, v in det.state_dict().items())


def test_pruned_detector_trains_with_its_optimizer() -> None:
    """The detection API in training mode (targets in, losses out) and the optimizer follow."""
    det = D.fasterrcnn_mobilenet_v3_large_fpn(num_classes=3, **SMALL, **RCNN)
    images = _images((96, 96), (96, 120))
    images = [i.float() for i in images]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])} for _ in images]
    opt = torch.optim.SGD(det.parameters(), lr=0.01, momentum=0.9)
    sum(det(images, targets).values()).backward()
    opt.step()
    g = prunefx.trace(det, images)
    small = prunefx.reconfigure(det, _half_of_exact(g), example_inputs=images, optimizer=opt)
    assert {id(p) for group in opt.param_groups for p in group["params"]} == {id(p) for p in small.parameters()}
    small.train()
    opt.zero_grad()
    losses = small(images, targets)
    sum(losses.values()).backward()
    opt.step()
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_detection_through_export_frontend() -> None:
    det = _build("fasterrcnn_mobilenet_v3_large_fpn")
    images = _images((96, 96))
    fx_sizes = sorted((gr.size, gr.exact) for gr in prunefx.trace(det, images).groups if gr.prunable)
    g = prunefx.trace(det, images, frontend="export")
    assert g.frontend == "export"
    assert sorted((gr.size, gr.exact) for gr in g.groups if gr.prunable) == fx_sizes
    small = prunefx.reconfigure(det, _half_of_exact(g), graph=g)
    ref = copy.deepcopy(det)
    prunefx.apply_mask(ref, _half_of_exact(g), graph=g)
    with torch.no_grad():
        _assert_same_detections(small(images), ref(images))


def test_detection_errors() -> None:
    det = _build("fasterrcnn_mobilenet_v3_large_fpn")
    images = _images((96, 96))
    mask = _half_of_exact(prunefx.trace(det, images))
    with pytest.raises(ReconfigureError, match="detection model.*emit='module'"):
        prunefx.reconfigure(det, mask, example_inputs=images, emit="graph")
    with pytest.raises(TraceError, match="list of 3-D images"):
        prunefx.trace(det, torch.rand(96, 96))
    with pytest.raises(TraceError, match="keyword"):
        prunefx.trace(det, images, example_kwargs={"targets": None})
    with pytest.raises(prunefx.MaskError, match="graph= was not traced from this model"):  # another instance's weights
        prunefx.reconfigure(copy.deepcopy(det), mask, graph=prunefx.trace(det, images))
    det.extra = nn.Linear(2, 2)  # a module the standard forward never runs, but a subclass might
    with pytest.raises(ReconfigureError, match="parameter 'extra.weight'.*not on the paths"):
        prunefx.reconfigure(det, mask, example_inputs=images)


def test_pruned_detector_checkpoint_round_trip(tmp_path) -> None:
    det = _build("fasterrcnn_mobilenet_v3_large_fpn")
    images = _images((96, 96))
    small = prunefx.reconfigure(det, _half_of_exact(prunefx.trace(det, images)), example_inputs=images)
    torch.save(prunefx.state_dict(small), tmp_path / "small.pt")
    back = prunefx.load_state_dict(_build("fasterrcnn_mobilenet_v3_large_fpn"), torch.load(tmp_path / "small.pt", weights_only=False))
    assert type(back) is type(det)
    with torch.no_grad():
        _assert_same_detections(back(images), small(images))


def test_mask_sources_and_inspector_take_a_detector() -> None:
    det = _build("fasterrcnn_mobilenet_v3_large_fpn")
    images = _images((96, 96))
    g = prunefx.trace(det, images)
    mask = prunefx.masks.to_budget(g, params=0.6)
    small = prunefx.reconfigure(det, mask, graph=g)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (det, small))
    assert 0.5 < n1 / n0 < 0.7
    report = prunefx.inspect(det, images)
    assert "FasterRCNN" in str(report)


def test_api_check_catches_a_pruned_detector_that_differs(monkeypatch) -> None:
    """The check before return can fail: against an unmasked reference (zeroing disabled), the
    pruned model's heads differ, and nothing is returned or changed."""
    import sys

    det = _build("fasterrcnn_mobilenet_v3_large_fpn").float()
    images = [i.float() for i in _images((96, 96))]
    mask = _half_of_exact(prunefx.trace(det, images))
    before = {k: v.clone() for k, v in det.state_dict().items()}
    monkeypatch.setattr(sys.modules["prunefx.reconfigure"], "zero_dropped", lambda *args: None)
    with pytest.raises(ReconfigureError, match="differs from the masked model on the example images: 'rpn.head'"):
        prunefx.reconfigure(det, mask, example_inputs=images)
    assert all(torch.equal(before[k], v) for k, v in det.state_dict().items())
