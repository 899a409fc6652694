"""Shared experts (Megatron-Core's --moe-shared-expert-intermediate-size; DeepSeek-MoE, Qwen2-MoE):
a dense MLP every token passes through, beside the routed experts of an MoE layer, its output
added to theirs. Several shared experts of width f are one of width n * f (Megatron-Core's
convention: the flag gives the total).

Split over TP exactly like the dense MLP (megatron/model/transformer.py's MLP with the same
ModelParallelConfig): fc1 column-parallel, activation, fc2 row-parallel; one TP all-reduce
forward (fc2's) and one backward (fc1's input gradient). Its parameters are ordinary non-expert
parameters: replicated over EP, gradients averaged over DP.

Gated (--moe-shared-expert-gate, Qwen2-MoE's `shared_expert_gate`): the output is scaled per
token by sigmoid(x . w_gate), w_gate [1, H] replicated over TP (its input and the MLP's reduced
output are identical on the TP ranks, so its gradient is too).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.model.config import ModelConfig
from megatron.model.params import set_spec
from megatron.model.transformer import MLP, megatron_parallel_config
from megatron.parallel.topology import TEDGroups


class SharedExpert(MLP):
    def __init__(self, model_cfg: ModelConfig, size: int, gate: bool, groups: TEDGroups):
        """`size`: the shared expert's FFN width (all shared experts together), split over TP."""
        cfg = dataclasses.replace(model_cfg, ffn_hidden_size=size)
        super().__init__(cfg, megatron_parallel_config(model_cfg, groups), groups)
        self.gate = None
        if gate:
            self.gate = torch.nn.Linear(model_cfg.hidden_size, 1, bias=False)
            # under sequence parallelism it sees this rank's tokens only: partial over TP
            set_spec(self.gate.weight, init="normal", std=model_cfg.init_method_std,
                     sequence_parallel=groups.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] (replicated over TP; under sequence parallelism [b, s/TP, H], this rank's
        part) -> the same shape and placement."""
        y, _ = super().forward(x)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return y
