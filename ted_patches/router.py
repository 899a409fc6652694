"""Top-k router with capacity, token dropping, gate normalization and auxiliary losses.

Shapes: T tokens, H hidden, E experts, K top-k, C capacity (per expert, padded to a multiple of
TP), N kept (token, expert) assignments.

The gate runs in fp32 on all T tokens. Its weight is replicated over TP and its input is
identical on the TP ranks, so routing is bit-identical there; capacity, dropping and the losses
are computed per micro-batch on each rank (the only collective: one all-reduce MAX over EP in
no-drop mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.model.params import set_spec
from megatron.parallel import comm
from ted_patches.config import MoEConfig
from megatron.parallel.topology import TEDGroups


@dataclass(frozen=True)
class Routing:
    """Which tokens go where: the N kept assignments, in first-choice-then-second order."""

    assign_N: torch.Tensor  # index of each kept assignment in choice-major order: choice * T + token
    expert_N: torch.Tensor  # its expert (global id)
    slot_N: torch.Tensor  # its position in the expert's capacity, in [0, capacity)
    weight_N: torch.Tensor  # its gate weight (fp32, differentiable)
    capacity: int  # slots per expert, a multiple of the TP size
    aux_loss: torch.Tensor  # unweighted load-balancing loss
    z_loss: torch.Tensor  # unweighted router z-loss
    counts_E: torch.Tensor  # assignments per expert before dropping (all K choices)
    num_tokens: int

    @property
    def token_N(self) -> torch.Tensor:
        """Token index of each kept assignment."""
        return self.assign_N % self.num_tokens


def token_capacity(num_tokens: int, num_experts: int, topk: int, factor: float, min_capacity: int) -> int:
    """ceil(T / E * (cf * k)), at least min_capacity: DeepSpeed's formula, in fp32 as it computes
    it, so the two agree at the rounding edges too."""
    product = np.float32(num_tokens / num_experts) * np.float32(factor * topk)
    return max(math.ceil(product), min_capacity)


def top_k(logits_TE: torch.Tensor, probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Expert ids [T, K] as the reference picks them: the first by argmax of the probabilities,
    each next one by argmax of the logits with earlier choices masked (ties: lowest id)."""
    idx = [probs_TE.argmax(dim=-1)]
    masked = logits_TE
    for _ in range(1, k):
        masked = masked.scatter(-1, idx[-1].unsqueeze(-1), float("-inf"))
        idx.append(masked.argmax(dim=-1))
    return torch.stack(idx, dim=1)


def keep_mask(expert_A: torch.Tensor, prob_A: torch.Tensor, num_experts: int, capacity: int, policy: str):
    """Which of the A = K*T assignments (choice-major order) fit, and their slots.

    position: an expert takes assignments in order (all first choices by token, then second
    choices) until full. probs: an expert keeps its `capacity` most probable assignments (ties
    in order). Either way the kept ones get slots 0, 1, ... in assignment order."""
    onehot_AE = F.one_hot(expert_A, num_experts)
    if policy == "position":
        keep_A = (onehot_AE.cumsum(0).gather(1, expert_A[:, None]).squeeze(1) - 1) < capacity
    else:
        score_AE = torch.where(onehot_AE.bool(), prob_A[:, None], torch.full_like(prob_A[:, None], -1.0))
        order = score_AE.argsort(dim=0, descending=True, stable=True)[:capacity]
        top_AE = torch.zeros_like(onehot_AE).scatter_(0, order, 1)
        keep_A = (top_AE * onehot_AE).sum(1).bool()
    slot_A = (onehot_AE * keep_A[:, None]).cumsum(0).gather(1, expert_A[:, None]).squeeze(1) - 1
    return keep_A, slot_A


class Router(torch.nn.Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig, groups: TEDGroups, std: float):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.weight = set_spec(torch.nn.Parameter(torch.empty(cfg.num_experts, hidden_size)), init="normal", std=std)

    def forward(self, x_TH: torch.Tensor) -> Routing:
        cfg, E, K = self.cfg, self.cfg.num_experts, self.cfg.topk
        T = x_TH.shape[0]
        # 1. fp32 gate
        x = x_TH.float()
        if self.training and cfg.jitter_eps > 0:  # default stream: identical on the TP ranks
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        logits_TE = x @ self.weight.float().t()
        probs_TE = logits_TE.softmax(dim=-1)
        # 2. choices, in choice-major order (the order capacity is handed out in)
        idx_TK = top_k(logits_TE.detach(), probs_TE.detach(), K)
        expert_A = idx_TK.t().reshape(-1)
        prob_A = probs_TE.gather(1, idx_TK).t().reshape(-1)
        counts_E = torch.bincount(expert_A, minlength=E)
        # 3. capacity and dropping
        capacity = self._capacity(T, counts_E)
        keep_A, slot_A = keep_mask(expert_A, prob_A.detach(), E, capacity, cfg.drop_policy)
        # 4. gate weights of the kept assignments
        weight_A = self._normalize(prob_A, keep_A, T, K)
        kept = keep_A.nonzero().squeeze(1)
        tp = self.groups.tp.size
        return Routing(
            assign_N=kept, expert_N=expert_A[kept], slot_N=slot_A[kept], weight_N=weight_A[kept],
            capacity=-(-capacity // tp) * tp,
            aux_loss=self._aux_loss(probs_TE, idx_TK, counts_E), z_loss=torch.logsumexp(logits_TE, -1).square().mean(),
            counts_E=counts_E, num_tokens=T,
        )

    def _capacity(self, num_tokens: int, counts_E: torch.Tensor) -> int:
        cfg = self.cfg
        if cfg.drop_tokens:
            factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
            return token_capacity(num_tokens, cfg.num_experts, cfg.topk, factor, cfg.min_capacity)
        # no-drop: room for the fullest expert of any rank this all-to-all talks to
        largest = comm.all_reduce_(counts_E.max().reshape(1).clone(), self.groups.ep, op=dist.ReduceOp.MAX)
        return max(int(largest.item()), 1)

    def _normalize(self, prob_A, keep_A, T: int, K: int) -> torch.Tensor:
        mode = self.cfg.gate_normalization
        if mode == "none" or (mode == "surviving" and K == 1):
            return prob_A * keep_A
        if mode == "topk":  # over the K choices, before dropping
            return prob_A / prob_A.view(K, T).sum(0).repeat(K) * keep_A
        kept_A = prob_A * keep_A
        denom_T = kept_A.view(K, T).sum(0).clamp(min=torch.finfo(prob_A.dtype).eps)
        return kept_A / denom_T.repeat(K)

    def _aux_loss(self, probs_TE, idx_TK, counts_E) -> torch.Tensor:
        E, K = self.cfg.num_experts, self.cfg.topk
        kind = self.cfg.aux_loss_type
        if kind == "none":
            return probs_TE.new_zeros(())
        me_E = probs_TE.mean(0)
        if kind == "deepspeed" and K <= 2:  # DeepSpeed's top-1/top-2 gates: first choices only
            ce_E = torch.bincount(idx_TK[:, 0], minlength=E).to(probs_TE.dtype) / idx_TK.shape[0]
        else:  # Megatron-Core's switch loss, and DeepSpeed's k >= 3 gate: all K choices, divided by K
            ce_E = counts_E.to(probs_TE.dtype) / (idx_TK.shape[0] * K)
        return E * (me_E * ce_E).sum()
