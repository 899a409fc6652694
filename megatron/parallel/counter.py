"""Every collective a process issues, counted at the dispatcher.

`CommLedger` (comm.py) sees the collectives this project issues itself. megatron-core's
ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding call torch.distributed directly,
so their TP all-reduces never reach it. Every eager torch.distributed collective ends in a c10d
operator (`c10d::allreduce_`, `c10d::alltoall_base_`, `c10d::_allgather_base_`, ...) and the
functional collectives in `_c10d_functional` operators; a TorchDispatchMode sees all of them,
whoever calls them, forward and backward alike (checked on torch 2.13 with gloo: all_reduce,
all_to_all_single, all_gather_single / all_gather_into_tensor, reduce_scatter_single, in autograd
backward too, so nothing needs routing through comm.py to be seen). `CollectiveCounter` is that
mode.

Bytes follow the ledger's convention, so the two agree wherever both see a call: the size of the
buffer this rank hands to the collective (its send buffer): the whole input of an all-reduce,
all-to-all or reduce-scatter, this rank's own shard of an all-gather. Collectives a CAC recompute
serves from its stash are not issued, so neither counts them.

    counter = CollectiveCounter(groups)
    with counter:
        train_step(...)
    counter.summary()   # {("all_reduce", "tp"): (calls, bytes), ...}
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.parallel.comm import CommLedger
from megatron.parallel.topology import Group, TEDGroups

# c10d / functional operator name -> the ledger's collective kind.
_KINDS = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "alltoall_base_": "all_to_all", "alltoall_": "all_to_all", "all_to_all_single": "all_to_all",
    "_allgather_base_": "all_gather", "allgather_": "all_gather",
    "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_gather_into_tensor_out": "all_gather",
}
# The other collectives, counted under their own names. Everything else in those namespaces
# (wait_tensor, _wrap_tensor_autograd, ...) waits on or wraps a collective already counted.
_OTHERS = {"broadcast", "reduce", "gather", "scatter", "send", "recv", "recv_any_source", "barrier",
           "monitored_barrier"}
_NAMESPACES = ("c10d", "_c10d_functional")
# Schema argument names that hold the send buffer, in order of preference.
_SEND_ARGS = ("input", "input_tensor", "input_tensors", "inputs", "input_list", "tensors", "tensor")


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveCounter(TorchDispatchMode, CommLedger):
    """Calls and bytes per (kind, group) of every collective issued while active, read as the
    ledger is (count, nbytes, summary, reset). Groups are
    named by the `Group`s given (identified by their process-group object, or by its c10d name
    for the functional collectives); any other group is named by its ranks, e.g. "ranks(0, 2)"."""

    def __init__(self, groups: TEDGroups | Iterable[Group]):
        super().__init__()
        if isinstance(groups, TEDGroups):
            optional = (groups.etp, groups.etp_ep, groups.pp, groups.embedding, groups.cp,
                        groups.dp_cp)
            # the experts' TP group is a process group of its own even where ETP = TP; so is
            # megatron-core's DP x CP group even at CP 1 (the dense gradients' reduction)
            groups = (groups.tp, groups.dp, groups.ep, groups.edp, groups.world) + tuple(
                g for g in optional if g is not None and g.pg is not None
                and g.pg is not groups.tp.pg and g.pg is not groups.dp.pg)
        self._by_pg: dict[int, str] = {}
        self._by_c10d_name: dict[str, str] = {}
        self._pgs = []  # keeps the identities in _by_pg alive
        for g in groups:
            previous = self._by_pg.get(id(g.pg))
            if previous is not None and previous != g.name:
                # the same process group under two names: which one a call meant is unknowable
                raise ValueError(f"groups {previous!r} and {g.name!r} share one process group")
            self._by_pg[id(g.pg)] = g.name
            self._by_c10d_name[g.pg.group_name] = g.name
            self._pgs.append(g.pg)
        CommLedger.__init__(self)

    # -- the mode ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in _NAMESPACES:
            self._count(func, args, kwargs)
        return func(*args, **kwargs)

    def _count(self, func, args, kwargs) -> None:
        op = func._schema.name.split("::")[-1]
        if op not in _KINDS and op.strip("_") not in _OTHERS:
            return
        bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
        bound.update(kwargs)
        send = next((bound[n] for n in _SEND_ARGS if n in bound), None)
        key = (_KINDS.get(op, op.strip("_")), self._group_name(bound))
        self.calls[key] += 1
        self.bytes[key] += 0 if "barrier" in op else _nbytes(send)

    def _group_name(self, bound: Mapping) -> str:
        if "group_name" in bound:  # functional collectives name their group
            name = bound["group_name"]
            return self._by_c10d_name.get(name) or f"c10d:{name}"
        pg = next((v for v in bound.values() if isinstance(v, torch.ScriptObject)
                   and "ProcessGroup" in str(v._type())), None)
        if pg is None:
            return "unknown"
        pg = dist.ProcessGroup.unbox(pg)
        return self._by_pg.get(id(pg)) or f"ranks{tuple(dist.get_process_group_ranks(pg))}"
