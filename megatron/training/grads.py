"""Gradient averaging over the data-parallel groups and the global gradient norm.

Where each gradient is averaged (from the parameter's ParamSpec):
    expert parameters      over expert-DP (the ranks holding the same experts and TP shard)
    all other parameters   over DP
never both, never neither. The global norm counts each parameter exactly once over the world:
a rank contributes a parameter's squared norm only if it is the first replica of it
(TP rank 0 for TP-replicated parameters; DP (expert-DP) rank 0 for every parameter).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.model.params import spec_of
from ted_patches import comm
from ted_patches.topology import Group, TEDGroups


def reduce_group(param: torch.Tensor, groups: TEDGroups) -> Group:
    """The group a parameter's gradient is averaged over."""
    return groups.edp if spec_of(param).expert else groups.dp


def _average(grads: list[torch.Tensor], group: Group, bucket_bytes: int) -> None:
    """Average `grads` in place over `group`, coalesced into buckets of about `bucket_bytes`."""
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            comm.all_reduce_(flat, group).div_(group.size)
            for g_, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g_.copy_(synced)
            bucket, size = [], 0


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor], groups: TEDGroups, bucket_bytes: int = 2**26) -> None:
    """All-reduce (mean) every gradient over its data-parallel group. Grouped by dtype so each
    bucket is one flat tensor."""
    by_group: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        group = reduce_group(p, groups)
        if group.size > 1:
            by_group.setdefault((group.name, p.grad.dtype), []).append(p.grad)
    for (name, _), grads in by_group.items():
        _average(grads, getattr(groups, name), bucket_bytes)


def counts_in_norm(param: torch.Tensor, groups: TEDGroups) -> bool:
    """True on exactly one rank per distinct piece of this parameter."""
    spec = spec_of(param)
    if spec.tp_dim is None and groups.tp.rank != 0:
        return False  # TP-replicated: counted on TP rank 0
    return reduce_group(param, groups).rank == 0  # DP / expert-DP replicas: counted once


@torch.no_grad()
def global_grad_norm(params: Iterable[torch.Tensor], groups: TEDGroups) -> float:
    """L2 norm of the whole model's gradient, identical on every rank. Per-tensor norms in fp32
    (no full-size upcast copy), summed in fp64."""
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if counts_in_norm(p, groups):
            total += torch.linalg.vector_norm(p.grad, dtype=torch.float32).double() ** 2
    comm.all_reduce_(total, groups.world)
    return math.sqrt(total.item())


@torch.no_grad()
def clip_gradients(params: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> float:
    """Scale gradients so their global norm is at most `max_norm` (Megatron's rule); returns the
    clip coefficient applied (1.0 when none)."""
    coeff = max_norm / (total_norm + 1e-6)
    if max_norm <= 0 or coeff >= 1.0:
        return 1.0
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coeff)
    return coeff
