"""Autograd collectives over an explicit `Group`, each recording what it sends in a ledger.

Every function states its contract as "forward; backward". Collectives over a group of size 1
are identities and issue nothing (and record nothing): a one-process run takes the same code path.

Bytes are counted as the size of the buffer this rank hands to the collective (its send buffer):
for an all-to-all the whole input, for an all-gather its own shard, for a reduce-scatter or
all-reduce the whole input. That makes "DTD sends 1/TP of the bytes" an exact statement.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from typing import Optional

import torch
import torch.distributed as dist

from megatron.parallel.topology import Group


class CommLedger:
    """What this rank's collectives sent: calls and bytes per (kind, group), kinds being
    all_to_all | all_gather | reduce_scatter | all_reduce and groups tp | dp | ep | edp | world.
    Totals only, so it stays the same size however long a run is. Reset, run, read."""

    def __init__(self):
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def record(self, kind: str, group: Group, tensor: torch.Tensor) -> None:
        self.calls[(kind, group.name)] += 1
        self.bytes[(kind, group.name)] += tensor.numel() * tensor.element_size()

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def count(self, kind: str | None = None, group: str | None = None) -> int:
        return sum(n for key, n in self.calls.items() if _matches(key, kind, group))

    def nbytes(self, kind: str | None = None, group: str | None = None) -> int:
        return sum(n for key, n in self.bytes.items() if _matches(key, kind, group))

    def summary(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(kind, group) -> (calls, bytes)."""
        return {key: (self.calls[key], self.bytes[key]) for key in self.calls}


def _matches(key: tuple[str, str], kind, group) -> bool:
    return (kind is None or key[0] == kind) and (group is None or key[1] == group)


# torch 2.13 renamed the tensor-form collectives; keep working on older torch too.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _record(kind: str, group: Group, tensor: torch.Tensor) -> None:
    if group.ledger is not None:
        group.ledger.record(kind, group, tensor)


# ---- the forward-output stash behind communication-aware checkpointing (ted_patches/cac.py) -----
class CommStash:
    """Outputs of the collectives run inside one checkpointed region, in call order. While
    recording, collectives run and their outputs are kept; while replaying (the recompute),
    collectives return the kept outputs in the same order and send nothing."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.position: Optional[int] = None  # None: recording

    @contextlib.contextmanager
    def active(self, replay: bool):
        self.position = 0 if replay else None
        token = _ACTIVE_STASH.set(self)
        try:
            yield
        finally:
            _ACTIVE_STASH.reset(token)


_ACTIVE_STASH: contextvars.ContextVar[Optional[CommStash]] = contextvars.ContextVar("ted_comm_stash", default=None)


def _communicate(kind: str, group: Group, x: torch.Tensor, run) -> torch.Tensor:
    """Record and run one collective, or serve it from the active stash during a recompute."""
    stash = _ACTIVE_STASH.get()
    if stash is not None and stash.position is not None:
        out = stash.outputs[stash.position]
        stash.position += 1
        return out
    _record(kind, group, x)
    out = run()
    if stash is not None:
        stash.outputs.append(out)
    return out


# ---- plain (non-autograd) collectives ---------------------------------------------------------
def raw_all_to_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Equal-split all-to-all over dim 0."""
    if group.size == 1:
        return x
    x = x.contiguous()

    def run():
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group.pg)
        return out

    return _communicate("all_to_all", group, x, run)


def raw_all_gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along a new leading dim: [n, *x.shape]."""
    if group.size == 1:
        return x.unsqueeze(0)
    x = x.contiguous()

    def run():
        out = x.new_empty(group.size * x.numel())
        _all_gather_single(out, x.view(-1), group=group.pg)
        return out.view(group.size, *x.shape)

    return _communicate("all_gather", group, x, run)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather `x` from every rank into the flat `out` (rank-major), no extra buffer."""
    if group.size == 1:
        return out.copy_(x.view_as(out))
    _record("all_gather", group, x)
    _all_gather_single(out.view(-1), x.contiguous().view(-1), group=group.pg)
    return out


def raw_reduce_scatter(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum [n, ...] over ranks and keep this rank's entry of the leading dim."""
    if group.size == 1:
        return x[0]
    x = x.contiguous()

    def run():
        out = x.new_empty(x[0].numel())
        _reduce_scatter_single(out, x.view(-1), group=group.pg)
        return out.view(x.shape[1:])

    return _communicate("reduce_scatter", group, x, run)


def all_reduce_(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce."""
    if group.size > 1:

        def run():
            dist.all_reduce(x, op=op, group=group.pg)
            return x

        out = _communicate("all_reduce", group, x, run)
        if out is not x:
            x.copy_(out)
    return x


# ---- autograd collectives ---------------------------------------------------------------------
def _collective(name: str, contract: str, forward, backward):
    """A differentiable collective: `forward(x, group)`, whose backward is `backward(grad, group)`.
    Over a group of size 1 it is `forward` alone (an identity), with no autograd node."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})

    def apply(x: torch.Tensor, group: Group) -> torch.Tensor:
        return forward(x, group) if group.size == 1 else fn.apply(x, group)

    apply.__name__, apply.__doc__ = name, contract
    return apply


def _mine(x, group):
    return x[group.rank]


def _identity(x, group):
    return x


def _all_reduce_copy(x, group):
    return x if group.size == 1 else all_reduce_(x.contiguous().clone(), group)


all_to_all = _collective("all_to_all", "all-to-all over dim 0; backward: all-to-all.", raw_all_to_all, raw_all_to_all)
drop = _collective("drop", "[n, ...] replicated -> keep my entry of dim 0; backward: all-gather.",
                   _mine, raw_all_gather)
gather_to_replicated = _collective(
    "gather_to_replicated", "all-gather into a new dim 0; backward: keep my entry (the consumer is "
    "replicated, so every rank holds the same full gradient).", raw_all_gather, _mine)
gather_to_split = _collective(
    "gather_to_split", "all-gather into a new dim 0; backward: reduce-scatter (the consumer is split over "
    "the group, so each rank's gradient is a partial sum).", raw_all_gather, raw_reduce_scatter)
reduce_scatter = _collective("reduce_scatter", "[n, ...] partial sums -> summed, my entry of dim 0; "
                             "backward: all-gather.", raw_reduce_scatter, raw_all_gather)
copy_to_split = _collective("copy_to_split", "identity into a region split over the group; backward: "
                            "all-reduce of the partial grads.", _identity, _all_reduce_copy)
reduce_from_split = _collective("reduce_from_split", "all-reduce of partial outputs; backward: identity.",
                                _all_reduce_copy, _identity)
