"""Reconfiguring a model that trains under FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 no rank holds the model: every parameter is a ``DTensor`` sharded on dim 0 over a
1-D mesh, and AdamW's moments are ``DTensor``s of the same layout. ``reconfigure_fsdp`` runs
the usual single-process rewrite on a gathered copy and shards the result again, so that every
rank ends up holding its chunk of the same smaller model:

1. **decide**: the mask of rank ``src`` is broadcast (as ``reconfigure_ddp`` does); with
   ``src=None`` every rank passes its own mask and they are checked to be equal (a mask that
   differs across ranks is a one-line ``DistributedError`` naming the ranks);
2. **gather**: every parameter is all-gathered (``DTensor.full_tensor``) into a plain replica
   of the model (its original classes, without FSDP's hooks); buffers, which FSDP does not keep
   in sync (BatchNorm statistics), are taken from rank ``src`` (``src=None``: rank 0), as
   DDP's ``broadcast_buffers`` does, and so are tensor ``example_inputs``; the optimizer's
   per-parameter state is gathered alike into a *shadow* optimizer over the replica;
3. **rewrite locally**: ``rewrite(replica, mask, example_inputs=..., optimizer=shadow,
   policy=...)`` (``prunefx.reconfigure`` by default; PruneTrain passes its ``shrink``). Every
   rank rewrites the same tensors the same way;
4. **agree**: the ranks exchange success or failure and the new parameter shapes; if any rank
   failed or the shapes differ, every rank raises and nothing is changed anywhere;
5. **re-shard**: ``fully_shard`` is applied to the result bottom-up, one call per FSDP unit of
   the old model, with that unit's mesh, ``reshard_after_forward``, ``mp_policy`` and
   ``offload_policy``. A rewritten ``GraphModule`` calls the layers of a block directly, not
   the block, so a unit whose module the new model no longer calls becomes
   ``fully_shard([its called layers])``: one communication group, as before;
6. **follow**: the optimizer's ``param_groups`` are re-pointed to the new ``DTensor``
   parameters and every state tensor of the parameter's shape (momentum, Adam moments), now
   sliced in full, is cut into this rank's chunk with the parameter's own placements
   (``distribute_tensor(..., src_data_rank=None)``: each rank keeps its chunk of a tensor all
   ranks hold), so the state is the state of the gathered rewrite, exactly.

The old model is not modified (drop it); the optimizer is changed only at the end, when every
rank succeeded. Supported: a 1-D mesh with the default ``Shard(0)`` placement, any
``MixedPrecisionPolicy`` and ``OffloadPolicy`` (carried over unit by unit), ``fully_shard`` on
single modules or lists of modules. Refused with a one-line ``DistributedError``: HSDP and
other multi-dimensional meshes (``dp_mesh_dims`` included), ``replicate``/DDP-style mesh infos, ``shard_placement_fn``
placements other than ``Shard(0)`` or per-parameter meshes, parameters FSDP does not manage
(``ignored_params``), and a model caught between forward and backward (unsharded parameters).

Example, under ``torchrun`` (a fragment: docs/integrations.md and examples/fsdp_prunetrain.py
have complete ones)::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ...  # train
    graph = prunefx.trace(prunefx.fsdp.gather(model), x)      # collective: every rank gathers
    mask = prunefx.masks.magnitude(graph, 0.3)
    model = prunefx.fsdp.reconfigure_fsdp(model, mask, example_inputs=x, optimizer=opt)
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from prunefx.errors import DistributedError
from prunefx.reconfigure import reconfigure

__all__ = ["reconfigure_fsdp", "gather", "is_fsdp", "fsdp_units", "fsdp_process_group", "FsdpUnit"]

_COMPOSABLE_KEY = "__composable_api_state_key"  # torch.distributed._composable.contract's state/registry keys
_FSDP_ATTRIBUTES = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


def is_fsdp(model: Any) -> bool:
    """Whether ``model`` is the root of an FSDP2 (``fully_shard``) model."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a PyTorch without distributed
        return False
    return isinstance(model, FSDPModule)


@dataclass(frozen=True)
class FsdpUnit:
    """One ``fully_shard`` call of a model: the qualified names of its module(s) (``""`` is the
    root) and the arguments that rebuild it."""

    names: tuple[str, ...]
    mesh: Any
    reshard_after_forward: bool | int | None
    mp_policy: Any
    offload_policy: Any

    @property
    def depth(self) -> int:
        return min(0 if n == "" else n.count(".") + 1 for n in self.names)


def reconfigure_fsdp(
    model: nn.Module,
    mask: Mapping[str, Any] | None,
    *,
    example_inputs: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    policy: str = "union",
    src: int | None = 0,
    rewrite: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """Reconfigure the FSDP2 model ``model`` with the same mask on every rank and return the
    smaller model, sharded again with the old units' settings (see the module docstring).

    Collective: every rank of the model's mesh calls it. ``mask`` is read on rank ``src``
    only; with ``src=None`` every rank passes its mask and they must be equal (``None`` on
    every rank lets ``rewrite`` decide from the gathered weights, as ``prunefx.train.shrink``
    does from zeros). ``optimizer`` (holding the model's ``DTensor`` parameters) is re-pointed
    and its state sliced and re-sharded in place. ``rewrite`` replaces ``prunefx.reconfigure``,
    same signature; when it returns the replica itself (nothing to remove), ``model`` is
    returned as it is.
    """
    _require_fsdp(model)
    units = fsdp_units(model)
    group = fsdp_process_group(model)
    _refuse_unsharded(model)
    mask, policy = _decide(mask, policy, src, group)
    root = 0 if src is None else src
    example_inputs = _broadcast_inputs(example_inputs, root, group)

    replica, full_of = _gather(model, root, group)
    shadow = _shadow_optimizer(optimizer, model, replica, full_of) if optimizer is not None else None
    error: BaseException | None = None
    small: nn.Module | None = None
    try:
        small = (rewrite or reconfigure)(replica, mask, example_inputs=example_inputs, optimizer=shadow, policy=policy)
    except Exception as e:  # every rank has to hear about it before anyone raises
        error = e
    unchanged = small is replica
    _agree(error, None if small is None or unchanged else _shapes(small), unchanged, group)
    if unchanged:
        return model
    assert small is not None
    new_params = _reshard(small, units)
    if optimizer is not None:
        assert shadow is not None
        _follow(optimizer, shadow, model, new_params)
    return small


def gather(model: nn.Module, *, src: int = 0) -> nn.Module:
    """A plain, unsharded copy of the FSDP2 model ``model`` on every rank: the original module
    classes without FSDP's hooks, every parameter all-gathered, buffers from rank ``src``.
    Collective. Use it to trace the model or compute a mask (``prunefx.trace(gather(model), x)``)."""
    _require_fsdp(model)
    fsdp_units(model)  # refuses the setups the rest cannot handle
    _refuse_unsharded(model)
    return _gather(model, src, fsdp_process_group(model))[0]


def fsdp_process_group(model: nn.Module) -> Any:
    """The process group FSDP2 shards ``model``'s parameters over."""
    mesh = _root_unit(model).mesh
    return mesh.get_group(0)


# --- what the old model is made of -----------------------------------------------------------


def fsdp_units(model: nn.Module) -> list[FsdpUnit]:
    """Every ``fully_shard`` call of ``model``, with its settings; refuses setups this module
    cannot rebuild (one line each, naming the module)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, HSDPMeshInfo
    from torch.distributed.tensor import Shard

    names = {id(m): n for n, m in model.named_modules()}
    units: list[FsdpUnit] = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        if id(state) in seen:
            continue
        seen.add(id(state))
        where = f"'{name}'" if name else "the root module"
        groups = state._fsdp_param_groups
        if len(groups) > 1:
            raise DistributedError(f"reconfigure_fsdp: fully_shard on {where} spreads its parameters over {len(groups)} meshes "
                                   "(shard_placement_fn with per-parameter meshes): not supported; shard it over one mesh")
        pg = groups[0] if groups else None
        info = pg.mesh_info if pg is not None else None
        if isinstance(info, HSDPMeshInfo) or (info is not None and info.mesh.ndim != 1):
            raise DistributedError(f"reconfigure_fsdp: fully_shard on {where} uses a {info.mesh.ndim}-D mesh (HSDP: replicate x shard): "
                                   "only a 1-D mesh is supported; shard over one mesh dimension")
        if info is not None and getattr(info, "dp_mesh_dims", None) is not None:
            raise DistributedError(f"reconfigure_fsdp: fully_shard on {where} shards over dims of a larger SPMD mesh (dp_mesh_dims, "
                                   "e.g. with tensor parallelism): not supported; only a 1-D data-parallel mesh is")
        if isinstance(info, DDPMeshInfo):
            raise DistributedError(f"reconfigure_fsdp: {where} is replicated (a DDP-style mesh), not sharded: use "
                                   "prunefx.distributed.reconfigure_ddp for replicated models")
        for p in pg.fsdp_params if pg is not None else ():
            if p.fsdp_placement != Shard(0):
                owner = names.get(id(p._module_info.module), "")
                param = f"{owner}.{p._module_info.param_name}" if owner else p._module_info.param_name
                raise DistributedError(f"reconfigure_fsdp: parameter '{param}' is sharded as Shard(dim={p.fsdp_placement.dim}) "
                                       "(shard_placement_fn), not Shard(0): not supported; shard it on dim 0")
        if pg is None or info is None:
            mesh, rsf = None, None
        else:
            mesh = info.mesh
            rsf = None if state._auto_reshard_after_forward else _reshard_after_forward(pg)
        units.append(FsdpUnit(
            names=tuple(names[id(x)] for x in state._modules),
            mesh=mesh,
            reshard_after_forward=rsf,
            mp_policy=state._mp_policy,
            offload_policy=pg.offload_policy if pg is not None else None,
        ))
    if not any(u.names == ("",) for u in units):
        raise DistributedError("reconfigure_fsdp: the root module is not fully_shard-ed: call fully_shard(model) on the root "
                               "after its blocks, as FSDP2 expects")
    mesh = _root_unit_of(units).mesh
    if mesh is None:
        mesh = next((u.mesh for u in units if u.mesh is not None), None)
    if mesh is None:
        raise DistributedError("reconfigure_fsdp: the model has no sharded parameter")
    if _all_units_sharded(model):  # otherwise _refuse_unsharded says what to do
        unmanaged = next((n for n, p in model.named_parameters() if not _is_dtensor(p)), None)
        if unmanaged is not None:
            raise DistributedError(f"reconfigure_fsdp: parameter '{unmanaged}' is not sharded by FSDP (ignored_params): "
                                   "not supported; let fully_shard manage every parameter")
    return [u if u.mesh is not None else FsdpUnit(u.names, mesh, u.reshard_after_forward, u.mp_policy, u.offload_policy) for u in units]


def _root_unit_of(units: list[FsdpUnit]) -> FsdpUnit:
    return next(u for u in units if u.names == ("",))


def _root_unit(model: nn.Module) -> FsdpUnit:
    _require_fsdp(model)
    units = fsdp_units(model)
    root = _root_unit_of(units)
    return root if root.mesh is not None else next(u for u in units if u.mesh is not None)


def _reshard_after_forward(pg: Any) -> bool | int:
    post = pg.post_forward_mesh_info
    if post is None:
        return False
    if post is pg.mesh_info or post.shard_mesh_size == pg.mesh_info.shard_mesh_size:
        return True
    return int(post.shard_mesh_size)


def _all_units_sharded(model: nn.Module) -> bool:
    """Every FSDP parameter group is in its sharded state (registered parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            for pg in m._get_fsdp_state()._fsdp_param_groups:
                if pg._sharded_state.name != "SHARDED":
                    return False
    return True


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _require_fsdp(model: Any) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError("reconfigure_fsdp needs torch.distributed initialised: call torch.distributed.init_process_group(...) "
                               "on every rank first (torchrun sets up the environment)")
    if not is_fsdp(model):
        raise DistributedError(f"reconfigure_fsdp expects the root of a torch.distributed.fsdp.fully_shard model, got "
                               f"{type(model).__name__}: call fully_shard(model) first, or use prunefx.reconfigure for a plain module")


def _refuse_unsharded(model: nn.Module) -> None:
    if not _all_units_sharded(model):
        raise DistributedError("reconfigure_fsdp: the model's parameters are unsharded (between forward and backward, or "
                               "reshard_after_forward=False after a forward): reconfigure after optimizer.step(), or call model.reshard() first")


# --- decide ------------------------------------------------------------------------------------


def _decide(mask: Any, policy: str, src: int | None, group: Any) -> tuple[Any, str]:
    from prunefx.distributed import _broadcast_decision, _portable

    if src is not None:
        return _broadcast_decision(mask, policy, src, group)
    try:
        local = None if mask is None else _portable(mask)
        digest = _digest((local, policy))
    except Exception as e:
        local, digest = None, f"error: {type(e).__name__}: {e}"
    digests: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    ranks = dist.get_process_group_ranks(group)
    bad = next((i for i, d in enumerate(digests) if d.startswith("error")), None)
    if bad is not None:
        raise DistributedError(f"reconfigure_fsdp: the mask given on rank {ranks[bad]} cannot be used: {digests[bad][7:]}")
    differ = [ranks[i] for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(f"reconfigure_fsdp: src=None but the masks (or policies) differ across ranks: rank {differ[0]} "
                               f"disagrees with rank {ranks[0]}; pass src=0 to use rank 0's mask on every rank")
    return local, policy


def _digest(obj: Any) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().reshape(-1).contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (tuple, list)):
        h.update(b"(")
        for x in obj:
            _feed(h, x)
        h.update(b")")
    else:
        h.update(repr(obj).encode())


def _broadcast_inputs(x: Any, src: int, group: Any) -> Any:
    """Rank ``src``'s example inputs on every rank: constant folds are measured on them, and
    the ranks must fold the same constants."""
    payload = [_to_cpu(x)]
    dist.broadcast_object_list(payload, src=src, group=group)
    return _onto(payload[0], x)


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _onto(received: Any, local: Any) -> Any:
    """``received`` with each tensor on the device of this rank's tensor in its place."""
    if isinstance(received, torch.Tensor) and isinstance(local, torch.Tensor):
        return received.to(local.device)
    if isinstance(received, (tuple, list)) and isinstance(local, (tuple, list)) and len(received) == len(local):
        return type(received)(_onto(r, v) for r, v in zip(received, local, strict=True))
    return received


# --- gather -----------------------------------------------------------------------------------


def _gather(model: nn.Module, src: int, group: Any) -> tuple[nn.Module, dict[int, nn.Parameter]]:
    """(plain replica of ``model``, id of each old DTensor parameter -> its full replica)."""
    full_of: dict[int, nn.Parameter] = {}
    p: Any
    for p in model.parameters():
        if id(p) not in full_of:
            full = p.full_tensor().detach() if _is_dtensor(p) else p.detach().clone()  # full_tensor() is a new tensor already
            full_of[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad)
    replica = _replica(model, full_of, {})
    for b in replica.buffers():
        dist.broadcast(b.data, src=src, group=group)  # FSDP leaves buffers per rank (BatchNorm statistics)
    return replica, full_of


def _replica(m: nn.Module, full_of: Mapping[int, nn.Parameter], memo: dict[int, Any]) -> nn.Module:
    """``m`` as its original class, FSDP's state and hooks left out, parameters replaced by
    their full copies, buffers copied; every other attribute deep-copied."""
    if id(m) in memo:
        return memo[id(m)]
    cls = _original_class(type(m))
    new: nn.Module = object.__new__(cls)  # not cls.__new__: GraphModule's makes a new class, without the generated forward
    memo[id(m)] = new
    attrs: dict[str, Any] = {}
    for k, v in m.__dict__.items():
        if k.startswith(_COMPOSABLE_KEY) or k in _FSDP_ATTRIBUTES:
            continue
        if k == "_parameters":
            attrs[k] = {n: None if p is None else full_of[id(p)] for n, p in v.items()}
        elif k == "_buffers":
            attrs[k] = {n: None if b is None else b.detach().clone() for n, b in v.items()}
        elif k == "_modules":
            attrs[k] = {n: None if c is None else _replica(c, full_of, memo) for n, c in v.items()}
        elif isinstance(v, OrderedDict) and k.endswith("hooks"):
            attrs[k] = OrderedDict((i, copy.deepcopy(h, memo)) for i, h in v.items() if not _is_fsdp_hook(h))
        else:
            attrs[k] = copy.deepcopy(v, memo)
    new.__dict__.update(attrs)
    return new


def _original_class(cls: type) -> type:
    from torch.distributed.fsdp import FSDPModule

    if issubclass(cls, FSDPModule) and FSDPModule in cls.__bases__:
        return next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def _is_fsdp_hook(hook: Any) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial
    owner = getattr(fn, "__self__", None)
    fn = getattr(fn, "__func__", fn)
    module = getattr(fn, "__module__", "") or ""
    return module.startswith("torch.distributed.fsdp") or type(owner).__module__.startswith("torch.distributed.fsdp")


def _shadow_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, replica: nn.Module,
                      full_of: Mapping[int, nn.Parameter]) -> torch.optim.Optimizer:
    """An optimizer object of the same class over the replica's parameters, with the full
    (gathered) state; parameters that are not the model's are carried as they are. It is never
    stepped: the rewrite re-points and slices it, and ``_follow`` reads it back."""
    ours = {id(p) for p in model.parameters()}
    shadow = type(optimizer).__new__(type(optimizer))
    shadow.__dict__.update({k: v for k, v in optimizer.__dict__.items() if k not in ("param_groups", "state")})
    shadow.param_groups = [{**g, "params": [full_of[id(p)] if id(p) in ours else p for p in g["params"]]} for g in optimizer.param_groups]
    state: dict[Any, Any] = defaultdict(dict)
    for p, st in optimizer.state.items():
        if id(p) in ours:
            state[full_of[id(p)]] = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in st.items()}
        else:
            state[p] = st
    shadow.state = state  # type: ignore[assignment]  # a defaultdict(dict), as torch.optim keeps it
    return shadow


# --- agree ------------------------------------------------------------------------------------


def _shapes(small: nn.Module) -> str:
    return _digest([(n, tuple(p.shape)) for n, p in small.named_parameters()])


def _agree(error: BaseException | None, shapes: str | None, unchanged: bool, group: Any) -> None:
    outcome = ("error", f"{type(error).__name__}: {error}") if error is not None else ("same", "") if unchanged else ("new", shapes)
    outcomes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, outcome, group=group)
    ranks = dist.get_process_group_ranks(group)
    failed = [(ranks[i], msg) for i, (kind, msg) in enumerate(outcomes) if kind == "error"]
    if failed:
        if error is not None:
            raise error
        rank, msg = failed[0]
        raise DistributedError(f"reconfigure_fsdp: the rewrite failed on rank {rank} ({msg}); nothing was changed on any rank")
    if len({o for o in outcomes}) > 1:
        odd = next(ranks[i] for i, o in enumerate(outcomes) if o != outcomes[0])
        raise DistributedError(f"reconfigure_fsdp: rank {odd} rewrote the model to other shapes than rank {ranks[0]} (different "
                               "masks or weights on the ranks); nothing was changed on any rank")


# --- re-shard and follow ----------------------------------------------------------------------


def _reshard(small: nn.Module, units: list[FsdpUnit]) -> dict[int, tuple[str, nn.Parameter]]:
    """Shard ``small`` unit by unit, deepest first; returns, for each plain parameter of
    ``small`` before sharding, (its name, the DTensor parameter that replaced it)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    plain = {id(p): n for n, p in small.named_parameters()}
    called = _called_modules(small)
    for unit in sorted(units, key=lambda u: -u.depth):
        targets = _targets(small, unit.names, called)
        targets = [t for t in targets if t is small or not isinstance(t, FSDPModule)]
        if not targets:
            continue
        kwargs: dict[str, Any] = {"mesh": unit.mesh, "reshard_after_forward": unit.reshard_after_forward, "mp_policy": unit.mp_policy}
        if unit.offload_policy is not None:
            kwargs["offload_policy"] = unit.offload_policy
        fully_shard(targets[0] if len(targets) == 1 else targets, **kwargs)
    now = dict(small.named_parameters())
    return {pid: (name, now[name]) for pid, name in plain.items()}


def _called_modules(small: nn.Module) -> set[str] | None:
    """The submodules a GraphModule's code calls (None: not a GraphModule, every module is
    called as in the original)."""
    if not isinstance(small, torch.fx.GraphModule):
        return None
    return {str(n.target) for n in small.graph.nodes if n.op == "call_module"}


def _targets(small: nn.Module, names: tuple[str, ...], called: set[str] | None) -> list[nn.Module]:
    out: list[nn.Module] = []
    for name in names:
        if name == "":
            return [small]
        try:
            m = small.get_submodule(name)
        except AttributeError:
            m = None
        if m is not None and (called is None or name in called):
            out.append(m)
        elif called is not None:
            inner = sorted(t for t in called if t.startswith(name + "."))
            inner = [t for t in inner if not any(t.startswith(o + ".") for o in inner)]
            out += [small.get_submodule(t) for t in inner if any(True for _ in small.get_submodule(t).parameters())]
    unique: dict[int, nn.Module] = {}
    for m in out:
        unique.setdefault(id(m), m)
    return list(unique.values())


def _follow(optimizer: torch.optim.Optimizer, shadow: torch.optim.Optimizer, model: nn.Module,
            new_params: Mapping[int, tuple[str, nn.Parameter]]) -> None:
    """``optimizer`` takes the shadow's param groups and state, with every parameter of the
    new model replaced by its DTensor and every state tensor of its shape cut into this rank's
    chunk. Computed first, then assigned."""
    from torch.distributed.tensor import distribute_tensor

    def sharded(p: Any) -> Any:
        return new_params[id(p)][1] if id(p) in new_params else p

    groups = [[sharded(p) for p in g["params"]] for g in shadow.param_groups]
    state: dict[Any, Any] = defaultdict(dict)
    for p, st in shadow.state.items():
        if id(p) not in new_params:
            state[p] = st
            continue
        name, q = new_params[id(p)]
        q = cast(Any, q)  # a DTensor
        out = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and not _is_dtensor(v):
                if tuple(v.shape) != tuple(q.shape):
                    raise DistributedError(f"reconfigure_fsdp: {type(optimizer).__name__} state '{k}' of '{name}' has shape "
                                           f"{list(v.shape)}, not the parameter's {list(q.shape)}: it cannot be sharded like it")
                v = distribute_tensor(v.to(q.to_local().device), q.device_mesh, q.placements, src_data_rank=None)
            out[k] = v
        state[q] = out
    for g, params in zip(optimizer.param_groups, groups, strict=True):
        g["params"] = params
    optimizer.state = state  # type: ignore[assignment]  # a defaultdict(dict), as torch.optim keeps it
