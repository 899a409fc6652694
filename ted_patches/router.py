"""Top-k router: the gate's choices (ted_patches.gates) with capacity and token dropping.

Shapes: T tokens, H hidden, E experts, K top-k, A = K * T assignments in choice-major order
(a = choice * T + token), C capacity (per expert, padded to a multiple of TP).

The gate runs in fp32 on all T tokens. Its weight is replicated over TP and its input is
identical on the TP ranks, so routing is bit-identical there (--check-tp-routing checks it);
capacity, dropping and the losses are computed per micro-batch on each rank.

Sync-free: every array has a fixed size (A assignments, dropped ones kept with `keep_A` False
and weight 0), counts come from one-hot sums, and nothing is read back to the host, so in drop
mode the router issues no host synchronization (no nonzero, bincount, one_hot's range check or
.item()). The only exception is the padded no-drop mode, whose capacity (the largest count over
the EP group, one all-reduce MAX) sizes a buffer and so must reach the host; the padding-free
path needs no capacity at all.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.model.params import set_spec
from megatron.parallel import comm
from megatron.parallel.context import gather_context, positions
from ted_patches.config import MoEConfig
from ted_patches.gates import build_gate
from megatron.parallel.topology import TEDGroups


@dataclass(frozen=True)
class Routing:
    """Which tokens go where, as fixed-size arrays over the A = K * T assignments (choice-major:
    a = choice * T + token). Dropped assignments stay in the arrays with keep_A False and a
    zero weight."""

    expert_A: torch.Tensor  # expert (global id) of each assignment
    # its position in the expert's slots, in [0, kept_E[e]); meaningful ONLY where keep_A (a
    # dropped one holds -1 under the probs policy, a slot past capacity under the others)
    slot_A: torch.Tensor
    keep_A: torch.Tensor  # bool: survived the capacity limit
    weight_A: torch.Tensor  # gate weight (fp32, differentiable), exactly 0 where dropped
    kept_E: torch.Tensor  # kept assignments per expert (slots 0 .. kept_E - 1 are used)
    # slots per expert, a multiple of TP (None: padding-free no-drop, unbounded)
    capacity: Optional[int]
    aux_loss: torch.Tensor  # unweighted load-balancing loss
    z_loss: torch.Tensor  # unweighted router z-loss
    counts_E: torch.Tensor  # assignments per expert before dropping (all K choices)
    num_tokens: int
    topk: int
    may_drop: bool  # False: every assignment is kept (no-drop mode)

    # -- the kept assignments as compact lists (test and debugging helpers: they synchronize) ----
    @property
    def assign_N(self) -> torch.Tensor:
        """Index (choice * T + token) of each kept assignment, in choice-major order."""
        return self.keep_A.nonzero().squeeze(1)

    @property
    def token_N(self) -> torch.Tensor:
        return self.assign_N % self.num_tokens

    @property
    def expert_N(self) -> torch.Tensor:
        return self.expert_A[self.assign_N]

    @property
    def slot_N(self) -> torch.Tensor:
        return self.slot_A[self.assign_N]

    @property
    def weight_N(self) -> torch.Tensor:
        return self.weight_A[self.assign_N]

    def restrict(self, token_T: torch.Tensor) -> "Routing":
        """The routing of some of the tokens (sequence parallelism: this rank's own), decided as
        part of the whole: their assignments in choice-major order, each expert's kept ones
        numbered 0, 1, ... in that order (their slots in this rank's rows) and counted in
        kept_E. Capacity, losses and counts stay the whole routing's."""
        T, K, E = self.num_tokens, self.topk, self.counts_E.numel()
        choice_K = torch.arange(K, device=token_T.device)[:, None] * T
        idx_A = (choice_K + token_T[None, :]).reshape(-1)
        expert_A, keep_A = self.expert_A.index_select(0, idx_A), self.keep_A.index_select(0, idx_A)
        kept_AE = one_hot(expert_A, E) * keep_A[:, None]
        slot_A = torch.where(keep_A, _positions(kept_AE, expert_A), 0)
        return dataclasses.replace(self, expert_A=expert_A, slot_A=slot_A, keep_A=keep_A,
                                   weight_A=self.weight_A.index_select(0, idx_A),
                                   kept_E=kept_AE.sum(0), capacity=None,
                                   num_tokens=token_T.numel())

    def checksum(self) -> torch.Tensor:
        """An int64 digest of the routing decisions (expert, kept, slot of every assignment) for
        comparing ranks; gate weights are left out (a 1-ulp weight difference is harmless)."""
        A = self.expert_A.numel()
        code = torch.where(self.keep_A, self.expert_A * (A + 1) + self.slot_A + 1,
                           torch.zeros_like(self.expert_A))
        mult = torch.arange(A, device=code.device, dtype=torch.int64) * 2654435761 % 4294967291 + 1
        return torch.stack([(code * mult).sum(), self.keep_A.sum()])


def token_capacity(num_tokens: int, num_experts: int, topk: int, factor: float,
                   min_capacity: int) -> int:
    """ceil(T / E * (cf * k)), at least min_capacity: DeepSpeed's formula, in fp32 as it computes
    it, so the two agree at the rounding edges too."""
    product = np.float32(num_tokens / num_experts) * np.float32(factor * topk)
    return max(math.ceil(product), min_capacity)


def one_hot(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """F.one_hot without its range check (which reads min and max back to the host)."""
    return torch.zeros(*index.shape, num_classes, dtype=torch.int64, device=index.device).scatter_(
        -1, index.unsqueeze(-1), 1)


def _positions(onehot_AE: torch.Tensor, expert_A: torch.Tensor) -> torch.Tensor:
    """0-based position of each assignment among those of its expert, in the given order."""
    return onehot_AE.cumsum(0).gather(1, expert_A[:, None]).squeeze(1) - 1


def keep_mask(expert_A: torch.Tensor, prob_A: torch.Tensor, num_experts: int, capacity: int,
              policy: str, topk: int = 1, onehot_AE: Optional[torch.Tensor] = None):
    """Which of the A = K*T assignments (choice-major order) fit, and their slots.

    position: DeepSpeed's order. For k <= 2 (its top1/top2 gates) an expert takes all first
    choices by token, then second choices, until full; for k >= 3 (its topkgating) it takes
    assignments in TOKEN order over all k choices (token 0's choices, then token 1's, ...).
    choice: first choices by token, then second choices, ... for every k (= position for k <= 2).
    probs: an expert keeps its `capacity` most probable assignments (ties in assignment order).
    Kept assignments of an expert get slots 0, 1, ... (in the order that kept them; probs: in
    assignment order)."""
    if onehot_AE is None:
        onehot_AE = one_hot(expert_A, num_experts)
    if policy == "choice" or (policy == "position" and topk <= 2):
        slot_A = _positions(onehot_AE, expert_A)
        return slot_A < capacity, slot_A
    if policy == "position":  # k >= 3: token-major order
        T = expert_A.numel() // topk
        tm = lambda t: t.view(topk, T, *t.shape[1:]).transpose(0, 1).reshape(topk * T, *t.shape[1:])  # noqa: E731
        slot_A = _positions(tm(onehot_AE), tm(expert_A)).view(T, topk).t().reshape(-1)
        return slot_A < capacity, slot_A
    score_AE = torch.where(onehot_AE.bool(), prob_A[:, None],
                           torch.full_like(prob_A[:, None], -1.0))
    order = score_AE.argsort(dim=0, descending=True, stable=True)[:capacity]
    top_AE = torch.zeros_like(onehot_AE).scatter_(0, order, 1)
    keep_A = (top_AE * onehot_AE).sum(1).bool()
    slot_A = _positions(onehot_AE * keep_A[:, None], expert_A)
    return keep_A, slot_A


def expert_block(groups: TEDGroups):
    """The ranks whose buffers must agree in size for the dispatch: the experts' TP x EP block
    (the EP group where there is no experts' TP)."""
    return groups.etp_ep if groups.etp_ep is not None else groups.ep


def whole_sequence(logits_TE: torch.Tensor, num_sequences: Optional[int],
                   groups: TEDGroups) -> torch.Tensor:
    """Sequence parallelism and / or context parallelism: this rank's logits [b * s_local, E] ->
    the whole micro-batch's [b * s, E] in one process's token order (batch-major), so capacity,
    drop order and the losses are decided over the whole sequence, identically on every rank that
    splits it. Backward: this rank's part (the routing downstream is computed alike on every such
    rank; each rank's share of the gradient is that of its own tokens)."""
    if num_sequences is None:
        raise ValueError("a split sequence: the router needs the micro-batch's sequence count")
    E = logits_TE.shape[-1]
    local = logits_TE.view(num_sequences, -1, E)
    if groups.sequence_parallel:  # the TP parts of this CP rank's part
        local = comm.gather_sequence(local, groups.tp, replicated=True)
    return gather_context(local, groups.cp, replicated=True).reshape(-1, E)


def sequence_split(groups: TEDGroups) -> bool:
    """Whether a rank holds only part of each sequence (SP at TP > 1, or CP > 1)."""
    return groups.sequence_parallel or groups.cp.size > 1


def my_tokens(num_sequences: int, local_length: int, groups: TEDGroups,
              device=None) -> torch.Tensor:
    """Indices, in the whole micro-batch's token order (batch-major), of this rank's tokens
    [b, s_local] (its CP chunks; under SP its TP part of them)."""
    sp = groups.tp.size if groups.sequence_parallel else 1
    cp_local = local_length * sp  # this CP rank's tokens per sequence
    pos = positions(cp_local, groups.cp, device)
    if sp > 1:
        pos = pos[groups.tp.rank * local_length:(groups.tp.rank + 1) * local_length]
    s = cp_local * groups.cp.size
    return (torch.arange(num_sequences, device=device)[:, None] * s + pos).reshape(-1)


class Router(torch.nn.Module):
    """The linear layer (weight [E, H], replicated over TP), input jitter, capacity and dropping;
    the gate (ted_patches.gates, chosen by config) turns the logits into choices and weights."""

    def __init__(self, hidden_size: int, cfg: MoEConfig, groups: TEDGroups, std: float):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        # under sequence parallelism it sees this rank's tokens only: partial gradients over TP
        self.weight = set_spec(torch.nn.Parameter(torch.empty(cfg.num_experts, hidden_size)),
                               init="normal", std=std, sequence_parallel=groups.sequence_parallel)
        self.gate = build_gate(cfg, groups)
        self.dtype = {"fp32": torch.float32, "fp64": torch.float64}[cfg.router_dtype]

    def forward(self, x_TH: torch.Tensor, pad_free: bool = False,
                num_sequences: Optional[int] = None) -> Routing:
        """pad_free: the padding-free dispatch follows; in no-drop mode it needs no capacity.
        num_sequences: the micro-batch's sequences (tokens batch-major), for seq_aux_loss."""
        cfg, E, K = self.cfg, self.cfg.num_experts, self.cfg.topk
        T = x_TH.shape[0]
        # 1. fp32 (or fp64: --moe-router-dtype) logits and the gate's scores
        x = x_TH.to(self.dtype)
        if self.training and cfg.jitter_eps > 0:  # default stream: identical on the TP ranks
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        logits_TE = x @ self.weight.to(self.dtype).t()
        if sequence_split(self.groups):  # this rank's part of the sequence: route the whole one
            logits_TE = whole_sequence(logits_TE, num_sequences, self.groups)
            T = logits_TE.shape[0]
        scores_TE = self.gate.scores(logits_TE)
        # 2. choices, in choice-major order
        idx_TK = self.gate.choose(logits_TE.detach(), scores_TE.detach(), K)
        expert_A = idx_TK.t().reshape(-1)
        score_A = scores_TE.gather(1, idx_TK).t().reshape(-1)
        onehot_AE = one_hot(expert_A, E)
        counts_E = onehot_AE.sum(0)
        # 3. capacity and dropping
        if not cfg.drop_tokens and pad_free:
            capacity = None
            keep_A = torch.ones_like(expert_A, dtype=torch.bool)
            slot_A = _positions(onehot_AE, expert_A)
            kept_E = counts_E
        else:
            capacity = self._capacity(T, counts_E)
            keep_A, slot_A = keep_mask(expert_A, score_A.detach(), E, capacity, cfg.drop_policy, K,
                                       onehot_AE)
            if cfg.drop_policy == "probs":
                kept_E = (onehot_AE * keep_A[:, None]).sum(0)
            else:
                kept_E = counts_E.clamp(max=capacity)
            tp = self.groups.tp.size
            capacity = -(-capacity // tp) * tp
        # 4. gate weights (0 for the dropped) and the gate's losses
        weight_A = self.gate.normalize(score_A, keep_A, T, K).float()
        seqs = {} if num_sequences is None else {"num_sequences": num_sequences}
        aux, z_loss = (loss.float() for loss in self.gate.losses(
            logits_TE, scores_TE, idx_TK, onehot_AE[:T].sum(0), counts_E, **seqs))
        return Routing(expert_A=expert_A, slot_A=slot_A, keep_A=keep_A, weight_A=weight_A,
                       kept_E=kept_E, capacity=capacity, aux_loss=aux, z_loss=z_loss,
                       counts_E=counts_E, num_tokens=T, topk=K, may_drop=cfg.drop_tokens)

    def after_step(self, counts_E: torch.Tensor, skipped: bool) -> None:
        """After each optimizer step (ted_patches.moe_layer.after_optimizer_step): to the gate."""
        self.gate.after_step(counts_E, skipped)

    def _capacity(self, num_tokens: int, counts_E: torch.Tensor) -> int:
        cfg = self.cfg
        if cfg.drop_tokens:
            factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
            return token_capacity(num_tokens, cfg.num_experts, cfg.topk, factor, cfg.min_capacity)
        # padded no-drop: room for the fullest expert of any rank this all-to-all talks to (a shape:
        # the one host synchronization of that mode)
        largest = comm.all_reduce_(counts_E.max().reshape(1).clone(), expert_block(self.groups),
                                   op=dist.ReduceOp.MAX)
        return max(int(largest.item()), 1)
