"""One training step: micro-batches -> forward/backward with accumulation -> optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.training.optimizer import Optimizer
from ted_patches import comm
from ted_patches.topology import TEDGroups


@dataclass(frozen=True)
class StepMetrics:
    lm_loss: float  # mean over the step's micro-batches on all DP ranks
    aux_loss: float  # MoE auxiliary losses (weighted), same averaging
    grad_norm: float
    skipped: bool
    loss_scale: float


def forward_backward(model, microbatches: list[dict], loss_scale: float) -> torch.Tensor:
    """Accumulate gradients of the mean loss over `microbatches`; returns [lm, aux] loss sums."""
    n = len(microbatches)
    sums = torch.zeros(2, dtype=torch.float64, device=microbatches[0]["tokens"].device)
    for mb in microbatches:
        out = model(**mb)
        (out.loss * (loss_scale / n)).backward()
        sums += torch.stack([out.lm_loss.detach(), out.aux_loss.detach()]).double()
    return sums


def train_step(model, optimizer: Optimizer, microbatches: list[dict], groups: TEDGroups) -> StepMetrics:
    optimizer.zero_grad()
    sums = forward_backward(model, microbatches, optimizer.scaler.scale)
    optimizer.reduce_gradients()
    result = optimizer.step()
    losses = reduce_losses(sums / len(microbatches), groups)
    return StepMetrics(losses[0], losses[1], result.grad_norm, result.skipped, result.loss_scale)


def reduce_losses(values: torch.Tensor, groups: TEDGroups) -> list[float]:
    """Mean over the DP group (every DP rank ran the same number of micro-batches)."""
    comm.all_reduce_(values, groups.dp)
    return (values / groups.dp.size).tolist()
