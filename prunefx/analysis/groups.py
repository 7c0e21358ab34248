"""Channel groups: the union-find classes that share the same set of members.

After the analysis every channel slot is a union-find class (its root id). Two slots belong
to the same group when exactly the same parameter dims hold them and they are equally pinned
/ exact: a conv's output channels feeding a BN and a consumer form one group; a residual
stream spanning many convs forms one group; a split conv output feeding two consumers forms
two groups. A group is named after its first producing module (graph order); a second group
with the same name gets a ``#k`` suffix.

Signatures are hashed (a random 64-bit key per member, summed per slot), so building groups
is a few vectorised passes over the members rather than per-channel Python work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from prunefx.analysis.propagate import ChannelAnalysis, Member, Note, Role

__all__ = ["ChannelGroup", "GroupMember", "GroupTable", "build_groups"]


@dataclass(frozen=True)
class GroupMember:
    """One parameter/buffer dim spanned by a group. ``index_map[i]`` lists the indices along
    ``dim`` that hold the group's channel i (one index, or several after flatten/repeat)."""

    name: str
    dim: int
    index_map: tuple[tuple[int, ...], ...]
    role: str

    def __iter__(self):  # unpacks as (name, dim, index_map), the API's member triple
        return iter((self.name, self.dim, self.index_map))


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """A set of channels that must be kept or removed together."""

    name: str
    size: int
    prunable: bool
    exact: bool
    reason: str | None
    slots: np.ndarray = field(repr=False)  # union-find root of each channel, in group order
    _members: tuple[tuple[Member, np.ndarray], ...] = field(repr=False, default=())

    @cached_property
    def members(self) -> tuple[GroupMember, ...]:
        order = np.argsort(self.slots, kind="stable")
        ordered = self.slots[order]
        out = []
        for m, roots in self._members:
            at = np.searchsorted(ordered, roots).clip(max=len(ordered) - 1)
            hit = ordered[at] == roots
            channel = order[at[hit]]  # the group channel of each index along the dim that holds one
            index = np.nonzero(hit)[0][np.argsort(channel, kind="stable")].tolist()  # ascending within a channel
            counts = np.bincount(channel, minlength=self.size)
            if len(index) == self.size and (counts == 1).all():
                rows = tuple((i,) for i in index)
            else:
                ends = np.cumsum(counts).tolist()
                rows = tuple(tuple(index[e - c:e]) for e, c in zip(ends, counts.tolist(), strict=True))
            out.append(GroupMember(m.tensor, m.dim, rows, m.role.value))
        return tuple(out)

    def __repr__(self) -> str:
        flags = "prunable" if self.prunable else "pinned"
        if self.prunable and not self.exact:
            flags += ", approximate"
        return f"ChannelGroup({self.name!r}, size={self.size}, {flags}, members={len(self._members)})"


@dataclass(frozen=True, eq=False)
class GroupTable:
    groups: tuple[ChannelGroup, ...]
    by_name: dict[str, ChannelGroup]
    root_group: np.ndarray  # per root id: index into groups, or -1
    pin_reason: np.ndarray  # per root id: index into analysis.pins, or -1
    inexact_reason: np.ndarray  # per root id: index into analysis.inexact, or -1

    def group_of(self, root: int) -> ChannelGroup | None:
        """The group holding union-find root ``root``, or None (a root of no group)."""
        i = int(self.root_group[root]) if 0 <= root < len(self.root_group) else -1
        return self.groups[i] if i >= 0 else None


def _first_note(roots_of: np.ndarray, notes: tuple[Note, ...]) -> np.ndarray:
    first = np.full(len(roots_of), -1, dtype=np.int64)
    for i, note in enumerate(notes):
        roots = roots_of[note.ids]
        fresh = roots[first[roots] == -1]
        first[fresh] = i
    return first


def _owner(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def build_groups(analysis: ChannelAnalysis) -> GroupTable:
    uf = analysis.uf
    roots_of = uf.find(np.arange(uf.size, dtype=np.int64))  # one find; then every lookup is indexing
    pin = _first_note(roots_of, analysis.pins)
    inexact = _first_note(roots_of, analysis.inexact)
    rng = np.random.default_rng(0x5EED)
    keys = rng.integers(1, 2**63 - 1, size=len(analysis.members) + 2, dtype=np.int64).astype(np.uint64)
    sig = np.zeros(uf.size, dtype=np.uint64)
    member_roots = []
    for i, m in enumerate(analysis.members):
        roots = roots_of[m.ids]
        member_roots.append(roots)
        np.add.at(sig, roots, keys[i])
    sig += (pin >= 0).astype(np.uint64) * keys[-1] + (inexact >= 0).astype(np.uint64) * keys[-2]

    order: list[np.uint64] = []  # group signatures in discovery order
    first_member: dict[np.uint64, int] = {}
    group_members: dict[np.uint64, list[int]] = {}
    for i, roots in enumerate(member_roots):
        sigs = sig[roots]
        if len(sigs) and (sigs == sigs[0]).all():  # most members lie in one group
            in_order = sigs[:1]
        else:
            uniq, first_pos = np.unique(sigs, return_index=True)
            in_order = uniq[np.argsort(first_pos)]
        for s in in_order:
            if s not in first_member:
                first_member[s] = i
                order.append(s)
            group_members.setdefault(s, []).append(i)

    groups: list[ChannelGroup] = []
    by_name: dict[str, ChannelGroup] = {}
    root_group = np.full(uf.size, -1, dtype=np.int64)
    for s in order:
        members = group_members[s]
        roots0 = member_roots[first_member[s]]
        in_group = roots0[sig[roots0] == s]
        _, idx = np.unique(in_group, return_index=True)
        slots = in_group[np.sort(idx)]
        writer = next((analysis.members[i] for i in members if analysis.members[i].role is Role.WRITE), analysis.members[members[0]])
        name = _owner(writer.tensor)
        k = 1
        unique = name
        while unique in by_name:
            unique = f"{name}#{k}"
            k += 1
        r0 = int(slots[0])
        reason, prunable, exact = None, True, True
        if pin[r0] >= 0:
            note = analysis.pins[pin[r0]]
            prunable, exact = False, False
            reason = f"pinned: {note.why}" + (f" ({analysis.traced.where(note.node)})" if note.node is not None else "")
        elif inexact[r0] >= 0:
            note = analysis.inexact[inexact[r0]]
            exact = False
            reason = f"approximate: {note.why} ({analysis.traced.where(note.node)})"
        group = ChannelGroup(
            name=unique, size=len(slots), prunable=prunable, exact=exact, reason=reason, slots=slots,
            _members=tuple((analysis.members[i], member_roots[i]) for i in members),
        )
        groups.append(group)
        by_name[unique] = group
        root_group[slots] = len(groups) - 1
    return GroupTable(tuple(groups), by_name, root_group, pin, inexact)
