"""One training step: forward and backward over the step's micro-batches, the gradient reduction,
the optimizer step, and what the MoE layers measured handed to them after it.

`forward_backward` is the schedule without pipelining (every micro-batch's forward, then its
backward, accumulating gradients); with pipeline parallelism a torch.distributed.pipelining
schedule runs the micro-batches instead (megatron.training.pipeline).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron.parallel import comm
from megatron.parallel.topology import TEDGroups
from megatron.training.moe_stats import StepLayerStats, moe_layer_experts, per_layer_logging
from megatron.training.optimizer import NonFiniteError, Optimizer
from megatron.training.pipeline import reduce_over_stages
from ted_patches.moe_layer import StepMeasurements, after_optimizer_step


@dataclass(frozen=True)
class StepMetrics:
    lm_loss: float  # mean over the step's micro-batches on all DP ranks
    aux_loss: float  # MoE auxiliary losses (weighted), same averaging
    grad_norm: float
    skipped: bool
    loss_scale: float
    timers: dict = field(default_factory=dict)  # seconds (host clock): forward-backward, optimizer
    bubble: Optional[float] = None  # pipeline: the step's share this rank spent waiting
    # --moe-per-layer-logging: {MoE layer: {statistic: value}} (megatron.training.moe_stats)
    moe_layers: dict = field(default_factory=dict)


@dataclass
class StepSums:
    """What one rank's micro-batches of a step add up to."""

    losses: torch.Tensor  # [lm, aux] loss sums (float64)
    # MoE layer index -> assignments per expert before dropping, summed over the micro-batches
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)
    bubble: Optional[float] = None  # pipeline: the step's share this rank spent waiting
    # per MoE layer, summed only with --moe-per-layer-logging (None: not asked for)
    layer_stats: Optional[StepLayerStats] = None

    def add(self, out) -> None:
        if self.layer_stats is not None:
            self.layer_stats.add(out.aux)
        self.losses += torch.stack([out.lm_loss.detach(), out.aux_loss.detach()]).double()
        for aux in out.aux:
            counts = self.expert_counts.get(aux.layer)
            self.expert_counts[aux.layer] = (aux.counts_E if counts is None
                                             else counts + aux.counts_E)


def forward_backward(model, microbatches: list[dict], loss_scale: float,
                     before_last=None) -> StepSums:
    """Accumulate gradients of the mean loss over `microbatches`; returns their sums.
    `before_last()` runs before the last micro-batch (the optimizer's overlapped reduction)."""
    n = len(microbatches)
    sums = StepSums(torch.zeros(2, dtype=torch.float64, device=microbatches[0]["tokens"].device),
                    layer_stats=StepLayerStats() if per_layer_logging(model) else None)
    for i, mb in enumerate(microbatches):
        if before_last is not None and i == n - 1:
            before_last()
        out = model(**mb)
        (out.loss * (loss_scale / n)).backward()
        sums.add(out)
    return sums


def pipeline_forward_backward(pipeline, optimizer: Optimizer, microbatches: list[dict],
                              groups: TEDGroups) -> StepSums:
    """The same through a pipeline schedule (megatron.training.pipeline): every stage's sums,
    added up over the pipeline so every rank holds the whole model's."""
    if pipeline.plan.schedule not in ("zbv", "dualpipev"):  # their weight passes skip the hook
        optimizer.expect_gradients(len(microbatches))
    lm, aux, counts = pipeline.run(microbatches, optimizer.scaler.scale, train=True)
    optimizer.collect_gradients()
    stats = None
    if per_layer_logging(pipeline.gpt):  # this rank's stages' MoE layers, every micro-batch
        stats = StepLayerStats()
        for chunk in pipeline.chunks:
            for aux_list in chunk.aux:
                stats.add(aux_list)
    return StepSums(reduce_over_stages(torch.stack([lm, aux]), groups), counts, pipeline.bubble,
                    stats)


def train_step(model, optimizer: Optimizer, microbatches: list[dict], groups: TEDGroups,
               pipeline=None) -> StepMetrics:
    """One optimizer step over the micro-batches (through `pipeline` when there is one)."""
    start = time.perf_counter()
    optimizer.zero_grad()
    if pipeline is not None:
        sums = pipeline_forward_backward(pipeline, optimizer, microbatches, groups)
    else:
        sums = forward_backward(model, microbatches, optimizer.scaler.scale,
                                optimizer.before_last_backward)
    optimizer.reduce_gradients()
    losses = reduce_losses(sums.losses / len(microbatches), groups)
    if (optimizer.cfg.check_for_nan and not optimizer.cfg.fp16
            and not all(map(math.isfinite, losses))):
        raise NonFiniteError(f"the lm loss is {losses[0]} (moe aux loss {losses[1]})")
    middle = time.perf_counter()
    result = optimizer.step()
    after_optimizer_step(model, StepMeasurements(sums.expert_counts, result.skipped))
    timers = {"forward-backward": middle - start, "optimizer": time.perf_counter() - middle}
    layers = {}
    if sums.layer_stats is not None:
        layers = sums.layer_stats.reduce(groups, moe_layer_experts(model), sums.losses.device)
    return StepMetrics(losses[0], losses[1], result.grad_norm, result.skipped, result.loss_scale,
                       timers, sums.bubble, layers)


def reduce_losses(values: torch.Tensor, groups: TEDGroups) -> list[float]:
    """[lm, aux]: the LM loss summed over CP (each context-parallel rank holds its share; the aux
    losses are the whole sequence's on each), then the mean over the DP group (every DP rank ran
    the same number of micro-batches)."""
    context_sum(values[:1], groups)
    comm.all_reduce_(values, groups.dp)
    return (values / groups.dp.size).tolist()


def context_sum(lm: torch.Tensor, groups: TEDGroups) -> torch.Tensor:
    """The LM loss of whole sequences from the context-parallel ranks' shares (in place)."""
    return comm.all_reduce_(lm, groups.cp)
