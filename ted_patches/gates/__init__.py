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

from megatron.parallel import comm
from megatron.parallel.fields import FieldError
from megatron.parallel.topology import TEDGroups
from ted_patches.config import MoEConfig


class Gate(torch.nn.Module):
    """The interface (see the module docstring); subclasses implement the first four."""

    def __init__(self, cfg: MoEConfig, groups: TEDGroups):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.step_load = None  # global_aux_loss: [sum of loads, micro-batches] of this step

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def choose(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def normalize(self, score_A: torch.Tensor, keep_A: torch.Tensor, T: int,
                  K: int) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, logits_TE, scores_TE, idx_TK, first_E,
               counts_E) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux, z): unweighted; first_E counts first choices, counts_E all K choices. A gate
        with a per-sequence loss also takes `num_sequences` (the router passes it when known:
        tokens are batch-major, sequence b holding tokens b*S .. b*S + S - 1)."""
        raise NotImplementedError

    def after_step(self, counts_E: torch.Tensor, skipped: bool) -> None:
        """Every rank, after each optimizer step, with this rank's tokens per expert over the whole
        step (all micro-batches, before dropping). The base gate starts global_aux_loss's
        running load afresh."""
        self.step_load = None

    def global_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        """global_aux_loss (Megatron-Core's): this micro-batch's per-expert loads summed over the
        data-parallel group (one all-reduce), averaged with the step's earlier micro-batches.
        A forward in training adds to the running sum; a recompute (inside backward) or an
        evaluation reads it without adding."""
        load_E = comm.all_reduce_(counts_E.to(torch.float64).clone(), self.groups.dp)
        if not self.training or torch._C._current_graph_task_id() != -1:
            return load_E if self.step_load is None else self.step_load[0] / self.step_load[1]
        total, n = self.step_load or (0, 0)
        self.step_load = (load_E + total, n + 1)
        return self.step_load[0] / self.step_load[1]


def build_gate(cfg: MoEConfig, groups: TEDGroups) -> Gate:
    """The score function's gate; Sinkhorn balancing is a gate of its own (it selects)."""
    from ted_patches.gates.sigmoid import SigmoidGate
    from ted_patches.gates.sinkhorn import SinkhornGate
    from ted_patches.gates.softmax import SoftmaxGate

    gates = {"softmax": SoftmaxGate, "sigmoid": SigmoidGate}
    if cfg.score_function == "softmax" and cfg.aux_loss_type == "sinkhorn":
        return SinkhornGate(cfg, groups)
    if cfg.score_function not in gates:
        raise FieldError(f"{{score_function}} {cfg.score_function!r}: use one of {sorted(gates)}",
                         "MoEConfig")
    return gates[cfg.score_function](cfg, groups)
