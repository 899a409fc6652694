"""The softmax gate of GShard / Switch / DeepSpeed / Megatron-Core: softmax scores, top-k in the
reference's order (or group-limited), weights renormalized as configured (Megatron-Core's
pre-softmax: not at all) and scaled, DeepSpeed's or Megatron-Core's load-balancing losses, and
the z-loss. Shapes: T tokens, E experts, K top-k, A = K * T assignments (choice-major)."""

from __future__ import annotations

import torch

from ted_patches.gates import Gate
from ted_patches.gates.common import balancing_loss, normalize, scaled, select, z_loss


def top_k(logits_TE: torch.Tensor, probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Expert ids [T, K] as the reference picks them: the first by argmax of the probabilities,
    each next one by argmax of the logits with earlier choices masked (ties: lowest id)."""
    idx = [probs_TE.argmax(dim=-1)]
    masked = logits_TE
    for _ in range(1, k):
        masked = masked.scatter(-1, idx[-1].unsqueeze(-1), float("-inf"))
        idx.append(masked.argmax(dim=-1))
    return torch.stack(idx, dim=1)


class SoftmaxGate(Gate):
    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE.softmax(dim=-1)

    def choose(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        if self.cfg.router_num_groups is None:
            return top_k(logits_TE, scores_TE, k)
        # Megatron-Core scores the groups on the probabilities with --moe-router-pre-softmax and
        # on the logits otherwise (the same experts inside a group, not the same groups)
        return select(scores_TE if self._mode() == "none" else logits_TE, k, self.cfg)

    def _mode(self) -> str:
        return "none" if self.cfg.pre_softmax else self.cfg.gate_normalization

    def normalize(self, prob_A: torch.Tensor, keep_A: torch.Tensor, T: int, K: int) -> torch.Tensor:
        return scaled(normalize(prob_A, keep_A, T, K, self._mode()), self.cfg)

    def losses(self, logits_TE, probs_TE, idx_TK, first_E, counts_E, num_sequences=None):
        first_prob_T = probs_TE.gather(1, idx_TK[:, :1]).squeeze(1)
        return (balancing_loss(self.cfg, probs_TE, idx_TK, counts_E, num_sequences,
                               self.global_load, self.groups.dp.size),
                self._z_loss(logits_TE, first_prob_T, idx_TK[:, :1]))

    def _z_loss(self, logits_TE, first_prob_T, first_T1) -> torch.Tensor:
        """mean over tokens of logsumexp(logits)^2. With a zero coefficient it is only logged: then
        logsumexp = logit - log(prob) at the first choice (the largest probability, >= 1/E, so the
        log is well conditioned; within 1e-7 of logsumexp), two ops on [T] instead of five on
        [T, E], the largest part of the router's forward on CPUs."""
        if self.cfg.z_loss_coeff != 0 or self.cfg.router_num_groups is not None:
            return z_loss(logits_TE, self.cfg.z_loss_coeff)
        with torch.no_grad():
            lse_T = logits_TE.gather(1, first_T1).squeeze(1) - first_prob_T.log()
            return lse_T.square().mean()
