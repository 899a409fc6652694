"""Token dispatch to the experts and combine back, over EP (all-to-all) and TP (DTD).

Shapes: T tokens, H hidden, E experts (E_l = E / EP local ones), C capacity, S capacity slices
(TP with DTD, else 1), Cs = C / S, N kept assignments.

The capacity buffer is laid out [S, E, Cs, H]: slot c of expert e lives at (c // Cs, e, c % Cs),
so a TP rank's DTD slice is one contiguous block and the buffer's a2a chunks are EP ranks.

Forward (docs/architecture.md, "One MoE layer", steps 2-9), with DTD:
    dispatch   x_TH -> buffer [S, E, Cs, H] (replicated over TP)
               drop: my slice [E, Cs, H]                     backward: all-gather over TP
               all-to-all over EP -> [EP, E_l, Cs, H]        backward: all-to-all
               all-gather over TP -> [TP, EP, E_l, Cs, H]    backward: reduce-scatter over TP
               -> expert-major [E_l, TP * EP * Cs, H]
    experts    fc1 column-parallel, activation, fc2 row-parallel WITHOUT its TP reduction
    combine    reduce-scatter over TP -> my slice [EP, E_l, Cs, H]   backward: all-gather
               + fc2 bias (its grad: all-reduce over TP, as the slice is split)
               all-to-all over EP back -> [E, Cs, H]                 backward: all-to-all
               all-gather over TP -> [S, E, Cs, H]                    backward: keep my slice
               gate-weighted sum into y_TH (dropped tokens get 0: the residual carries them)
Without DTD the buffer is one slice, the all-to-alls carry TP times the bytes, the experts'
input is copied into the TP region (backward: all-reduce) and their output all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.parallel import comm
from ted_patches.router import Routing
from megatron.parallel.topology import TEDGroups


@dataclass(frozen=True)
class DispatchPlan:
    """What combine needs from dispatch; nothing is kept on the module between the two."""

    assign_N: torch.Tensor  # kept assignments, as choice * T + token
    row_N: torch.Tensor  # row of each kept assignment in the flat [S * E * Cs] buffer
    weight_N: torch.Tensor
    num_tokens: int
    topk: int
    slices: int  # S
    slot_per_slice: int  # Cs


class Dispatcher:
    def __init__(self, groups: TEDGroups, num_experts: int, topk: int, dtd: bool):
        self.groups, self.num_experts, self.topk = groups, num_experts, topk
        self.dtd = dtd and groups.tp.size > 1
        self.local_experts = num_experts // groups.ep.size

    def dispatch(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        g, E, H = self.groups, self.num_experts, x_TH.shape[-1]
        S = g.tp.size if self.dtd else 1
        Cs = routing.capacity // S
        row_N = ((routing.slot_N // Cs) * E + routing.expert_N) * Cs + routing.slot_N % Cs
        # Gather through the [K * T] assignment rows: every index is distinct, so the backward
        # scatter needs no atomics and the K copies of a token are summed in a fixed order (GPUs
        # included): TP ranks stay bit-identical.
        x_AH = x_TH.repeat(self.topk, 1) if self.topk > 1 else x_TH
        buffer = x_TH.new_zeros(S * E * Cs, H).index_copy(0, row_N, x_AH.index_select(0, routing.assign_N))
        mine_ECH = comm.drop(buffer.view(S, E, Cs, H), g.tp) if self.dtd else buffer.view(E, Cs, H)
        recv = comm.all_to_all(mine_ECH, g.ep).view(g.ep.size, self.local_experts, Cs, H)
        if self.dtd:
            recv = comm.gather_to_split(recv, g.tp)
        else:
            recv = comm.copy_to_split(recv, g.tp).unsqueeze(0)
        tokens = recv.permute(2, 0, 1, 3, 4).reshape(self.local_experts, -1, H)
        plan = DispatchPlan(routing.assign_N, row_N, routing.weight_N, x_TH.shape[0], self.topk, S, Cs)
        return tokens, plan

    def combine(self, partial_ENH: torch.Tensor, bias_EH: Optional[torch.Tensor], plan: DispatchPlan) -> torch.Tensor:
        """partial_ENH: the experts' fc2 output before its TP reduction, token order as dispatched."""
        g, H = self.groups, partial_ENH.shape[-1]
        y = partial_ENH.view(self.local_experts, plan.slices, g.ep.size, plan.slot_per_slice, H)
        y = y.permute(1, 2, 0, 3, 4)  # [S, EP, E_l, Cs, H]
        if self.dtd:
            y = comm.reduce_scatter(y, g.tp)
            bias_EH = None if bias_EH is None else comm.copy_to_split(bias_EH, g.tp)
        else:
            y = comm.reduce_from_split(y[0], g.tp)
        if bias_EH is not None:
            y = y + bias_EH[None, :, None, :]
        back = comm.all_to_all(y, g.ep)  # [EP owner, E_l, Cs, H] = [E, Cs, H]
        full = comm.gather_to_replicated(back, g.tp) if self.dtd else back
        picked_NH = full.reshape(-1, H).index_select(0, plan.row_N) * plan.weight_N.to(full.dtype)[:, None]
        y_AH = picked_NH.new_zeros(plan.topk * plan.num_tokens, H).index_copy(0, plan.assign_N, picked_NH)
        return y_AH.view(plan.topk, plan.num_tokens, H).sum(0)  # a fixed order, as in dispatch
