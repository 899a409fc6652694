"""Mixed-precision AdamW over flat buffers, with ZeRO-1 sharding and the tiled step.

Parameters are packed into flat buffers ("flat groups"), one per (reduction group, weight decay,
TP-split): the model's parameters become views into `param_buf`, their gradients accumulate
into `grad_buf` (p.main_grad views) through a post-accumulate hook. A step is:

  1. reduce grads over the group (DP x CP, or expert-DP for experts): all-reduce, or reduce-
     scatter into this rank's shard with ZeRO-1, and divide by the DP size. Every gradient is the
     mean over the DP ranks' micro-batches: an expert's gradient already sums the losses of all
     its EP peers (their tokens came to it through the all-to-all), so summing over expert-DP and
     dividing by expert-DP alone would scale it by EP; context-parallel ranks each hold the
     gradient of their own part of the sequences, so their sum is the whole one.
  2. fp16 only: overflow check over the world; skip the step and back off the scale on overflow
  3. global grad norm (each element counted once over the world) and the clip coefficient
  4. for each tile of at most `tile_size` elements of this rank's shard: upcast the grads,
     unscale and clip them, AdamW-update the fp32 master weights, write the tile back
  5. ZeRO-1: all-gather the updated parameters over the group (tile by tile when tiled)

The tile loop is the only loop (untiled = one tile), so tiled and untiled steps do the same
elementwise arithmetic and agree bitwise; the step's temporaries are bounded by the tile.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.model.params import spec_of
from megatron.parallel import comm
from megatron.parallel.topology import Group, TEDGroups


# Whole-buffer scans (grad norm, overflow check) read this many elements at a time: their fp32 /
# bool temporaries stay at 4 MiB whatever the tile setting, and tiled and untiled steps compute
# the same norm bit for bit.
_SCAN_CHUNK = 1 << 20


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False  # ZeRO-1
    tile_size: int = 0  # elements per tile of the step; 0 = untiled
    fp16: bool = False
    loss_scale: Optional[float] = None  # fp16: a static scale; None = dynamic
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    accumulate_grads_in_fp32: bool = False
    # bf16 / fp32: a non-finite gradient norm stops training (fp16 skips the step)
    check_for_nan: bool = True
    # Buckets: each flat group is cut into parameter-aligned buckets of about this many elements
    # (None: one bucket per flat group). The reductions are the same with and without overlap.
    bucket_size: Optional[int] = None
    overlap_grad_reduce: bool = False  # a bucket's reduction starts once its last gradient is in
    # ZeRO-1: a bucket's all-gather is waited for by the next forward
    overlap_param_gather: bool = False


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient in a bf16 / fp32 run: training stops before the update."""


class LossScaler:
    """Dynamic loss scale for fp16, Megatron's DynamicGradScaler rule: each overflow counts down
    the hysteresis and, once it is used up, every further overflow halves the scale (down to the
    minimum); `window` clean steps in a row double it and restore the hysteresis. A static
    scale never changes; bf16 and fp32 use scale 1."""

    def __init__(self, cfg: OptimizerConfig):
        self.dynamic = cfg.fp16 and cfg.loss_scale is None
        self.scale = (cfg.loss_scale or cfg.initial_loss_scale) if cfg.fp16 else 1.0
        self.min_scale, self.window, self.hysteresis = (cfg.min_loss_scale, cfg.loss_scale_window,
                                                        cfg.hysteresis)
        self._clean, self._overflows_left = 0, cfg.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean": self._clean, "overflows_left": self._overflows_left}

    def load_state_dict(self, state: dict) -> None:
        if self.dynamic:  # a static scale is whatever the flags say now
            self.scale, self._clean, self._overflows_left = (state["scale"], state["clean"],
                                                             state["overflows_left"])

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self._clean = 0
            self._overflows_left -= 1
            if self._overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self._clean += 1
            if self._clean == self.window:
                self._clean = 0
                self._overflows_left = self.hysteresis
                self.scale *= 2.0


def adamw_(p, g, m, v, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
           wd: float) -> None:
    """In-place AdamW on fp32 tensors, as torch.optim.AdamW computes it."""
    if wd:
        p.mul_(1.0 - lr * wd)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))


class FlatGroup:
    """Parameters that share a reduction group, weight decay and TP placement, packed flat.

    This rank owns elements [lo, hi) of the buffers (all of them without ZeRO-1) and keeps fp32
    master weights and Adam moments for those only."""

    def __init__(self, params: list, group: Group, *, shard: bool, decay: bool, tp_split: bool,
                 grad_dtype: torch.dtype, dp_size: int, pipeline_copy: bool = False,
                 expert: bool = False, tp_sum: Optional[Group] = None):
        self.params, self.group, self.decay, self.tp_split, self.shard = (params, group, decay,
                                                                          tp_split, shard)
        self.pipeline_copy = pipeline_copy  # copies of another stage's parameters (tied embedding)
        self.dp_size, self.expert = dp_size, expert
        # sequence parallelism: gradients partial per TP rank, summed over TP first
        self.tp_sum = tp_sum if tp_sum is not None and tp_sum.size > 1 else None
        nshards = group.size if shard else 1
        numel = sum(p.numel() for p in params)
        padded = -(-numel // nshards) * nshards
        ref = params[0]
        self.param_buf = torch.zeros(padded, dtype=ref.dtype, device=ref.device)
        self.grad_buf = torch.zeros(padded, dtype=grad_dtype, device=ref.device)
        offset = 0
        for p in params:
            n = p.numel()
            self.param_buf[offset:offset + n].copy_(p.detach().view(-1))
            p.data = self.param_buf[offset:offset + n].view_as(p)
            p.main_grad = self.grad_buf[offset:offset + n].view_as(p)
            offset += n
        per = padded // nshards
        self.lo = (group.rank if shard else 0) * per
        self.hi = self.lo + per
        mine = self.param_buf[self.lo:self.hi]
        # fp32 params without sharding are their own master weights: no copy.
        self.master = mine if mine.dtype == torch.float32 else mine.float()
        self.exp_avg = torch.zeros_like(self.master, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros_like(self.master, dtype=torch.float32)

    @property
    def grads(self) -> torch.Tensor:
        """This rank's (reduced) gradient shard."""
        return self.grad_buf[self.lo:self.hi]

    def reduce_grads(self) -> None:
        """/ DP size, then sum over the group (all-reduce, or reduce-scatter into this rank's
        shard). Dividing first keeps a sum of loss-scaled fp16 gradients from overflowing."""
        self.start_reduce()
        self.finish_reduce()

    def start_reduce(self) -> None:
        """The first half of reduce_grads: the division and the collective, started."""
        n = self.group.size
        if self.tp_sum is not None:
            comm.all_reduce_(self.grad_buf, self.tp_sum)
        if self.dp_size > 1:
            self.grad_buf.div_(self.dp_size)
        self.pending = None
        if n > 1 and self.shard:
            out = torch.empty_like(self.grads)
            self.pending = (comm.reduce_scatter_async(out, self.grad_buf, self.group), out)
        elif n > 1:
            self.pending = (comm.all_reduce_async(self.grad_buf, self.group), None)

    def finish_reduce(self) -> None:
        if self.pending is not None:
            work, out = self.pending
            work.wait()
            if out is not None:
                self.grads.copy_(out)
        self.pending = None

    def counts_in_norm(self, groups: TEDGroups) -> bool:
        """Whether this rank's shard is the one copy that enters the global norm (and that a
        checkpoint stores)."""
        if self.pipeline_copy or (not self.tp_split and groups.tp_of(self.expert).rank != 0):
            return False
        return self.shard or self.group.rank == 0

    def gather_params_async(self) -> None:
        """ZeRO-1: start the gather of every rank's updated shard; `wait_params` completes it."""
        if self.shard and self.group.size > 1:
            mine = self.param_buf[self.lo:self.hi].clone()
            self.gathering = (comm.all_gather_async(self.param_buf, mine, self.group), mine)

    def wait_params(self) -> None:
        if getattr(self, "gathering", None) is not None:
            self.gathering[0].wait()
            self.gathering = None

    def gather_params(self, tile: int) -> None:
        """ZeRO-1: every rank's updated shard to every rank. With a tile size, one tile of each
        shard at a time, so the temporary buffers stay bounded by the tile here too."""
        n = self.group.size
        if not self.shard or n == 1:
            return
        per = self.hi - self.lo
        if tile <= 0:
            comm.all_gather_into(self.param_buf, self.param_buf[self.lo:self.hi].clone(),
                                 self.group)
            return
        shards = self.param_buf.view(n, per)
        step = max(1, tile // n)  # the gathered [n, step] buffer holds at most `tile` elements
        for a in range(0, per, step):
            b = min(a + step, per)
            shards[:, a:b].copy_(comm.raw_all_gather(shards[self.group.rank, a:b], self.group))

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (master copy when separate, and moments)."""
        own_master = self.master.data_ptr() != self.param_buf[self.lo:self.hi].data_ptr()
        tensors = [self.exp_avg, self.exp_avg_sq] + ([self.master] if own_master else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class StepResult:
    grad_norm: float  # unscaled, before clipping
    skipped: bool  # fp16 overflow
    loss_scale: float


class Optimizer:
    """AdamW with fp32 master weights over the model's flat groups."""

    def __init__(self, model: torch.nn.Module, groups: TEDGroups, cfg: OptimizerConfig):
        self.cfg, self.groups = cfg, groups
        self.scaler = LossScaler(cfg)
        self.step_count = 0
        keyed: dict[tuple, list] = {}
        for p in model.parameters():
            if p.requires_grad:
                spec = spec_of(p)
                partial = spec.sequence_parallel and groups.sequence_parallel
                key = (spec.expert, spec.decay, spec.tp_dim is not None, spec.pipeline_copy,
                       partial)
                keyed.setdefault(key, []).append(p)
        self.flat_groups = []
        for (expert, decay, tp_split, copy, partial), params in keyed.items():
            grad_dtype = torch.float32 if cfg.accumulate_grads_in_fp32 else params[0].dtype
            # dense: every replica of the shard (DP x CP: context-parallel ranks hold partial
            # gradients of their own tokens, summed); the mean is over DP alone
            group = groups.edp if expert else groups.dp_cp
            for bucket in _buckets(params, cfg.bucket_size):
                self.flat_groups.append(FlatGroup(bucket, group,
                                                  shard=cfg.use_distributed_optimizer,
                                                  decay=decay, tp_split=tp_split,
                                                  grad_dtype=grad_dtype, dp_size=groups.dp.size,
                                                  pipeline_copy=copy, expert=expert,
                                                  tp_sum=groups.tp if partial else None))
        # Parameters held by two pipeline stages (the tied word embedding on the first and the
        # last): their gradients are summed over the embedding group before any other reduction.
        shared = getattr(model, "pipeline_shared", lambda: [])()
        self.shared = [p for p in shared if p.requires_grad]
        # One scheduler-facing dict per flat group (megatron-core's OptimizerParamScheduler sets
        # 'lr' and 'weight_decay' = wd * 'wd_mult' in these).
        self.param_groups = [
            {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "wd_mult": 1.0 if fg.decay else 0.0}
            for fg in self.flat_groups
        ]
        self.bucket_of = {p: fg for fg in self.flat_groups for p in fg.params}
        self._ready: dict = {}  # bucket -> gradients in, during an overlapped backward
        self._overlapping = False
        self._grads_per_param = 1  # per bucket parameter, before an overlapped reduction starts
        self._late = {self.bucket_of[p] for p in self.shared}  # reduced after the embedding sum
        # Buckets start their reductions in one fixed order on every rank, the reverse of the
        # model's parameter order (about backward's): which bucket is complete first may differ
        # between ranks (an MoE layer's backward graph depends on its tokens: padded or packed
        # experts, a fused or a split GEMM), and a collective issued out of order would pair
        # with another bucket's on a peer. `_next`: the first bucket of the order not started.
        position = {p: i for i, p in enumerate(model.parameters())}
        self._order = sorted((fg for fg in self.flat_groups if fg not in self._late),
                             key=lambda fg: -max(position[p] for p in fg.params))
        self._next = 0
        for p in self.params():
            p.register_post_accumulate_grad_hook(self._on_grad)
        if cfg.overlap_param_gather and cfg.use_distributed_optimizer:
            for module in model.modules():
                mine = {self.bucket_of[p] for p in module.parameters(recurse=False)
                        if p in self.bucket_of}
                if mine:
                    module.register_forward_pre_hook(functools.partial(_wait_for, tuple(mine)))

    def before_last_backward(self) -> None:
        """Called before the step's last micro-batch: from now on a bucket whose gradients are all
        in starts its reduction while backward goes on (--overlap-grad-reduce)."""
        self.expect_gradients(1)

    def expect_gradients(self, per_param: int) -> None:
        """From now on (--overlap-grad-reduce), a bucket starts its reduction once each of its
        parameters has received `per_param` gradients (a pipeline: one per micro-batch)."""
        if self.cfg.overlap_grad_reduce:
            self._overlapping, self._ready, self._grads_per_param = True, {}, per_param
            self._next = 0

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        _accumulate_into_main_grad(p)
        if self._overlapping:
            bucket = self.bucket_of[p]
            self._ready[bucket] = self._ready.get(bucket, 0) + 1
            self._start_in_order(until_incomplete=True)

    def _start_in_order(self, until_incomplete: bool) -> None:
        """Start the reductions of the buckets of the fixed order from `_next` on: all of them,
        or, `until_incomplete`, up to the first whose gradients are not all in yet."""
        while self._next < len(self._order):
            fg = self._order[self._next]
            if until_incomplete and self._ready.get(fg, 0) < len(fg.params) * self._grads_per_param:
                return
            fg.start_reduce()
            self._next += 1

    @torch.no_grad()
    def collect_gradients(self) -> None:
        """Gradients a schedule wrote to `.grad` itself, past the accumulation hook (the
        zero-bubble schedules' weight passes), into the flat buffers."""
        for p in self.params():
            if p.grad is not None:
                self._on_grad(p)

    def params(self):
        return (p for fg in self.flat_groups for p in fg.params)

    def zero_grad(self) -> None:
        for fg in self.flat_groups:
            fg.grad_buf.zero_()

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the accumulated gradients over DP / expert-DP (step 1); call before `step`.
        Buckets an overlapped backward has started are waited for; the rest run now."""
        if not self._overlapping:
            self._next = 0
        self._overlapping = False
        for p in self.shared:  # the first and last stage's copies: one gradient, their sum
            comm.all_reduce_(p.main_grad, self.groups.embedding)
        self._start_in_order(until_incomplete=False)  # the rest of the order, then the copies'
        for fg in self.flat_groups:
            if fg in self._late:
                fg.start_reduce()
        for fg in self.flat_groups:
            fg.finish_reduce()

    def wait_params(self) -> None:
        """Complete every overlapped ZeRO-1 parameter gather (before reading the parameters
        outside a forward)."""
        for fg in self.flat_groups:
            fg.wait_params()

    @torch.no_grad()
    def step(self) -> StepResult:
        """Steps 2-5 on reduced gradients."""
        scale = self.scaler.scale
        if self.cfg.fp16:
            overflow = self._overflow()
            self.scaler.update(overflow)
            if overflow:
                return StepResult(float("nan"), True, scale)
        norm = self.grad_norm() / scale
        if self.cfg.check_for_nan and not math.isfinite(norm):  # identical on every rank: all stop
            raise NonFiniteError(f"the gradient norm is {norm}")
        clip = self.cfg.clip_grad / (norm + 1e-6) if 0 < self.cfg.clip_grad < norm + 1e-6 else 1.0
        self.step_count += 1
        overlap = self.cfg.overlap_param_gather
        # --overlap-param-gather: the gathers start in forward order (the last bucket holds the
        # first layers) and the next forward waits for each bucket just before using it
        pairs = list(zip(self.flat_groups, self.param_groups))
        for fg, pg in reversed(pairs) if overlap else pairs:
            self._update(fg, pg, clip / scale)
            fg.gather_params_async() if overlap else fg.gather_params(self.cfg.tile_size)
        return StepResult(norm, False, scale)

    def grad_norm(self) -> float:
        """Global L2 norm of the (reduced, still scaled) gradients; identical on every rank."""
        device = self.flat_groups[0].grad_buf.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for fg in self.flat_groups:
            if fg.counts_in_norm(self.groups):
                # upcasting all at once would cost 4 B/element
                for chunk in fg.grads.split(_SCAN_CHUNK):
                    total += torch.linalg.vector_norm(chunk, dtype=torch.float32).double() ** 2
        comm.all_reduce_(total, self.groups.world)
        return math.sqrt(total.item())

    def _overflow(self) -> bool:
        found = torch.zeros((), device=self.flat_groups[0].grad_buf.device)
        for fg in self.flat_groups:
            for chunk in fg.grads.split(_SCAN_CHUNK):
                found = torch.maximum(found, (~torch.isfinite(chunk)).any().float())
        comm.all_reduce_(found, self.groups.world, op=dist.ReduceOp.MAX)
        return bool(found.item())

    def _update(self, fg: FlatGroup, pg: dict, grad_factor: float) -> None:
        n = fg.hi - fg.lo
        tile = self.cfg.tile_size if self.cfg.tile_size > 0 else max(n, 1)
        c = self.cfg
        for a in range(0, n, tile):
            b = min(a + tile, n)
            g = fg.grads[a:b]
            g = g if g.dtype == torch.float32 else g.float()  # the only upcast: one tile at a time
            g.mul_(grad_factor)
            adamw_(fg.master[a:b], g, fg.exp_avg[a:b], fg.exp_avg_sq[a:b], step=self.step_count,
                   lr=pg["lr"], beta1=c.adam_beta1, beta2=c.adam_beta2, eps=c.adam_eps,
                   wd=pg["weight_decay"])
            mine = fg.param_buf[fg.lo + a:fg.lo + b]
            if mine.data_ptr() != fg.master[a:b].data_ptr():
                mine.copy_(fg.master[a:b])

    def state_bytes(self) -> int:
        return sum(fg.state_bytes() for fg in self.flat_groups)

    @torch.no_grad()
    def load_master_weights(self) -> None:
        self.wait_params()
        self._load_master_weights()

    def _load_master_weights(self) -> None:
        """After the fp32 master weights were loaded (megatron.checkpoint): the
        parameters become their cast, on every rank of each group (ZeRO-1: gathered)."""
        for fg in self.flat_groups:
            mine = fg.param_buf[fg.lo:fg.hi]
            if mine.data_ptr() != fg.master.data_ptr():
                mine.copy_(fg.master)
            fg.gather_params(self.cfg.tile_size)


def _wait_for(buckets, _module, _inputs) -> None:
    """A module's forward pre-hook: its parameters' buckets are gathered before it runs."""
    for bucket in buckets:
        bucket.wait_params()


def _buckets(params: list, size: Optional[int]) -> list[list]:
    """Parameter-aligned buckets of about `size` elements, filled from the last parameter (whose
    gradient backward computes first), each in model order; one bucket when `size` is None."""
    if size is None:
        return [params]
    out, current, count = [], [], 0
    for p in reversed(params):
        current.insert(0, p)
        count += p.numel()
        if count >= size:
            out.append(current)
            current, count = [], 0
    if current:
        out.append(current)
    return out


def _accumulate_into_main_grad(p: torch.Tensor) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None
