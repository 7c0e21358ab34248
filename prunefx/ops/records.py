"""The op records: every op prunefx knows, with all its spellings.

Spellings of one op share a record: ``torch.add``, ``operator.add``, ``x.add(y)`` and
``aten.add.Tensor`` are the same op to the channel analysis. In-place variants get their own
record only where that matters (dead-code elimination must never drop a mutation).

Adding an op is one entry here and its test; the rule functions live in
``prunefx.analysis.rules`` (channel layouts) and ``prunefx.passes.fix_shape_args`` (size
arguments after pruning).
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunefx import nn as pnn
from prunefx import shape_rules as sr
from prunefx.analysis import rules as r
from prunefx.ops import OpSpec
from prunefx.passes import fix_shape_args as fix

__all__ = ["SPECS"]


def _aten(*names: str) -> tuple[Any, ...]:
    """aten overloads by name ("view.default"); overloads this torch lacks are left out."""
    out = []
    for name in names:
        packet, overload = name.split(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if op is not None:
            out.append(op)
    return tuple(out)


def _roi_align() -> tuple[Any, ...]:
    """torchvision's RoI pooling (detection heads), when torchvision is installed."""
    try:
        from torchvision.ops import roi_align
    except ImportError:
        return ()
    return (roi_align, torch.ops.torchvision.roi_align.default)


def _frozen_batchnorm() -> tuple[type, ...]:
    """torchvision's FrozenBatchNorm2d (detection backbones with pretrained weights)."""
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:
        return ()
    return (FrozenBatchNorm2d,)


_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Tanh, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)

SPECS: tuple[OpSpec, ...] = (
    # ---- values that carry no channels, and size arithmetic -------------------------------
    OpSpec("metadata", r.metadata, functions=_aten("sym_size.int"), methods=("size", "dim", "numel"),
           empty_ok=True, pure=True),
    OpSpec("getattr", r.attribute, functions=(builtins.getattr,), empty_ok=True, pure=True),  # x.shape, x.max(1).values
    OpSpec("getitem", r.getitem, functions=(operator.getitem,), fix=fix.getitem, empty_ok=True, pure=True),
    OpSpec("size arithmetic", r.unknown, functions=(operator.floordiv, operator.mod), pure=True),
    OpSpec("no channels", r.no_channels, functions=_aten(
        "_assert_tensor_metadata.default", "_assert_scalar.default", "arange.default", "arange.start",
        "arange.start_step", "new_ones.default", "new_zeros.default", "new_full.default", "new_empty.default",
        "zeros.default", "ones.default", "full.default", "empty.memory_format", "scalar_tensor.default",
        "eq.Scalar", "ne.Scalar", "lt.Scalar", "le.Scalar", "gt.Scalar", "ge.Scalar",
    ) + (pnn.static_sizes, pnn.autocast_device_type, torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast,
         torch.is_grad_enabled, torch._C._set_grad_enabled), empty_ok=True),  # the export front-end's checks and mode blocks
    OpSpec("identity", r.identity, functions=_aten(
        "to.dtype", "to.device", "to.dtype_layout", "to.other", "_to_copy.default", "alias.default", "contiguous.default",
        "clone.default", "detach.default", "lift_fresh_copy.default", "type_as.default",
    ), methods=("contiguous", "clone", "detach", "to", "float", "half", "double", "bfloat16", "type_as",
                "requires_grad_", "cpu", "cuda"), empty_ok=True),
    # ---- elementwise -------------------------------------------------------------------------
    OpSpec("add", r.elementwise(r.ADD), functions=(
        operator.add, operator.sub, torch.add, torch.sub, torch.subtract, *_aten("add.Tensor", "sub.Tensor", "rsub.Scalar"),
    ), methods=("add", "sub", "__add__", "__radd__"), empty_ok=True, pure=True, foldable=True, shape=sr.elementwise),
    OpSpec("add_", r.elementwise(r.ADD), functions=(operator.iadd, operator.isub, *_aten("add_.Tensor", "sub_.Tensor")),
           methods=("add_", "sub_"), empty_ok=True, foldable=True),
    OpSpec("maximum", r.elementwise(r.ADD), functions=(
        torch.maximum, torch.minimum, torch.fmax, torch.fmin, *_aten("maximum.default", "minimum.default"),
    ), methods=("maximum", "minimum"), empty_ok=True, pure=True),
    OpSpec("mul", r.elementwise(r.MUL), functions=(operator.mul, torch.mul, torch.multiply, *_aten("mul.Tensor")),
           methods=("mul",), empty_ok=True, pure=True, foldable=True, shape=sr.elementwise),
    OpSpec("mul_", r.elementwise(r.MUL), functions=(operator.imul, *_aten("mul_.Tensor")), methods=("mul_",), empty_ok=True,
           foldable=True),
    OpSpec("div", r.elementwise(r.DIV), functions=(
        operator.truediv, torch.div, torch.true_divide, torch.divide, *_aten("div.Tensor", "div.Tensor_mode"),
    ), methods=("div",), empty_ok=True, pure=True, shape=sr.elementwise),
    OpSpec("div_", r.elementwise(r.DIV), functions=(operator.itruediv, *_aten("div_.Tensor")), methods=("div_",), empty_ok=True),
    OpSpec("compare", r.elementwise(r.NONZERO), functions=_aten(
        "eq.Tensor", "ne.Tensor", "lt.Tensor", "le.Tensor", "gt.Tensor", "ge.Tensor", "__and__.Tensor",
        "__or__.Tensor", "logical_and.default", "logical_or.default", "bitwise_and.Tensor", "bitwise_or.Tensor",
    ), empty_ok=True),
    OpSpec("where", r.where, functions=(torch.where, *_aten("where.self")), empty_ok=True),
    OpSpec("masked_fill", r.masked_fill, functions=_aten("masked_fill.Scalar", "masked_fill.Tensor", "masked_fill_.Scalar"),
           methods=("masked_fill", "masked_fill_"), empty_ok=True),
    OpSpec("clamp", r.clamp, functions=(torch.clamp, torch.clip, *_aten("clamp.default", "clamp_.default", "clamp_min.default")),
           methods=("clamp", "clamp_", "clip"), empty_ok=True),
    OpSpec("pow", r.power, functions=(torch.pow, operator.pow, *_aten("pow.Tensor_Scalar")), methods=("pow",),
           empty_ok=True, pure=True),
    OpSpec("neg", r.unary(True), functions=(torch.neg, operator.neg, *_aten("neg.default")), methods=("neg",),
           empty_ok=True, pure=True, shape=sr.elementwise),
    OpSpec("zero-preserving activation", r.unary(True), functions=(
        torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
        F.mish, F.hardswish, F.tanh, torch.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
        torch.abs, torch.sqrt, torch.square, torch.sin, torch.erf,
        F.softshrink, F.hardshrink, F.tanhshrink, operator.pos,
        *_aten("relu.default", "relu_.default", "gelu.default", "gelu_.default", "silu.default", "silu_.default",
               "hardswish.default", "hardswish_.default", "tanh.default",
               "tanh_.default", "leaky_relu.default", "leaky_relu_.default", "elu.default", "elu_.default",
               "mish.default", "mish_.default", "abs.default", "sqrt.default", "square.default", "sin.default",
               "erf.default", "dropout.default", "dropout_.default", "feature_dropout.default"),
    ), methods=("relu", "relu_", "tanh", "tanh_", "abs", "sqrt", "square"), modules=_ZERO_PRESERVING_MODULES, empty_ok=True,
        shape=sr.elementwise, keeps_shape=True),
    OpSpec("non-zero activation", r.unary(False), functions=(
        torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, torch.exp, torch.cos,
        *_aten("sigmoid.default", "sigmoid_.default", "hardsigmoid.default", "hardsigmoid_.default",
               "softplus.default", "exp.default", "cos.default"),
    ), methods=("sigmoid", "sigmoid_", "exp"), modules=(nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid),
        empty_ok=True, shape=sr.elementwise, keeps_shape=True),
    OpSpec("hardtanh", r.hardtanh, functions=(F.hardtanh, F.hardtanh_, *_aten("hardtanh.default", "hardtanh_.default")),
           modules=(nn.Hardtanh,), empty_ok=True, shape=sr.elementwise, keeps_shape=True),
    OpSpec("threshold", r.threshold, functions=(F.threshold, F.threshold_), modules=(nn.Threshold,), empty_ok=True,
           shape=sr.elementwise, keeps_shape=True),
    OpSpec("alpha dropout", r.alpha_dropout, functions=(F.alpha_dropout, F.feature_alpha_dropout),
           modules=(nn.AlphaDropout, nn.FeatureAlphaDropout), empty_ok=True, shape=sr.elementwise, keeps_shape=True),
    OpSpec("pole at zero", r.pole_at_zero, functions=(
        torch.log, torch.log2, torch.log10, torch.rsqrt, torch.reciprocal,
        *_aten("log.default", "log2.default", "log10.default", "rsqrt.default", "reciprocal.default"),
    ), methods=("log", "log2", "log10", "rsqrt", "reciprocal"), empty_ok=True, shape=sr.elementwise, keeps_shape=True),
    OpSpec("zeros_like", r.like(True), functions=(torch.zeros_like, *_aten("zeros_like.default", "zero_.default")), methods=("zero_",)),
    OpSpec("constant_like", r.like(False), functions=(
        torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
        *_aten("ones_like.default", "empty_like.default", "full_like.default", "fill_.Scalar", "fill_.Tensor"),
    )),
    # ---- shapes ------------------------------------------------------------------------------
    OpSpec("reshape", r.reshape, functions=(torch.reshape, *_aten("view.default", "reshape.default", "_unsafe_view.default")),
           methods=("view", "reshape"), fix=fix.size_list, size_args=True, empty_ok=True),
    OpSpec("flatten", r.reshape, functions=(
        torch.flatten, torch.squeeze, torch.unsqueeze,
        *_aten("flatten.using_ints", "squeeze.dim", "squeeze.dims", "squeeze.default", "unsqueeze.default"),
    ), methods=("flatten", "squeeze", "unsqueeze"), modules=(nn.Flatten,), empty_ok=True),
    OpSpec("unflatten", r.reshape, functions=(torch.unflatten, *_aten("unflatten.int")), methods=("unflatten",),
           fix=fix.unflatten, size_args=True),
    OpSpec("nn.Unflatten", r.reshape, modules=(nn.Unflatten,)),
    OpSpec("view_as", r.reshape_as, methods=("view_as", "reshape_as")),
    OpSpec("permute", r.permute, functions=(torch.permute, *_aten("permute.default")), methods=("permute",), empty_ok=True),
    OpSpec("transpose", r.transpose, functions=(torch.transpose, torch.swapaxes, *_aten("transpose.int")),
           methods=("transpose", "swapaxes"), empty_ok=True),
    OpSpec("t", r.reverse_dims, functions=(torch.t, *_aten("t.default", "numpy_T.default")), methods=("t",)),  # x.T
    OpSpec("matrix transpose", r.matrix_transpose, functions=(  # x.mT, x.mH, x.adjoint()
        torch.adjoint, *_aten("mT.default", "mH.default", "adjoint.default", "matrix_H.default"),
    ), methods=("adjoint",)),
    OpSpec("movedim", r.movedim, functions=(torch.movedim,), methods=("movedim",)),
    OpSpec("expand", r.expand, functions=_aten("expand.default"), methods=("expand",), fix=fix.size_list, size_args=True),
    OpSpec("expand_as", r.expand, functions=_aten("expand_as.default"), methods=("expand_as",)),
    OpSpec("repeat", r.repeat, functions=_aten("repeat.default"), methods=("repeat",)),
    OpSpec("cat", r.cat, functions=(torch.cat, torch.concat, torch.concatenate, *_aten("cat.default")), empty_ok=True),
    OpSpec("stack", r.stack, functions=(torch.stack, *_aten("stack.default")), empty_ok=True),
    OpSpec("split", r.split, functions=(
        torch.split, torch.chunk, *_aten("split.Tensor", "split_with_sizes.default", "chunk.default"),
    ), methods=("split", "chunk"), fix=fix.split_args, size_args=True, empty_ok=True),
    OpSpec("narrow", r.narrow, functions=(torch.narrow, *_aten("narrow.default")), methods=("narrow",), fix=fix.narrow,
           size_args=True),
    OpSpec("select", r.select, functions=_aten("select.int"), fix=fix.select_args, size_args=True),
    OpSpec("slice", r.slice_dim, functions=_aten("slice.Tensor"), fix=fix.slice_args, size_args=True, empty_ok=True),
    OpSpec("index", r.index_tensors, functions=_aten("index.Tensor")),
    OpSpec("gather", r.gather, functions=(torch.gather, torch.index_select, *_aten("gather.default", "index_select.default"))),
    OpSpec("cumsum", r.cumulative, functions=(torch.cumsum, *_aten("cumsum.default")), methods=("cumsum",)),
    OpSpec("diff", r.difference, functions=(torch.diff, *_aten("diff.default"))),
    OpSpec("roll", r.roll, functions=(torch.roll, *_aten("roll.default")), methods=("roll",)),
    # ---- reductions, pooling, resizing -------------------------------------------------------
    OpSpec("vector_norm", r.reduction("norm", dim_at=2), functions=(torch.linalg.vector_norm, *_aten("linalg_vector_norm.default"))),
    OpSpec("linalg_norm", r.linalg_norm, functions=(torch.linalg.norm, *_aten("linalg_norm.default"))),  # DoRA's weight norm
    OpSpec("sum", r.reduction("sum"), functions=(torch.sum, *_aten("sum.dim_IntList")), methods=("sum",), empty_ok=True),
    OpSpec("mean", r.reduction("mean"), functions=(torch.mean, *_aten("mean.dim")), methods=("mean",), empty_ok=True),
    OpSpec("amax", r.reduction("amax"), functions=(torch.amax, *_aten("amax.default")), methods=("amax",)),
    OpSpec("max", r.reduction_with_indices("max"), functions=(torch.max, *_aten("max.dim", "max.default")), methods=("max",), pure=True),
    OpSpec("min", r.reduction_with_indices("min"), functions=(torch.min, *_aten("min.dim", "min.default")), methods=("min",), pure=True),
    OpSpec("amin", r.reduction("amin"), functions=(torch.amin, *_aten("amin.default")), methods=("amin",)),
    OpSpec("adaptive_avg_pool", r.spatial(None), functions=(
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        *_aten("adaptive_avg_pool1d.default", "adaptive_avg_pool2d.default", "adaptive_avg_pool3d.default"),
    ), modules=(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), empty_ok=True, shape=sr.adaptive_avg_pool),
    OpSpec("pool", r.spatial(None), functions=(
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample,
        *_aten("max_pool1d.default", "max_pool2d.default", "max_pool3d.default", "avg_pool1d.default",
               "avg_pool2d.default", "avg_pool3d.default", "adaptive_max_pool2d.default", "max_pool2d_with_indices.default",
               "upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec", "upsample_bilinear2d.vec",
               "upsample_linear1d.vec", "upsample_trilinear3d.vec", "upsample_bicubic2d.vec"),
    ), modules=_POOLS),
    OpSpec("roi_align", r.spatial(2), functions=_roi_align()),  # per channel: boxes replace the batch dim
    OpSpec("pad", r.pad, functions=(F.pad, *_aten("pad.default", "constant_pad_nd.default")), empty_ok=True),
    OpSpec("softmax", r.softmax, functions=(
        F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, *_aten("softmax.int", "log_softmax.int", "_softmax.default"),
    ), methods=("softmax", "log_softmax"), modules=(nn.Softmax, nn.LogSoftmax, nn.Softmin)),
    OpSpec("normalize", r.normalize, functions=(F.normalize,)),
    # ---- layers with weights -----------------------------------------------------------------
    OpSpec("conv", r.conv_module, modules=(
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    ), weight_flops=True, shape=sr.conv_module),
    *(OpSpec(f"conv{n}d", r.conv_function(n, transposed=False), functions=(f, *_aten(f"conv{n}d.default")), fix=fix.conv_groups,
             weight_flops=True)
      for n, f in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d))),
    *(OpSpec(f"conv_transpose{n}d", r.conv_function(n, transposed=True), functions=(f, *_aten(f"conv_transpose{n}d.input")),
             fix=fix.conv_groups, weight_flops=True)
      for n, f in ((1, F.conv_transpose1d), (2, F.conv_transpose2d), (3, F.conv_transpose3d))),
    OpSpec("linear", r.linear_function, functions=(F.linear, *_aten("linear.default")), empty_ok=True, weight_flops=True),
    OpSpec("nn.Linear", r.linear_module, modules=(nn.Linear,), empty_ok=True, weight_flops=True, shape=sr.linear_module),
    OpSpec("addmm", r.addmm, functions=(torch.addmm, *_aten("addmm.default")), weight_flops=True),
    OpSpec("matmul", r.matmul, functions=(
        torch.matmul, operator.matmul, torch.bmm, torch.mm, *_aten("matmul.default", "bmm.default", "mm.default"),
    ), methods=("matmul", "bmm"), weight_flops=True),
    # mixture-of-experts weights (experts, in, out): transformers' experts, F.grouped_mm
    OpSpec("grouped_mm", r.grouped_mm, functions=(*((F.grouped_mm,) if hasattr(F, "grouped_mm") else ()), *_aten("_grouped_mm.default")),
           operators=("transformers::grouped_mm_fallback",), weight_flops=True),
    OpSpec("scaled_dot_product_attention", r.scaled_dot_product_attention, functions=(
        F.scaled_dot_product_attention, *_aten("scaled_dot_product_attention.default"),
    ), fix=fix.attention_scale),
    OpSpec("batch_norm", r.batchnorm_call(r.F_BATCH_NORM_ARGS), functions=(F.batch_norm, F.instance_norm)),
    OpSpec("aten.batch_norm", r.batchnorm_call(r.ATEN_BATCH_NORM_ARGS), functions=_aten("batch_norm.default")),
    OpSpec("FrozenBatchNorm2d", r.frozen_batchnorm_module, modules=_frozen_batchnorm()),
    OpSpec("nn.BatchNorm", r.batchnorm_module, modules=(nn.modules.batchnorm._NormBase,), keeps_shape=True),  # also SyncBatchNorm, InstanceNorm*
    OpSpec("group_norm", r.groupnorm_function, functions=(F.group_norm, *_aten("group_norm.default")), fix=fix.group_norm),
    OpSpec("nn.GroupNorm", r.groupnorm_module, modules=(nn.GroupNorm,), keeps_shape=True),
    OpSpec("layer_norm", r.layernorm_function, functions=(F.layer_norm, *_aten("layer_norm.default")), fix=fix.layer_norm),
    OpSpec("nn.LayerNorm", r.layernorm_module, modules=(nn.LayerNorm,), keeps_shape=True),
    OpSpec("embedding", r.embedding_function, functions=(F.embedding, *_aten("embedding.default"))),
    OpSpec("nn.Embedding", r.embedding_module, modules=(nn.Embedding,)),
    OpSpec("nn.PReLU", r.prelu_module, modules=(nn.PReLU,), keeps_shape=True),
    OpSpec("nn.LocalResponseNorm", r.lrn, modules=(nn.LocalResponseNorm,), keeps_shape=True),
    OpSpec("nn.ChannelShuffle", r.channel_shuffle_module, modules=(nn.ChannelShuffle,)),
    OpSpec("nn.MultiheadAttention", r.multihead_attention, modules=(nn.MultiheadAttention, pnn.MultiheadAttention),
           shape=sr.attention_module),
    OpSpec("prunefx.nn.BranchConstant", r.branch_constant, modules=(pnn.BranchConstant,)),
    OpSpec("shifted_window_attention", r.window_attention, functions=(pnn.shifted_window_attention,), fix=fix.window_attention,
           shape=sr.window_attention(inner_is_width=False)),
)

try:  # torchvision wraps these for fx, so they are single nodes in fx-traced graphs
    from torchvision.models import swin_transformer as _swin
    from torchvision.ops import StochasticDepth as _StochasticDepth
    from torchvision.ops import stochastic_depth as _stochastic_depth

    SPECS = (
        *SPECS,
        OpSpec("stochastic_depth", r.unary(True), functions=(_stochastic_depth,)),  # scales whole samples
        # a leaf: its forward passes self.training on, which would make the two modes' graphs differ
        OpSpec("torchvision StochasticDepth", r.unary(True), modules=(_StochasticDepth,), empty_ok=True, leaf=True,
               shape=sr.elementwise),
        OpSpec("torchvision shifted_window_attention", r.window_attention, functions=(_swin.shifted_window_attention,),
               fix=fix.window_attention, shape=sr.window_attention(inner_is_width=True)),
        OpSpec("torchvision relative_position_bias", r.relative_position_bias, functions=(_swin._get_relative_position_bias,)),
        OpSpec("torchvision patch_merging_pad", r.patch_merging_pad, functions=(_swin._patch_merging_pad,)),
    )
except ImportError:  # pragma: no cover - torchvision is optional
    pass
