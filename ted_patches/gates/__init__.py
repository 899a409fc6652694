"""Gates: what turns the router's logits into expert choices and weights.

A gate is chosen by `MoEConfig.score_function` (Megatron-Core's --moe-router-score-function) and
holds one routing family's math, in a file of its own:
    scores(logits_TE)            the fp32 scores the gate weights are read from
    choose(logits, scores, k)    expert ids [T, K] (first choice first)
    normalize(score_A, keep_A)   gate weights of the A = K * T assignments, 0 where dropped
    losses(...)                  the unweighted load-balancing and z losses
    after_step(counts_E, ...)    after each optimizer step: the step's tokens per expert (a gate
                                 that learns from the load, e.g. a selection bias, updates here)
The router around it owns the linear layer (its weight), input jitter, capacity and dropping,
which are the same for every gate. A gate's state that must survive a resume is a buffer with a
ParamSpec (megatron.model.params.set_spec): checkpoints save and reshard it like a parameter.
"""

from __future__ import annotations

import torch

from megatron.parallel.fields import FieldError
from megatron.parallel.topology import TEDGroups
from ted_patches.config import MoEConfig


class Gate(torch.nn.Module):
    """The interface (see the module docstring); subclasses implement the first four."""

    def __init__(self, cfg: MoEConfig, groups: TEDGroups):
        super().__init__()
        self.cfg, self.groups = cfg, groups

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def choose(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def normalize(self, score_A: torch.Tensor, keep_A: torch.Tensor, T: int,
                  K: int) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, logits_TE, scores_TE, idx_TK, first_E,
               counts_E) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux, z): unweighted; first_E counts first choices, counts_E all K choices."""
        raise NotImplementedError

    def after_step(self, counts_E: torch.Tensor, skipped: bool) -> None:
        """Every rank, after each optimizer step, with this rank's tokens per expert over the whole
        step (all micro-batches, before dropping). Nothing by default."""


def build_gate(cfg: MoEConfig, groups: TEDGroups) -> Gate:
    from ted_patches.gates.softmax import SoftmaxGate

    gates = {"softmax": SoftmaxGate}
    if cfg.score_function not in gates:
        raise FieldError(f"{{score_function}} {cfg.score_function!r}: use one of {sorted(gates)}",
                         "MoEConfig")
    return gates[cfg.score_function](cfg, groups)
