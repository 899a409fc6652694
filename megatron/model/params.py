"""The per-parameter parallel plan, and initialization that does not depend on the layout.

Every parameter carries a `ParamSpec`, set where the parameter is created:
    tp_dim     dim split over TP; None = replicated on the TP ranks (identical grads there)
    tp_stride  > 1 when the full tensor is `stride` blocks each split separately (SwiGLU [gate; up])
    expert     dim 0 indexes this rank's experts: global expert id = ep_rank * E_local + i;
               grads average over expert-DP instead of DP
    init, std  how the FULL tensor is drawn
    decay      whether weight decay applies (matrices yes; biases and norms no)
Initialization, gradient reduction, the grad norm and gather-to-full all read this one spec.

Layout independence: each parameter (each expert, for expert parameters) is drawn in full from a
generator seeded by (seed, name[, global expert id]) and sliced for this rank, so every layout
starts from exactly the model one process builds, whatever the construction order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.parallel import comm
from megatron.parallel.topology import TEDGroups


@dataclass(frozen=True)
class ParamSpec:
    init: str  # normal | zeros | ones
    std: float = 0.0
    tp_dim: Optional[int] = None
    tp_stride: int = 1
    expert: bool = False
    decay: Optional[bool] = None

    def __post_init__(self):
        if self.init not in ("normal", "zeros", "ones"):
            raise ValueError(f"unknown init {self.init!r}")
        if self.decay is None:
            object.__setattr__(self, "decay", self.init == "normal")


def set_spec(param: torch.nn.Parameter, **kwargs) -> torch.nn.Parameter:
    param.ted_spec = ParamSpec(**kwargs)
    return param


def spec_of(param: torch.Tensor) -> ParamSpec:
    spec = getattr(param, "ted_spec", None)
    if spec is None:
        raise AttributeError("parameter has no ParamSpec: every parameter must be created with set_spec()")
    return spec


# ---- slicing --------------------------------------------------------------------------------
def shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """This rank's TP slice of a full tensor (each of `stride` blocks split separately)."""
    blocks = full.chunk(stride, dim)
    return torch.cat([b.chunk(size, dim)[rank] for b in blocks], dim)


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard` over all ranks' slices."""
    parts = [s.chunk(stride, dim) for s in shards]
    return torch.cat([torch.cat([p[b] for p in parts], dim) for b in range(stride)], dim)


# ---- initialization -------------------------------------------------------------------------
def _seed(seed: int, name: str, expert: Optional[int]) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}|{expert}".encode())) % (2**63)


def _draw(spec: ParamSpec, shape, seed: int) -> torch.Tensor:
    if spec.init == "zeros":
        return torch.zeros(shape)
    if spec.init == "ones":
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape).normal_(0.0, spec.std, generator=gen)


def _full_shape(local_shape, tp_dim: Optional[int], tp_size: int) -> list[int]:
    shape = list(local_shape)
    if tp_dim is not None:
        shape[tp_dim] *= tp_size
    return shape


@torch.no_grad()
def init_parameters(model: torch.nn.Module, seed: int, groups: TEDGroups) -> None:
    tp_rank, tp_size = groups.tp.rank, groups.tp.size
    for name, p in model.named_parameters():
        spec = spec_of(p)
        if spec.expert:
            tp_dim = None if spec.tp_dim is None else spec.tp_dim - 1
            shape = _full_shape(p.shape[1:], tp_dim, tp_size)
            for i in range(p.shape[0]):
                global_id = groups.ep.rank * p.shape[0] + i
                full = _draw(spec, shape, _seed(seed, name, global_id))
                p[i].copy_(full if tp_dim is None else shard(full, tp_dim, tp_rank, tp_size, spec.tp_stride))
        else:
            full = _draw(spec, _full_shape(p.shape, spec.tp_dim, tp_size), _seed(seed, name, None))
            if spec.tp_dim is not None:
                full = shard(full, spec.tp_dim, tp_rank, tp_size, spec.tp_stride)
            p.copy_(full)


# ---- gather to full (tests, checkpoint conversion) ---------------------------------------------
def gather_full(tensor: torch.Tensor, spec: ParamSpec, groups: TEDGroups) -> torch.Tensor:
    """The full tensor (all TP shards, all experts) of a parameter or of its gradient. Collective
    over TP and EP: every rank of those groups must call it."""
    t = tensor.detach()
    if spec.tp_dim is not None and groups.tp.size > 1:
        t = unshard(list(comm.raw_all_gather(t, groups.tp).unbind(0)), spec.tp_dim, spec.tp_stride)
    if spec.expert and groups.ep.size > 1:
        t = comm.raw_all_gather(t, groups.ep).flatten(0, 1)
    return t
