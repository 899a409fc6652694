"""The per-parameter parallel plan, and initialization that does not depend on the layout.

Every parameter carries a `ParamSpec`, set where the parameter is created:
    tp_dim     dim split over TP; None = replicated on the TP ranks (identical grads there)
    tp_stride  > 1 when the full tensor is `stride` blocks each split separately (SwiGLU [gate; up])
    expert     dim 0 indexes this rank's experts: global expert id = ep_rank * E_local + i;
               grads average over expert-DP instead of DP
    init, std  how the FULL tensor is drawn
    decay      whether weight decay applies (matrices yes; biases and norms no)
    rows       rows of the full tensor's dim 0 that are real (the vocabulary); the rest is padding:
               zero, never drawn, never stored
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
    rows: Optional[int] = None
    # a copy of a parameter another pipeline stage holds (the tied word embedding on the last
    # stage): trained alike, but neither counted in the gradient norm nor written to checkpoints
    pipeline_copy: bool = False
    # replicated over TP but used on this rank's part of the sequence only (sequence parallelism:
    # norms, biases added after a reduce-scatter, the router): its gradient is partial on each
    # TP rank and summed over TP before any other reduction
    sequence_parallel: bool = False

    def __post_init__(self):
        if self.init not in ("normal", "zeros", "ones"):
            raise ValueError(f"unknown init {self.init!r}")
        if self.decay is None:
            object.__setattr__(self, "decay", self.init == "normal")


def set_spec(param: torch.nn.Parameter, **kwargs) -> torch.nn.Parameter:
    param.ted_spec = ParamSpec(**kwargs)
    return param


def set_buffer_spec(module: torch.nn.Module, name: str, **kwargs) -> None:
    """Make `module`'s buffer `name` model state with a parallel plan: checkpoints save, reshard
    and load it as they do parameters (e.g. a router's per-expert selection bias). The spec lives
    on the module: a buffer is replaced, attributes and all, by `.to()`."""
    if name not in module._buffers:
        raise KeyError(f"{type(module).__name__} has no buffer {name!r}: register_buffer it first")
    specs = module.__dict__.setdefault("_ted_buffer_specs", {})
    specs[name] = ParamSpec(**{"init": "zeros", **kwargs})


def state_buffers(model: torch.nn.Module):
    """(name, tensor, spec) of every buffer marked with `set_buffer_spec`, in module order."""
    for prefix, module in model.named_modules():
        for name, spec in module.__dict__.get("_ted_buffer_specs", {}).items():
            yield (f"{prefix}.{name}" if prefix else name), module._buffers[name], spec


def model_state(model: torch.nn.Module):
    """(name, tensor, spec) of the parameters, then the state buffers: what a checkpoint stores."""
    for name, p in model.named_parameters():
        yield name, p, spec_of(p)
    yield from state_buffers(model)


def spec_of(param: torch.Tensor) -> ParamSpec:
    spec = getattr(param, "ted_spec", None)
    if spec is None:
        raise AttributeError("parameter has no ParamSpec: every parameter must be created with "
                             "set_spec()")
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
    if spec.rows is None:
        return torch.empty(shape).normal_(0.0, spec.std, generator=gen)
    # only the real rows are drawn, so every padding gives them the same values
    full = torch.zeros(shape)
    full[:spec.rows].normal_(0.0, spec.std, generator=gen)
    return full


def _full_shape(local_shape, tp_dim: Optional[int], tp_size: int) -> list[int]:
    shape = list(local_shape)
    if tp_dim is not None:
        shape[tp_dim] *= tp_size
    return shape


@torch.no_grad()
def init_parameters(model: torch.nn.Module, seed: int, groups: TEDGroups) -> None:
    for name, p in model.named_parameters():
        spec = spec_of(p)
        tp_rank, tp_size = groups.tp_of(spec.expert).rank, groups.tp_of(spec.expert).size
        if spec.expert:
            tp_dim = None if spec.tp_dim is None else spec.tp_dim - 1
            shape = _full_shape(p.shape[1:], tp_dim, tp_size)
            for i in range(p.shape[0]):
                global_id = groups.ep.rank * p.shape[0] + i
                full = _draw(spec, shape, _seed(seed, name, global_id))
                p[i].copy_(full if tp_dim is None
                           else shard(full, tp_dim, tp_rank, tp_size, spec.tp_stride))
        else:
            full = _draw(spec, _full_shape(p.shape, spec.tp_dim, tp_size), _seed(seed, name, None))
            if spec.tp_dim is not None:
                full = shard(full, spec.tp_dim, tp_rank, tp_size, spec.tp_stride)
            p.copy_(full)


# ---- gather to full (tests, checkpoint conversion) ---------------------------------------------
def gather_full(tensor: torch.Tensor, spec: ParamSpec, groups: TEDGroups) -> torch.Tensor:
    """The full tensor (all TP shards, all experts) of a parameter or of its gradient. Collective
    over TP and EP: every rank of those groups must call it."""
    t, tp = tensor.detach(), groups.tp_of(spec.expert)
    if spec.tp_dim is not None and tp.size > 1:
        t = unshard(list(comm.raw_all_gather(t, tp).unbind(0)), spec.tp_dim, spec.tp_stride)
    if spec.expert and groups.ep.size > 1:
        t = comm.raw_all_gather(t, groups.ep).flatten(0, 1)
    return t


# ---- stored (checkpoint) tensors ----------------------------------------------------------------
# A checkpoint stores every parameter as the full tensor one process would hold, whatever the
# layout: TP shards at their global offsets, each expert under its own key by global expert id
# ("layers.1.mlp.experts.5.w1"), SwiGLU's fused [gate | up] as two tensors (".gate", ".up": a
# fused shard stored whole would interleave wrongly on resharding), the vocabulary without its
# padding rows. `Piece` maps one rectangular part of a local parameter to its stored tensor.
STRIDE_PARTS = {1: ("",), 2: (".gate", ".up")}


@dataclass(frozen=True)
class Piece:
    key: str  # stored tensor name
    global_shape: tuple[int, ...]  # the stored tensor's shape
    start: tuple[int, ...]  # first element of the part, in local coordinates (all local dims)
    size: tuple[int, ...]  # the part's local sizes (an expert piece has size 1 in dim 0)
    offset: tuple[int, ...]  # the part's first element in the stored tensor
    expert: bool  # local dim 0 (the expert) is not a dim of the stored tensor

    def local_view(self, local: torch.Tensor) -> torch.Tensor:
        """The part of `local` (the parameter, or a tensor shaped like it) this piece covers."""
        view = local[tuple(slice(s, s + n) for s, n in zip(self.start, self.size))]
        return view.squeeze(0) if self.expert else view

    def global_index(self) -> tuple[slice, ...]:
        """Where the part lies in the stored tensor."""
        size = self.size[1:] if self.expert else self.size
        return tuple(slice(o, o + n) for o, n in zip(self.offset, size))


def checkpoint_pieces(name: str, local_shape, spec: ParamSpec, groups: TEDGroups) -> list[Piece]:
    """The stored tensors this rank's parameter `name` (of `local_shape`) is made of."""
    if spec.expert:
        module, param = name.rsplit(".", 1)
        n = local_shape[0]
        units = [(f"{module}.{groups.ep.rank * n + i}.{param}", i) for i in range(n)]
        inner, tp_dim = tuple(local_shape[1:]), None if spec.tp_dim is None else spec.tp_dim - 1
    else:
        units, inner, tp_dim = [(name, None)], tuple(local_shape), spec.tp_dim
    pieces, tp = [], groups.tp_of(spec.expert)
    for key, expert in units:
        for part_key, start, size, offset, shape in _tp_parts(key, inner, tp_dim, spec,
                                                              tp.rank, tp.size):
            if expert is not None:
                start, size = (expert, *start), (1, *size)
            pieces.append(Piece(part_key, shape, start, size, offset, expert is not None))
    return pieces


def _tp_parts(key, inner, tp_dim, spec: ParamSpec, tp_rank: int, tp_size: int):
    """(key, local start, local size, global offset, global shape) of each stored part of one
    (expert's) tensor split over TP on `tp_dim`."""
    zeros = (0,) * len(inner)
    if tp_dim is None:
        yield key, zeros, inner, zeros, inner
        return
    block = inner[tp_dim] // spec.tp_stride
    for b, suffix in enumerate(STRIDE_PARTS[spec.tp_stride]):
        start, size, offset, shape = list(zeros), list(inner), list(zeros), list(inner)
        start[tp_dim], size[tp_dim] = b * block, block
        offset[tp_dim], shape[tp_dim] = tp_rank * block, block * tp_size
        if spec.rows is not None:  # the vocabulary: padding rows are not stored
            shape[0] = spec.rows
            size[0] = min(size[0], max(0, spec.rows - offset[0]))
            if size[0] == 0:
                continue
        yield key + suffix, tuple(start), tuple(size), tuple(offset), tuple(shape)


def stored_tensors(model: torch.nn.Module, groups: TEDGroups) -> dict[str, torch.Tensor]:
    """{stored name: tensor} of a one-process model (TP = EP = 1): views, no copies."""
    if groups.tp.size > 1 or groups.ep.size > 1 or groups.etp.size > 1:
        raise ValueError("stored_tensors needs a one-process layout; checkpoints of any layout are "
                         "read with megatron.checkpoint")
    return {piece.key: piece.local_view(t.detach()) for name, t, spec in model_state(model)
            for piece in checkpoint_pieces(name, t.shape, spec, groups)}


@torch.no_grad()
def load_stored_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                        groups: TEDGroups) -> None:
    """Copy this rank's parts of full stored tensors into the model's parameters and state buffers
    (any layout). Raises KeyError / ValueError naming the first missing or mis-shaped tensor."""
    for name, p, spec in model_state(model):
        for piece in checkpoint_pieces(name, p.shape, spec, groups):
            if piece.key not in tensors:
                raise KeyError(f"no tensor {piece.key!r} for {name}")
            full = tensors[piece.key]
            if tuple(full.shape) != piece.global_shape:
                raise ValueError(f"{piece.key}: stored shape {tuple(full.shape)} != model shape "
                                 f"{piece.global_shape}")
            piece.local_view(p).copy_(full[piece.global_index()])
