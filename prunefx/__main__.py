"""The ``prunefx`` command. Each subcommand is one ``_add_<name>`` function that declares its
arguments and one ``run_<name>`` function that does the work; ``SUBCOMMANDS`` lists them.

    prunefx prune torchvision:resnet50 --criterion magnitude --ratio 0.5 -o pruned.pt --onnx pruned.onnx
    prunefx export torchvision:resnet50 --mask mask.pt -o model.onnx
    prunefx export torchvision:resnet50 --checkpoint pruned.pt -o model.onnx --fp16

MODEL is torchvision:NAME, timm:NAME or path/to/file.py:factory (see prunefx/cli_models.py).

Every argument (ratio, device, output directories, mask and checkpoint files) is checked
before the model is loaded; an error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import prunefx
from prunefx.cli_models import (
    CliError,
    check_output,
    example_input,
    example_kwargs,
    load_checkpoint,
    load_mask,
    load_model,
    parse_kwargs,
    parse_shape,
)
from prunefx.errors import PruneFxError
from prunefx.export import DEFAULT_OPSET, check_device, export_onnx

__all__ = ["main", "build_parser"]

# --criterion -> the norm p of prunefx.masks.magnitude (None: prunefx.masks.random); l1/l2 are aliases
CRITERIA: dict[str, int | None] = {"magnitude": 1, "l1": 1, "l2": 2, "random": None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_arguments(args)  # before the model is loaded: a bad flag must not cost a whole run
        return int(args.run(args) or 0)
    except (PruneFxError, CliError) as exc:
        print(f"prunefx {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The message on one line: multi-line details (a trace's source lines) joined by '; '."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _check_arguments(args: argparse.Namespace) -> None:
    """Every argument that can be checked without the model: raises CliError/ExportError."""
    parse_shape(args.input)
    parse_kwargs(args.kwarg)
    ratio = getattr(args, "ratio", None)
    if ratio is not None and not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise CliError(f"--ratio is the fraction of each group's channels to drop, in [0, 1); got {ratio:g}")
    for flag in ("output", "save_mask", "onnx", "html"):
        path = getattr(args, flag, None)
        if path:
            check_output("-o" if flag == "output" else "--" + flag.replace("_", "-"), path)
    if hasattr(args, "device"):
        check_device(args.device)  # syntax always; a GPU only when the export verifies
    for flag in ("layers", "groups"):
        if getattr(args, flag, 0) < -1:
            raise CliError(f"--{flag} must be a row count, 0 (none) or -1 (all); got {getattr(args, flag)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunefx", description="Structured pruning as a graph compiler for PyTorch.")
    parser.add_argument("--version", action="version", version=f"prunefx {prunefx.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# ----------------------------------------------------------------------------- prune


def _add_prune(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a model with a criterion, save it, optionally export it to ONNX",
                       description="Trace MODEL, mask a RATIO of the channels of every prunable group by CRITERION, "
                                   "reconfigure it into a smaller dense model and save it (prunefx.state_dict format).")
    _model_arguments(p)
    p.add_argument("--criterion", choices=tuple(CRITERIA), default="magnitude",
                   help="magnitude: drop the channels of smallest L1 weight norm (prunefx.masks.magnitude); "
                        "l1 is an alias of it, l2 the same with the L2 norm (magnitude p=2); random: a random subset "
                        "(default: magnitude)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the channels of each group to drop (default: 0.5)")
    p.add_argument("--exact-only", action="store_true", help="prune only exact groups (the pruned model equals the masked one)")
    p.add_argument("--seed", type=int, default=0, help="seed of --criterion random")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write: torch.save(prunefx.state_dict(pruned))")
    p.add_argument("--save-mask", metavar="PATH", help="also save the mask (for `prunefx export --mask`)")
    p.add_argument("--onnx", metavar="PATH", help="also export the pruned model to this ONNX file")
    _export_arguments(p)
    p.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    model = load_model(args.model, weights=args.weights)
    x, kwargs = example_input(args.input), example_kwargs(model, args.kwarg)
    graph = prunefx.trace(model, x, example_kwargs=kwargs or None)
    mask = _criterion_mask(graph, args.criterion, args.ratio, exact_only=args.exact_only, seed=args.seed)
    small = prunefx.reconfigure(model, mask, graph=graph)
    torch.save(prunefx.state_dict(small), args.output)
    if args.save_mask:
        torch.save(mask, args.save_mask)
    _print_sizes(model, small, x, f"{args.criterion} {args.ratio:g} on {len(mask)} of {len(graph.groups)} groups")
    print(f"saved {args.output}" + (f" and mask {args.save_mask}" if args.save_mask else ""))
    if args.onnx:
        _export(small, args.onnx, x, kwargs, args)
    return 0


def _criterion_mask(graph: prunefx.PruneGraph, criterion: str, ratio: float, *, exact_only: bool, seed: int) -> dict[str, torch.Tensor]:
    p = CRITERIA[criterion]
    if p is None:
        return dict(prunefx.masks.random(graph, ratio, seed=seed, exact_only=exact_only))
    return dict(prunefx.masks.magnitude(graph, ratio, p=p, exact_only=exact_only))  # the filter norm of Li et al.


# ----------------------------------------------------------------------------- export


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a (pruned) model to ONNX, verified in ONNX Runtime",
                       description="Export MODEL, reconfigured by --mask or rebuilt from a --checkpoint of `prunefx prune`, "
                                   "to ONNX; check it with onnx.checker and compare ONNX Runtime with PyTorch.")
    _model_arguments(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mask", metavar="PATH", help="a mask saved with torch.save({name: bool_tensor}); the model is reconfigured with it")
    source.add_argument("--checkpoint", metavar="PATH", help="a checkpoint written by `prunefx prune -o` (prunefx.state_dict)")
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    _export_arguments(p)
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    mask = load_mask(args.mask) if args.mask else None  # the files first: they fail fast
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else None
    model = load_model(args.model, weights=args.weights)
    x, kwargs = example_input(args.input), example_kwargs(model, args.kwarg)
    if mask is not None:
        small = prunefx.reconfigure(model, mask, example_inputs=x, example_kwargs=kwargs or None)
        _print_sizes(model, small, x, f"mask {args.mask}")
        model = small
    elif checkpoint is not None:
        small = prunefx.load_state_dict(model, checkpoint)
        _print_sizes(model, small, x, f"checkpoint {args.checkpoint}")
        model = small
    _export(model, args.output, x, kwargs, args)
    return 0


# ----------------------------------------------------------------------------- shared


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="torchvision:NAME, timm:NAME or path/to/file.py:factory")
    p.add_argument("--input", default="1,3,224,224", metavar="SHAPE", help="example input shape, e.g. 1,3,224,224 or 1,128:int64 (default: 1,3,224,224)")
    p.add_argument("--weights", default=None, help="pretrained weights to load (torchvision weight name such as DEFAULT; any value for timm); default: random")
    p.add_argument("--kwarg", action="append", default=[], metavar="NAME=VALUE",
                   help="a keyword input of forward, a Python literal (repeatable), e.g. --kwarg output_attentions=False; "
                        "a transformers model gets use_cache=False unless given")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ONNX export")
    g.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto", help="auto: dynamo, then TorchScript if it fails (default)")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    g.add_argument("--static-batch", action="store_true", help="fix the batch size to that of --input")
    g.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic (float32 inputs/outputs), for GPUs")
    g.add_argument("--no-simplify", action="store_true", help="skip ONNX Runtime's basic graph optimizations applied offline "
                                                               "(constant folding, redundant nodes, Conv+BatchNorm fusion)")
    g.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    g.add_argument("--device", default="auto", help="ONNX Runtime device of the check: auto, cpu, cuda[:N] (default: auto)")


def _export(model: nn.Module, path: str, x: torch.Tensor, kwargs: dict[str, Any], args: argparse.Namespace) -> None:
    result = export_onnx(
        model, path, x, example_kwargs=kwargs or None, dynamic_batch=not args.static_batch, verify=not args.no_verify, exporter=args.exporter,
        opset=args.opset, simplify=not args.no_simplify, fp16=args.fp16, device=args.device,
    )
    print(f"wrote {result}")
    print(f"exporter: {result.exporter} ({result.exporter_reason})")
    for w in result.warnings:
        print(f"warning: {w}")


def _print_sizes(model: nn.Module, small: nn.Module, x: torch.Tensor, how: str) -> None:
    flops = [prunefx.count_flops(m, x) for m in (model, small)]
    params = [prunefx.count_params(m) for m in (model, small)]
    print(f"pruned by {how}: params {params[0]:,} -> {params[1]:,} ({params[1] / params[0]:.1%}), "
          f"FLOPs {flops[0]:,} -> {flops[1]:,} ({flops[1] / max(flops[0], 1):.1%})")


# ----------------------------------------------------------------------------- inspect


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show the channel groups, costs and pinning reasons of a model",
                       description="Trace MODEL and print its totals, why groups are pinned or approximate, its channel "
                                   "groups and its layers (shapes, channels, params, FLOPs, activation memory); "
                                   "optionally write the HTML page with the graph picture.")
    _model_arguments(p)
    p.add_argument("--html", metavar="PATH", help="also write the self-contained HTML page (graph picture needs graphviz's `dot`)")
    p.add_argument("--explain", metavar="NAME", action="append", default=[], help="explain why module/group NAME is coupled or pinned (repeatable)")
    p.add_argument("--layers", type=int, default=30, metavar="N", help="layer rows to print (0: none, -1: all; default: 30)")
    p.add_argument("--groups", type=int, default=25, metavar="N", help="group rows to print (0: none, -1: all; default: 25)")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    model = load_model(args.model, weights=args.weights)
    report = prunefx.inspect(model, example_input(args.input), example_kwargs=example_kwargs(model, args.kwarg) or None)
    console = Console(width=None if sys.stdout.isatty() else 120)
    limit = {0: 0, -1: None}
    console.print(report.renderable(groups=limit.get(args.groups, args.groups), layers=limit.get(args.layers, args.layers)))
    for name in args.explain:
        console.print()
        console.print(report.explain(name))
    if args.html:
        report.to_html(args.html)
        print(f"wrote {args.html}")
    return 0


SUBCOMMANDS: list[Callable[[Any], None]] = [_add_prune, _add_export, _add_inspect]


if __name__ == "__main__":
    sys.exit(main())
