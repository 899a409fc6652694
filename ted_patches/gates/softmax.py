"""The softmax gate of GShard / Switch / DeepSpeed / Megatron-Core: softmax scores, top-k in the
reference's order, weights renormalized as configured, DeepSpeed's or Megatron-Core's aux loss,
and the z-loss. Shapes: T tokens, E experts, K top-k, A = K * T assignments (choice-major)."""

from __future__ import annotations

import torch

from ted_patches.gates import Gate


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
        return top_k(logits_TE, scores_TE, k)

    def normalize(self, prob_A: torch.Tensor, keep_A: torch.Tensor, T: int, K: int) -> torch.Tensor:
        mode = self.cfg.gate_normalization
        if mode == "none" or (mode == "surviving" and K == 1):
            return prob_A * keep_A
        if mode == "topk":  # over the K choices, before dropping
            return (prob_A.view(K, T) / prob_A.view(K, T).sum(0)).reshape(-1) * keep_A
        kept_KT = (prob_A * keep_A).view(K, T)
        denom_T = kept_KT.sum(0).clamp(min=torch.finfo(prob_A.dtype).eps)
        return (kept_KT / denom_T).reshape(-1)

    def losses(self, logits_TE, probs_TE, idx_TK, first_E, counts_E):
        first_prob_T = probs_TE.gather(1, idx_TK[:, :1]).squeeze(1)
        return (self._aux_loss(probs_TE, first_E, counts_E),
                self._z_loss(logits_TE, first_prob_T, idx_TK[:, :1]))

    def _z_loss(self, logits_TE, first_prob_T, first_T1) -> torch.Tensor:
        """mean over tokens of logsumexp(logits)^2. With a zero coefficient it is only logged: then
        logsumexp = logit - log(prob) at the first choice (the largest probability, >= 1/E, so the
        log is well conditioned; within 1e-7 of logsumexp), two ops on [T] instead of five on
        [T, E], the largest part of the router's forward on CPUs."""
        if self.cfg.z_loss_coeff != 0:
            return torch.logsumexp(logits_TE, -1).square().mean()
        with torch.no_grad():
            lse_T = logits_TE.gather(1, first_T1).squeeze(1) - first_prob_T.log()
            return lse_T.square().mean()

    def _aux_loss(self, probs_TE, first_E, counts_E) -> torch.Tensor:
        T, E = probs_TE.shape
        K, kind = self.cfg.topk, self.cfg.aux_loss_type
        if kind == "none":
            return probs_TE.new_zeros(())
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.aux_loss_coeff != 0):
            me_E = probs_TE.mean(0)
            if kind == "deepspeed" and K <= 2:  # DeepSpeed's top-1/top-2 gates: first choices only
                ce_E = first_E.to(probs_TE.dtype) / T
            else:  # Megatron-Core's switch loss, and DeepSpeed's k >= 3 gate:
                ce_E = counts_E.to(probs_TE.dtype) / (T * K)  # all K choices, divided by K
            return E * (me_E * ce_E).sum()
