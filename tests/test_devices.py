"""prunefx with a GPU, checked on a machine without one.

``tests/fake_gpu.py`` puts a model on a stand-in ``"cuda"`` device (FakeTensorMode: shapes,
dtypes and devices, no data), where every op that mixes a CUDA tensor with a CPU one raises,
as on a real GPU. Two ways people use a GPU:

- the model lives on the GPU and is pruned there: trace, reconfigure (indices, slices, new
  modules, the optimizer's state) must keep everything on the model's device;
- the model is pruned on the CPU and the result moved to the GPU (``small.to("cuda")``): the
  pruned model must hold no device of its own. torch.export writes the capture's device
  into its graph (``aten.arange(n, device=cpu)``); the export front-end makes those follow
  the input (``prunefx/frontends/export.py``, ``_follow_input_device``).

What a fake device cannot show (values, a backward pass, code that asks the CUDA driver) is
left to the CPU tests. Of ``tests/test_hf_zoo.py``'s families, Falcon (its attention, while
torch.export captures it) and Qwen3-MoE (its expert routing) ask the driver, and DeBERTa-v3,
BEiT and ViT-MAE cannot be captured by torch.export inside another FakeTensorMode; they are
not in the pruned-on-the-GPU test below.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from fake_gpu import FakeTensorMode, as_numpy, devices_of, fake_gpu_copy, fake_gpu_input
from test_export_frontend import FAMILIES, ModeBlocks
from test_hf_zoo import ZOO, _inputs
from torch.utils import _pytree as pytree

import prunefx
import prunefx.nn as pnn
from zoo import build, example_input

pytestmark = pytest.mark.usefixtures("quiet_transformers")

# one model of each torchvision family (fx front-end)
VISION = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3", "mnasnet0_5",
          "mobilenet_v3_small", "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1",
          "swin_t", "vit_b_16"]


def _cuda_tensors_only(small: torch.nn.Module) -> None:
    assert devices_of(small) == {"cuda:0"}, devices_of(small)


@pytest.mark.parametrize("name", VISION)
def test_a_model_on_the_gpu_is_pruned_there(name: str) -> None:
    model, x = build(name), example_input(name)
    mask = as_numpy(prunefx.masks.random(prunefx.trace(model, (x,)), 0.5, seed=0))
    before = sum(p.numel() for p in model.parameters())
    mode = FakeTensorMode()
    gpu, gx = fake_gpu_copy(model, mode), fake_gpu_input(x, mode)
    with mode:
        small = prunefx.reconfigure(gpu, mask, example_inputs=(gx,))
        out = small(gx)
    _cuda_tensors_only(small)
    assert out.device.type == "cuda" and sum(p.numel() for p in small.parameters()) < before


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_the_optimizer_state_stays_on_the_gpu(optimizer: str) -> None:
    """``reconfigure(..., optimizer=)`` slices the momentum buffers where they are (AdamW's
    ``step`` counter is a CPU scalar in torch itself, and stays one)."""
    model, x = build("resnet18"), example_input("resnet18")
    mask = as_numpy(prunefx.masks.random(prunefx.trace(model, (x,)), 0.5, seed=0))
    mode = FakeTensorMode()
    gpu, gx = fake_gpu_copy(model.train(), mode), fake_gpu_input(x, mode)
    with mode:
        if optimizer == "SGD":
            opt = torch.optim.SGD(gpu.parameters(), lr=0.1, momentum=0.9)
            opt.state.update({p: {"momentum_buffer": torch.zeros_like(p)} for p in gpu.parameters()})
        else:
            opt = torch.optim.AdamW(gpu.parameters(), lr=1e-3)
            opt.state.update({p: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                              for p in gpu.parameters()})
        small = prunefx.reconfigure(gpu, mask, example_inputs=(gx,), optimizer=opt)
        small(gx)
    _cuda_tensors_only(small)
    states = [(k, v) for p in small.parameters() for k, v in opt.state[p].items()]
    assert states and all(v.device.type == "cuda" for k, v in states if k != "step")
    assert all(v.shape == p.shape for p in small.parameters() for k, v in opt.state[p].items() if k != "step")


@pytest.mark.parametrize("emit", ["graph", "module"])
@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "phi3", "bert", "vit"])
def test_a_transformer_pruned_on_the_cpu_moves_to_the_gpu(family: str, emit: str) -> None:
    make, kwargs, _attn, _mlp, inputs = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval()
    x = inputs()[0]
    graph = prunefx.trace(model, (x,), example_kwargs=kwargs or None)
    small = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5, exact_only=True, seed=0), graph=graph, emit=emit)
    if emit == "graph":  # no device of the capture left in the graph
        held = [n.format_node() for n in small.graph.nodes
                if any(isinstance(a, torch.device) for a in pytree.tree_leaves((n.args, n.kwargs)))]
        assert not held, held[:3]
    mode = FakeTensorMode()
    gpu, gx = fake_gpu_copy(small, mode), fake_gpu_input(x, mode)
    with mode:
        out = gpu(gx, **kwargs)
    first = out if isinstance(out, torch.Tensor) else out[0]
    assert first.device.type == "cuda"


@pytest.mark.parametrize("name", ["gemma2", "olmo2", "codegen", "llama_mqa", "opt", "albert", "mobilebert", "swin", "segformer", "funnel",
                                  "mamba"])
def test_a_transformer_on_the_gpu_is_pruned_there(name: str) -> None:
    """The default path (torch.export, the module emitter and its check) on a model that
    lives on the GPU; the check compares shapes only (a fake tensor has no values)."""
    config, cls, kw, kind, _exact = ZOO[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**kw)).eval()
    x = _inputs(kind)[0]
    kwargs = {"use_cache": False} if cls.endswith("ForCausalLM") or name == "mamba" else {}
    graph = prunefx.trace(model, (x,), example_kwargs=kwargs or None)
    mask = as_numpy(prunefx.masks.random(graph, 0.5, exact_only=True, seed=0))
    mode = FakeTensorMode()
    gpu, gx = fake_gpu_copy(model, mode), fake_gpu_input(x, mode)
    with mode:
        small = prunefx.reconfigure(gpu, mask, example_inputs=(gx,), example_kwargs=kwargs or None)
        small(gx, **kwargs)
    assert type(small) is type(model)
    _cuda_tensors_only(small)


def test_an_autocast_block_follows_the_model_to_the_gpu() -> None:
    """``torch.autocast(x.device.type, enabled=False)`` (EfficientViT's float32 attention) is
    captured with the capture's device type; the pruned graph reads it from its input, so on a
    GPU the block leaves CUDA's autocast (not the CPU's), and on meta it keeps the capture's."""
    torch.manual_seed(0)
    model, x = ModeBlocks().eval(), torch.randn(3, 8)
    graph = prunefx.trace(model, x, frontend="export")
    small = prunefx.reconfigure(model, {"a": torch.arange(16) % 3 != 0}, graph=graph)
    enter = next(n for n in small.graph.nodes if n.target is torch.amp.autocast_mode._enter_autocast)
    assert enter.args[0].target is pnn.autocast_device_type
    mode = FakeTensorMode()
    with mode:
        assert pnn.autocast_device_type(torch.empty(2, device="cuda"), "cpu") == "cuda"
    assert pnn.autocast_device_type(torch.empty(2, device="meta"), "cpu") == "cpu"
    gpu, gx = fake_gpu_copy(small, mode), fake_gpu_input(x, mode)
    with mode:
        assert gpu(gx).device.type == "cuda"
