"""Megatron-Core's --moe-router-load-balancing-type sinkhorn (S-BASE): in training each token's
experts are the top-k of a balanced assignment (Sinkhorn-Knopp scaling of exp(logits), computed
in fp32 without a graph); the weights are the activation's scores at the chosen experts (sigmoid
for top-1, softmax over all E otherwise), not renormalized. In evaluation the top-k of the
activation's scores. No load-balancing loss (the assignment balances); the z-loss as usual.
Shapes: T tokens, E experts, K top-k, A = K * T assignments (choice-major)."""

from __future__ import annotations

import torch

from ted_patches.gates import Gate
from ted_patches.gates.common import normalize, z_loss


def sinkhorn(logits_TE: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Scale exp(logits) by a row factor r_T and a column factor c_E until every row sums to 1/T
    and every column to 1/E (stopping when c_E moves by less than `tol` on average)."""
    cost_TE = torch.exp(logits_TE)
    T, E = cost_TE.shape
    r_T = torch.ones(T, dtype=cost_TE.dtype, device=cost_TE.device)
    c_E = torch.ones(E, dtype=cost_TE.dtype, device=cost_TE.device)
    eps, change = 1e-8, float("inf")
    while change > tol:
        r_T = (1 / T) * (1 / ((c_E * cost_TE).sum(1) + eps))
        new_c_E = (1 / E) * (1 / ((r_T[:, None] * cost_TE).sum(0) + eps))
        change = (c_E - new_c_E).abs().mean().item()
        c_E = new_c_E
    return c_E * cost_TE * r_T[:, None]


class SinkhornGate(Gate):
    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.cfg.topk == 1:
            return torch.sigmoid(logits_TE)
        return logits_TE.softmax(dim=-1)

    def choose(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        if not self.training:
            return scores_TE.topk(k, dim=-1).indices
        with torch.no_grad():
            return sinkhorn(logits_TE.float()).topk(k, dim=-1).indices

    def normalize(self, score_A: torch.Tensor, keep_A: torch.Tensor, T: int,
                  K: int) -> torch.Tensor:
        return normalize(score_A, keep_A, T, K, "none")

    def losses(self, logits_TE, scores_TE, idx_TK, first_E, counts_E, num_sequences=None):
        return logits_TE.new_zeros(()), z_loss(logits_TE, self.cfg.z_loss_coeff)
