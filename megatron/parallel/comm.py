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
class CommStashMismatch(RuntimeError):
    """The recompute asked a CAC stash for a collective other than the one recorded at that
    position."""


class CommStash:
    """Outputs of the collectives run inside one checkpointed region, in call order. While
    recording, collectives run and their outputs are kept; while replaying (the recompute),
    collectives return the kept outputs in the same order and send nothing.

    Replay is by position, so each output is kept with what produced it: (kind, group, shape,
    dtype). A recompute that asks for anything else at that position (a different collective, a
    different group, another shape, e.g. from routing that differs from the forward's, or more
    collectives than were recorded) raises CommStashMismatch instead of receiving a wrong tensor."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.keys: list[tuple] = []
        self.position: Optional[int] = None  # None: recording

    @contextlib.contextmanager
    def active(self, replay: bool):
        self.position = 0 if replay else None
        token = _ACTIVE_STASH.set(self)
        try:
            yield
        finally:
            _ACTIVE_STASH.reset(token)

    def record(self, key: tuple, out: torch.Tensor) -> None:
        self.keys.append(key)
        self.outputs.append(out)

    def replay(self, key: tuple) -> torch.Tensor:
        i = self.position
        if i >= len(self.outputs):
            raise CommStashMismatch(
                f"CAC replay: the recompute issues collective #{i} {_describe(key)}, but the "
                f"forward recorded only {len(self.outputs)}: the recomputed region does not repeat "
                "the forward's collectives")
        if self.keys[i] != key:
            raise CommStashMismatch(
                f"CAC replay: collective #{i} of the recompute is {_describe(key)}, the forward "
                f"recorded {_describe(self.keys[i])} there: the recompute diverged from the "
                "forward (different routing or control flow), so the kept output would be the "
                "wrong tensor")
        self.position = i + 1
        return self.outputs[i]


@contextlib.contextmanager
def unstashed():
    """Collectives issued inside run again in a recompute rather than being kept by an active
    CAC stash: the sequence-parallel gathers around the TP linears, whose whole-sequence outputs
    are what sequence parallelism avoids holding."""
    token = _ACTIVE_STASH.set(None)
    try:
        yield
    finally:
        _ACTIVE_STASH.reset(token)


def _describe(key: tuple) -> str:
    kind, group, shape, dtype = key
    return f"{kind} over {group} -> {list(shape)} {str(dtype).replace('torch.', '')}"


_ACTIVE_STASH: contextvars.ContextVar[Optional[CommStash]] = contextvars.ContextVar(
    "ted_comm_stash", default=None)


def _communicate(kind: str, group: Group, x: torch.Tensor, run, out_shape) -> torch.Tensor:
    """Record and run one collective, or serve it from the active stash during a recompute.
    `out_shape`: the shape of the output this call expects (checked against the stash)."""
    stash = _ACTIVE_STASH.get()
    key = (kind, group.name, tuple(out_shape), x.dtype)
    if stash is not None and stash.position is not None:
        return stash.replay(key)
    _record(kind, group, x)
    out = run()
    if stash is not None:
        stash.record(key, out)
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

    return _communicate("all_to_all", group, x, run, x.shape)


def raw_all_to_all_var(x: torch.Tensor, group: Group, send: list[int], recv: list[int],
                       out_rows: Optional[int] = None) -> torch.Tensor:
    """All-to-all over dim 0 with variable split sizes (Python lists, as gloo needs): rows
    send[i] of `x` go to rank i, recv[i] rows come from rank i. The output has `out_rows` rows
    (default sum(recv)); rows past sum(recv) are zero (room for an equal-size TP gather)."""
    rows = sum(recv) if out_rows is None else out_rows
    if group.size == 1:
        if rows == x.shape[0]:
            return x
        return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
    x = x.contiguous()

    def run():
        out = x.new_empty(rows, *x.shape[1:])
        if rows > sum(recv):
            out[sum(recv):].zero_()
        dist.all_to_all_single(out[:sum(recv)], x, output_split_sizes=list(recv),
                               input_split_sizes=list(send), group=group.pg)
        return out

    return _communicate("all_to_all", group, x, run, (rows, *x.shape[1:]))


def raw_all_gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along a new leading dim: [n, *x.shape]."""
    if group.size == 1:
        return x.unsqueeze(0)
    x = x.contiguous()

    def run():
        out = x.new_empty(group.size * x.numel())
        _all_gather_single(out, x.view(-1), group=group.pg)
        return out.view(group.size, *x.shape)

    return _communicate("all_gather", group, x, run, (group.size, *x.shape))


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

    return _communicate("reduce_scatter", group, x, run, x.shape[1:])


def all_reduce_(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce."""
    if group.size > 1:

        def run():
            dist.all_reduce(x, op=op, group=group.pg)
            return x

        out = _communicate("all_reduce", group, x, run, x.shape)
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

    fn = type(name, (torch.autograd.Function,),
              {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})

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


all_to_all = _collective("all_to_all", "all-to-all over dim 0; backward: all-to-all.",
                         raw_all_to_all, raw_all_to_all)
drop = _collective("drop", "[n, ...] replicated -> keep my entry of dim 0; backward: all-gather.",
                   _mine, raw_all_gather)
gather_to_replicated = _collective(
    "gather_to_replicated", "all-gather into a new dim 0; backward: keep my entry (the consumer is "
    "replicated, so every rank holds the same full gradient).", raw_all_gather, _mine)
gather_to_split = _collective(
    "gather_to_split", "all-gather into a new dim 0; backward: reduce-scatter (the consumer is "
    "split over the group, so each rank's gradient is a partial sum).", raw_all_gather,
    raw_reduce_scatter)
reduce_scatter = _collective("reduce_scatter", "[n, ...] partial sums -> summed, my entry of "
                             "dim 0; backward: all-gather.", raw_reduce_scatter, raw_all_gather)
copy_to_split = _collective("copy_to_split", "identity into a region split over the group; "
                            "backward: all-reduce of the partial grads.", _identity,
                            _all_reduce_copy)
reduce_from_split = _collective("reduce_from_split", "all-reduce of partial outputs; backward: "
                                "identity.", _all_reduce_copy, _identity)


# ---- sequence parallelism: activations [b, s, ...] split over TP by sequence position ---------
def gather_sequence(x: torch.Tensor, group: Group, replicated: bool = False) -> torch.Tensor:
    """[b, s/n, ...] -> [b, s, ...]: every rank's part of the sequence, in rank order. Backward:
    reduce-scatter (the consumer is split over the group, as TP linears are: each rank's gradient
    is partial), or, with `replicated`, this rank's part (the consumer computes the same on every
    rank, so every rank holds the same full gradient)."""
    if group.size == 1:
        return x
    parts = (gather_to_replicated if replicated else gather_to_split)(x.contiguous(), group)
    return parts.transpose(0, 1).reshape(x.shape[0], -1, *x.shape[2:])


def reduce_scatter_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, s, ...] partial sums -> summed, this rank's part [b, s/n, ...]; backward: all-gather."""
    if group.size == 1:
        return x
    return reduce_scatter(_by_rank(x, group.size).contiguous(), group)


def scatter_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, s, ...] replicated -> this rank's part [b, s/n, ...]; backward: all-gather."""
    if group.size == 1:
        return x
    return drop(_by_rank(x, group.size), group).contiguous()


def _by_rank(x: torch.Tensor, n: int) -> torch.Tensor:
    """[b, s, ...] -> [n, b, s/n, ...] (a view)."""
    b, s = x.shape[:2]
    if s % n:
        raise ValueError(f"sequence length {s} is not divisible by the {n} ranks splitting it")
    return x.reshape(b, n, s // n, *x.shape[2:]).transpose(0, 1)


class _AllToAllVar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, send, recv, out_rows):
        ctx.group, ctx.send, ctx.recv, ctx.in_rows = group, send, recv, x.shape[0]
        return raw_all_to_all_var(x, group, send, recv, out_rows)

    @staticmethod
    def backward(ctx, grad):
        back = raw_all_to_all_var(grad[:sum(ctx.recv)], ctx.group, ctx.recv, ctx.send, ctx.in_rows)
        return back, None, None, None, None


def all_to_all_var(x: torch.Tensor, group: Group, send: list[int], recv: list[int],
                   out_rows: Optional[int] = None) -> torch.Tensor:
    """Variable-split all-to-all over dim 0 (see raw_all_to_all_var); backward: the reverse
    all-to-all (gradients of the zero rows past sum(recv) are dropped)."""
    if group.size == 1 and (out_rows is None or out_rows == x.shape[0]):
        return x
    return _AllToAllVar.apply(x, group, list(send), list(recv), out_rows)


# ---- host synchronization and replica checks ----------------------------------------------------
def host_ints(t: torch.Tensor) -> list:
    """`t` as (nested) Python ints: ONE device-to-host copy, the only host synchronization of
    the padding-free dispatch. Always an explicit copy to the CPU (a dispatched `_to_copy`,
    also on CPU tensors), so a dispatch mode sees and counts it."""
    return t.to("cpu", copy=True).tolist()


class ReplicaMismatch(RuntimeError):
    """Ranks that must hold identical values (e.g. the TP ranks' routing) do not."""


def check_same(value: torch.Tensor, group: Group, what: str) -> None:
    """Raise ReplicaMismatch on every rank of `group` unless all hold the same int64 `value`
    (a checksum). One all-reduce MAX of [v, -v] and a host read: not a CAC-replayed collective
    (it runs in the recompute too, on every rank alike) and not in the ledger."""
    if group.size == 1:
        return
    v = value.reshape(-1).to(torch.int64)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group.pg)
    hi, neg_lo = both.to("cpu", copy=True).view(2, -1).tolist()
    if hi != [-n for n in neg_lo]:
        mine = v.to("cpu", copy=True).tolist()
        raise ReplicaMismatch(
            f"{what} differs across the {group.name.upper()} group {list(group.ranks)} "
            f"(rank {group.rank} of it has checksum {mine}, the group's max {hi}, "
            f"min {[-n for n in neg_lo]})")


# ---- asynchronous collectives (gradient and parameter buckets overlapped with compute) ----------
def all_reduce_async(x: torch.Tensor, group: Group):
    """Start an in-place sum over the group; returns the work to wait on (None: nothing to do)."""
    if group.size == 1:
        return None
    _record("all_reduce", group, x)
    return dist.all_reduce(x, group=group.pg, async_op=True)


def reduce_scatter_async(out: torch.Tensor, x: torch.Tensor, group: Group):
    """Start the sum of the flat `x` over the group into this rank's 1/n part `out` (a separate
    buffer)."""
    _record("reduce_scatter", group, x)
    return _reduce_scatter_single(out, x, group=group.pg, async_op=True)


def all_gather_async(out: torch.Tensor, x: torch.Tensor, group: Group):
    """Start gathering every rank's flat `x` into the flat `out` (rank-major)."""
    _record("all_gather", group, x)
    return _all_gather_single(out, x, group=group.pg, async_op=True)
