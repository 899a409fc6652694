"""This rank's experts as batched GEMMs, each expert split over TP like Megatron's MLP.

Shapes: E_l local experts, N tokens per expert (capacity slots from every EP and TP peer),
H hidden, F ffn per TP rank (2F for SwiGLU's [gate | up]).

    w1_EHF  [E_l, H, F]   column-parallel (split on F)    b1_EF [E_l, F]  split on F
    w2_EFH  [E_l, F, H]   row-parallel (split on F)       b2_EH [E_l, H]  replicated over TP

Weights are stored [in, out] so both GEMMs are plain x @ W batched products: on these CPUs
that ran fwd+bwd in 77-81 ms against 81-85 ms for nn.Linear's [out, in] layout through a
transposed view, and 80-102 ms for a loop of nn.Linear (E=8, C=512, H=256, F=1024, fp32).
`forward` returns fc2's output BEFORE its TP reduction and the fc2 bias apart (Megatron's
skip_bias_add): the dispatcher fuses that reduction with the DTD drop into one reduce-scatter.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.model.config import ModelConfig
from megatron.model.params import set_spec
from megatron.model.transformer import activation, output_std
from ted_patches.topology import TEDGroups


class GroupedExperts(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, num_local_experts: int, ffn_hidden_size: int, groups: TEDGroups):
        super().__init__()
        self.cfg = cfg
        tp = groups.tp.size
        stride = 2 if cfg.swiglu else 1
        f, h, e = ffn_hidden_size // tp, cfg.hidden_size, num_local_experts
        expert = dict(expert=True)
        self.w1 = set_spec(torch.nn.Parameter(torch.empty(e, h, stride * f)), init="normal",
                           std=cfg.init_method_std, tp_dim=2, tp_stride=stride, **expert)
        self.w2 = set_spec(torch.nn.Parameter(torch.empty(e, f, h)), init="normal", std=output_std(cfg),
                           tp_dim=1, **expert)
        self.b1 = self.b2 = None
        if cfg.add_bias_linear:
            self.b1 = set_spec(torch.nn.Parameter(torch.empty(e, stride * f)), init="zeros", tp_dim=1,
                               tp_stride=stride, **expert)
            self.b2 = set_spec(torch.nn.Parameter(torch.empty(e, h)), init="zeros", **expert)

    def forward(self, x_ENH: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        e, n = x_ENH.shape[:2]
        chunk = _experts_per_chunk(x_ENH.device, e, n * self.w1.shape[-1])
        if chunk == e:
            return self._mlp(x_ENH, slice(None)), self.b2
        parts = [self._mlp(x_ENH[i:i + chunk], slice(i, i + chunk)) for i in range(0, e, chunk)]
        return torch.cat(parts), self.b2

    def _mlp(self, x_ENH: torch.Tensor, experts: slice) -> torch.Tensor:
        w1, w2 = self.w1[experts], self.w2[experts]
        if self.b1 is None:
            h_ENF = torch.bmm(x_ENH, w1)
        else:
            h_ENF = torch.baddbmm(self.b1[experts].unsqueeze(1), x_ENH, w1)
        return torch.bmm(activation(self.cfg, h_ENF), w2)


# On CPUs the activation between the two GEMMs is memory-bound: computing a few experts at a time
# keeps each chunk's [n, F] activation (and, in backward, its gradient) in the last-level cache.
# Measured here, one thread, 4 experts x 1024 tokens x F=1024: 153 ms in chunks of 2 against 163-168
# ms as one batch; with 2 threads and 8 x 512 one batch (87 ms) and chunks of 4 (89 ms) tie.
# Accelerators run one batched GEMM.
_CPU_ACTIVATION_BUDGET = 2**21  # elements of [chunk, n, F] per chunk (8 MiB in fp32)


def _experts_per_chunk(device: torch.device, experts: int, activation_per_expert: int) -> int:
    if device.type != "cpu":
        return experts
    return max(1, min(experts, _CPU_ACTIVATION_BUDGET // max(activation_per_expert, 1)))


def reference_expert_loop(experts: GroupedExperts, x_ENH: torch.Tensor) -> torch.Tensor:
    """The same computation one expert at a time (tests)."""
    out = []
    for i in range(x_ENH.shape[0]):
        h = x_ENH[i] @ experts.w1[i]
        if experts.b1 is not None:
            h = h + experts.b1[i]
        out.append(activation(experts.cfg, h) @ experts.w2[i])
    return torch.stack(out)
