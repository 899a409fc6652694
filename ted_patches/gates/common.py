"""What the gates share: top-k selection (plain or group-limited), the normalization of the chosen
scores, and Megatron-Core's load-balancing losses. Shapes: T tokens, E experts, K top-k, G expert
groups, B sequences of S tokens (T = B * S, batch-major: token t is in sequence t // S),
A = K * T assignments (choice-major: a = choice * T + token)."""

from __future__ import annotations

from typing import Optional

import torch

from ted_patches.config import MoEConfig


def select(sel_TE: torch.Tensor, k: int, cfg: MoEConfig) -> torch.Tensor:
    """Expert ids [T, K], best first, by `sel_TE`; group-limited when the config says so."""
    if cfg.router_num_groups is None:
        return sel_TE.topk(k, dim=-1).indices
    return group_limited_top_k(sel_TE, k, cfg.router_num_groups, cfg.router_group_topk)


def group_limited_top_k(sel_TE: torch.Tensor, k: int, num_groups: int,
                        group_topk: int) -> torch.Tensor:
    """DeepSeek's device/node-limited routing as Megatron-Core defines it: the E experts form
    `num_groups` contiguous groups; a group scores the sum of its best k // group_topk experts;
    each token keeps its best `group_topk` groups and picks its top-k experts inside them."""
    T, E = sel_TE.shape
    per_group = E // num_groups
    # 1. each group's score
    group_TG = sel_TE.reshape(T, num_groups, per_group).topk(k // group_topk, dim=-1).values
    group_TG = group_TG.sum(dim=-1)
    # 2. the groups each token may use
    best_Tg = group_TG.topk(group_topk, dim=-1).indices
    allowed_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=sel_TE.device)
    allowed_TG.scatter_(1, best_Tg, True)
    # 3. the top-k experts among the allowed groups
    allowed_TE = allowed_TG.repeat_interleave(per_group, dim=1)
    return sel_TE.masked_fill(~allowed_TE, float("-inf")).topk(k, dim=-1).indices


def normalize(score_A: torch.Tensor, keep_A: torch.Tensor, T: int, K: int, mode: str,
              eps: Optional[float] = None) -> torch.Tensor:
    """Gate weights of the A assignments, 0 where dropped.
    surviving: over the kept choices of each token (top-1: the raw score);
    topk: over the K choices before dropping (`eps` added to the sum: Megatron-Core's sigmoid
          gate; top-1 then keeps the raw score too, as Megatron-Core's sigmoid does);
    none: the raw scores."""
    if mode == "none" or (K == 1 and (mode == "surviving" or eps is not None)):
        return score_A * keep_A
    if mode == "topk":
        denom_T = score_A.view(K, T).sum(0)
        denom_T = denom_T if eps is None else denom_T + eps
        return (score_A.view(K, T) / denom_T).reshape(-1) * keep_A
    kept_KT = (score_A * keep_A).view(K, T)
    denom_T = kept_KT.sum(0).clamp(min=torch.finfo(score_A.dtype).eps)
    return (kept_KT / denom_T).reshape(-1)


def scaled(weight_A: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """--moe-router-topk-scaling-factor: the weights times the factor (after normalization)."""
    return weight_A if cfg.topk_scaling_factor is None else weight_A * cfg.topk_scaling_factor


def counts_of(idx_TK: torch.Tensor, E: int) -> torch.Tensor:
    """[T, E] int64: 1 where the token chose the expert."""
    return torch.zeros(idx_TK.shape[0], E, dtype=torch.int64,
                       device=idx_TK.device).scatter_(1, idx_TK, 1)


def switch_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, K: int) -> torch.Tensor:
    """Switch / GShard (Megatron-Core's aux_loss): E * sum_e mean_t(p[t, e]) * counts[e] / (T K)."""
    T, E = probs_TE.shape
    return E * (probs_TE.mean(0) * (counts_E.to(probs_TE.dtype) / (T * K))).sum()


def seq_switch_loss(probs_TE: torch.Tensor, map_TE: torch.Tensor, K: int,
                    num_sequences: int) -> torch.Tensor:
    """Megatron-Core's seq_aux_loss (DeepSeek-V2/V3): the switch loss of each sequence on its
    own tokens, averaged over the B sequences."""
    T, E = probs_TE.shape
    if num_sequences is None or T % num_sequences:
        raise ValueError(f"seq_aux_loss needs the micro-batch's sequence count (got "
                         f"{num_sequences} for {T} tokens): the MoE layer passes "
                         "num_sequences to the router")
    B, S = num_sequences, T // num_sequences
    me_BE = probs_TE.view(B, S, E).mean(1)
    ce_BE = map_TE.view(B, S, E).sum(1).to(probs_TE.dtype) / (S * K)
    return E * (me_BE * ce_BE).sum(-1).mean()


def z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (only logged, without a graph, at coeff 0)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and coeff != 0):
        return torch.logsumexp(logits_TE, -1).square().mean()


def balancing_loss(cfg: MoEConfig, probs_TE: torch.Tensor, idx_TK: torch.Tensor,
                   counts_E: torch.Tensor, num_sequences: Optional[int],
                   global_load=None, dp: int = 1) -> torch.Tensor:
    """The unweighted load-balancing loss of `cfg.aux_loss_type` on `probs_TE` (the gate's
    probabilities over all E experts, summing to 1 per token).
    deepspeed: DeepSpeed's gates: E * sum_e mean prob_e * fraction of FIRST choices on e for
               k <= 2, the switch form below for k >= 3;
    aux_loss, seq_aux_loss: Megatron-Core's, per micro-batch / per sequence;
    global_aux_loss: the switch loss of this rank's probabilities against the loads of
               `global_load(counts_E)` (the step's micro-batches so far, summed over the `dp`
               ranks: Megatron-Core's running global batch), normalized per rank so that the
               mean over the DP ranks, which the log shows and the DP gradient average
               differentiates, is the global batch's loss (Megatron-Core divides each rank's by
               DP once more: the same at DP 1).
    As Megatron-Core does, the loads are those of a plain top-k of `probs_TE` when the real
    choice is group-limited or biased (`idx_TK`, `counts_E` are the real choices otherwise)."""
    kind, K, E = cfg.aux_loss_type, cfg.topk, probs_TE.shape[1]
    if kind in ("none", "sinkhorn"):
        return probs_TE.new_zeros(())
    if cfg.router_num_groups is not None or cfg.enable_expert_bias:
        idx_TK = probs_TE.detach().topk(K, dim=-1).indices
        counts_E = counts_of(idx_TK, E).sum(0)
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.aux_loss_coeff != 0):
        if kind == "deepspeed" and K <= 2:
            return switch_loss(probs_TE, counts_of(idx_TK[:, :1], E).sum(0), 1)
        if kind == "seq_aux_loss":
            return seq_switch_loss(probs_TE, counts_of(idx_TK, E), K, num_sequences)
        if kind == "global_aux_loss":
            return switch_loss(probs_TE, global_load(counts_E) / dp, K)
        return switch_loss(probs_TE, counts_E, K)
