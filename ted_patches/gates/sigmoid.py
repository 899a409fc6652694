"""The sigmoid gate of DeepSeek-V3 / GLM-4.5 / dots.llm1 (Megatron-Core's
--moe-router-score-function sigmoid), with aux-loss-free balancing: an fp32 per-expert bias added
to the scores for the SELECTION only (--moe-router-enable-expert-bias), moved after each optimizer
step towards equal loads (--moe-router-bias-update-rate).

Shapes: T tokens, E experts, K top-k, A = K * T assignments (choice-major).
Weights: the chosen sigmoid scores (without the bias), normalized over the K choices as
configured (Megatron-Core: over the K with 1e-20 added, top-1 raw), times the scaling factor.
Balancing losses see the scores normalized over all E (Megatron-Core's aux scores).

The bias: a state buffer (megatron.model.params.set_buffer_spec) replicated on every rank and
kept in fp32 whatever the model's dtype. `after_step` sums the step's per-expert counts over the
data-parallel group (every rank that routes distinct tokens; the TP ranks of a DP rank route the
same ones), so every rank applies the same update and the bias stays identical everywhere.
"""

from __future__ import annotations

import torch

from megatron.model.params import set_buffer_spec
from megatron.parallel import comm
from ted_patches.gates import Gate
from ted_patches.gates.common import balancing_loss, normalize, scaled, select, z_loss


class SigmoidGate(Gate):
    def __init__(self, cfg, groups):
        super().__init__(cfg, groups)
        if cfg.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
            set_buffer_spec(self, "expert_bias")
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` moves the bias but keeps it fp32 (a bf16 bias would round away updates)."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None:
            self._buffers["expert_bias"] = bias.to(device=self.expert_bias.device)
        return self

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits_TE)

    def choose(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        if self.expert_bias is None:
            return select(scores_TE, k, self.cfg)
        return select(scores_TE + self.expert_bias, k, self.cfg)

    def normalize(self, score_A: torch.Tensor, keep_A: torch.Tensor, T: int,
                  K: int) -> torch.Tensor:
        # --moe-router-pre-softmax is the softmax gate's (Megatron-Core ignores it here too)
        mode = self.cfg.gate_normalization
        return scaled(normalize(score_A, keep_A, T, K, mode, eps=1e-20), self.cfg)

    def losses(self, logits_TE, scores_TE, idx_TK, first_E, counts_E, num_sequences=None):
        probs_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
        return (balancing_loss(self.cfg, probs_TE, idx_TK, counts_E, num_sequences,
                               self.global_load, self.groups.dp.size),
                z_loss(logits_TE, self.cfg.z_loss_coeff))

    @torch.no_grad()
    def after_step(self, counts_E: torch.Tensor, skipped: bool) -> None:
        """bias += rate * sign(mean load - load), the loads summed over the step's micro-batches
        and the data-parallel group (Megatron-Core's get_updated_expert_bias); nothing when the
        optimizer skipped the step."""
        super().after_step(counts_E, skipped)
        if self.expert_bias is None or skipped:
            return
        load_E = comm.all_reduce_(counts_E.to(torch.float64).clone(), self.groups.dp)
        offset_E = load_E.mean() - load_E
        self.expert_bias += torch.sign(offset_E).to(torch.float32) * self.cfg.bias_update_rate
