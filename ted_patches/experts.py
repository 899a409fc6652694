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
from megatron.parallel.topology import TEDGroups


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
            return self._mlp(x_ENH, self.w1, self.b1, self.w2), self.b2
        # split, not slicing: split's backward concatenates the chunks' weight gradients, where a
        # slice's would fill a zero tensor of the whole weight per chunk and add them up
        b1 = self.b1.split(chunk) if self.b1 is not None else [None] * -(-e // chunk)
        parts = map(self._mlp, x_ENH.split(chunk), self.w1.split(chunk), b1, self.w2.split(chunk))
        return torch.cat(list(parts)), self.b2

    def _mlp(self, x_ENH, w1_EHF, b1_EF, w2_EFH) -> torch.Tensor:
        if b1_EF is None:
            h_ENF = torch.bmm(x_ENH, w1_EHF)
        else:
            h_ENF = torch.baddbmm(b1_EF.unsqueeze(1), x_ENH, w1_EHF)
        return torch.bmm(activation(self.cfg, h_ENF), w2_EFH)


# On CPUs the activation between the two GEMMs is memory-bound: computing a few experts at a time
# keeps each chunk's [n, F] activation (and, in backward, its gradient) in the last-level cache.
# Measured here, one thread, 4 experts x 1024 tokens x F=1024: 151-157 ms in chunks of 2 against
# 162-168 ms as one batch; with 2 threads, 8 x 512: one batch 87 ms, chunks of 4 89 ms (chunks
# also cost a concatenation of the weight gradients). Accelerators run one batched GEMM.
_CPU_ACTIVATION_BUDGET = 2**21  # elements of [chunk, n, F] per thread (8 MiB in fp32)


def _experts_per_chunk(device: torch.device, experts: int, activation_per_expert: int) -> int:
    if device.type != "cpu":
        return experts
    budget = _CPU_ACTIVATION_BUDGET * torch.get_num_threads()
    return max(1, min(experts, budget // max(activation_per_expert, 1)))

