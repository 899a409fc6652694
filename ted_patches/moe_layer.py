"""The TED MoE layer: route -> dispatch -> experts -> combine (see dispatcher.py for the data
flow and its collectives). It stands in a transformer layer's MLP slot and returns `(y, aux)`.

Two dispatch paths give the same kept tokens, outputs and gradients (within fp32 rounding):
padded (capacity buffers, no host synchronization in drop mode) and padding-free (only kept
tokens sent and computed, one count exchange; the experts see packed rows, or rows padded only to
the largest local expert where that costs <= 5%). `MoEConfig.pad_free` picks one; None picks
padding-free on CPUs and in no-drop mode, padded on accelerators in drop mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.model.config import ModelConfig
from megatron.model.params import set_spec
from megatron.model.transformer import MLP, megatron_parallel_config
from megatron.parallel import comm
from ted_patches.config import MoEConfig
from ted_patches.dispatcher import Dispatcher
from ted_patches.experts import GroupedExperts
from ted_patches.router import Router, my_tokens, sequence_split
from ted_patches.shared_expert import SharedExpert
from megatron.parallel.topology import TEDGroups


@dataclass(frozen=True)
class MoEAux:
    """One MoE layer's auxiliary outputs for one micro-batch. Tensors stay on the device (reading
    `dropped` or `counts_E` is the reader's host synchronization, not the layer's)."""

    layer: int  # the transformer layer this MoE layer stands in
    loss: torch.Tensor  # aux_loss_coeff * aux + z_loss_coeff * z: added to the LM loss
    aux_loss: torch.Tensor  # unweighted, detached (for logging)
    z_loss: torch.Tensor  # unweighted, detached
    kept_count: torch.Tensor  # assignments kept (0-d)
    num_assignments: int  # T * K
    counts_E: torch.Tensor  # assignments per expert before dropping

    @property
    def dropped(self) -> float:
        """Fraction of the T*K assignments dropped."""
        return 1.0 - float(self.kept_count) / self.num_assignments


@dataclass(frozen=True)
class StepMeasurements:
    """What the MoE layers measured over one whole training step on this rank (all its
    micro-batches), handed to them after the optimizer step."""

    # MoE layer index -> assignments per expert, before dropping
    expert_counts: dict[int, torch.Tensor]
    skipped: bool  # the optimizer skipped the step (fp16 overflow)


def after_optimizer_step(model: torch.nn.Module, measured: StepMeasurements) -> None:
    """Every rank, after each optimizer step: each MoE layer's router receives its step's counts
    (a gate that learns from the load, e.g. a selection bias, updates here)."""
    for module in model.modules():
        if isinstance(module, MoELayer) and module.layer in measured.expert_counts:
            module.router.after_step(measured.expert_counts[module.layer], measured.skipped)


class MoELayer(torch.nn.Module):
    def __init__(self, model_cfg: ModelConfig, cfg: MoEConfig, groups: TEDGroups,
                 layer: Optional[int] = None):
        """`layer`: the index of the transformer layer it stands in (None: stand-alone, as 0)."""
        super().__init__()
        cfg.check_layout(groups.topology)
        self.cfg, self.groups, self.layer = cfg, groups, 0 if layer is None else layer
        ffn = cfg.expert_ffn_hidden_size or model_cfg.ffn_hidden_size
        self.router = Router(model_cfg.hidden_size, cfg, groups, std=model_cfg.init_method_std)
        # group-limited routing: a token reaches few EP ranks; send it once to each
        self.dispatcher = Dispatcher(groups, cfg.num_experts, cfg.topk, cfg.dtd,
                                     per_rank=cfg.router_num_groups is not None)
        self.experts = GroupedExperts(model_cfg, cfg.num_experts // groups.ep.size, ffn, groups)
        if cfg.mlp_type == "residual":  # Megatron-DeepSpeed's residual MoE
            self.dense = MLP(model_cfg, megatron_parallel_config(model_cfg, groups), groups)
            self.mix = torch.nn.Linear(model_cfg.hidden_size, 2)
            sp = groups.sequence_parallel  # on this rank's tokens only: partial over TP
            set_spec(self.mix.weight, init="normal", std=model_cfg.init_method_std,
                     sequence_parallel=sp)
            set_spec(self.mix.bias, init="zeros", sequence_parallel=sp)
        self.shared_expert = None  # beside the routed experts, split over TP like the dense MLP
        if cfg.shared_expert_intermediate_size is not None:
            self.shared_expert = SharedExpert(model_cfg, cfg.shared_expert_intermediate_size,
                                              cfg.shared_expert_gate, groups)
        self.forwards = 0  # forward calls (recomputes included), for --check-tp-routing

    def pad_free(self, device: torch.device) -> bool:
        if self.cfg.pad_free is not None:
            return self.cfg.pad_free
        return device.type == "cpu" or not self.cfg.drop_tokens or self.groups.cp.size > 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """x: [b, s, h] (or [T, h]); under sequence or context parallelism this rank's part
        [b, s/TP, h] or [b, s/CP, h] (megatron.parallel.context): the router decides over the
        whole sequence (as one process does) and each rank sends its own tokens, so the output is
        this rank's part too."""
        H = x.shape[-1]
        x_TH = x.reshape(-1, H)
        pad_free = self.pad_free(x.device)
        routing = self.router(x_TH, pad_free=pad_free,
                              num_sequences=x.shape[0] if x.dim() == 3 else None)
        self._check_tp_routing(routing)
        tp, sp = self.groups.tp, self.groups.sequence_parallel
        if not sequence_split(self.groups):
            y_TH = self._experts(x_TH, routing, pad_free)
        elif pad_free:  # my tokens, routed as part of the whole (CP without SP: the TP ranks
            # share them, cut by DTD as without any split)
            mine = my_tokens(x.shape[0], x.shape[1], self.groups, x.device)
            y_TH = self._experts(x_TH, routing.restrict(mine), pad_free, own=sp)
        elif self.groups.cp.size > 1:
            raise ValueError("context parallelism: the MoE layer sends each rank's own tokens "
                             "padding-free (--no-moe-pad-free is not supported with it)")
        else:  # padded: the capacity slices of the whole sequence, as DTD cuts them
            whole_TH = comm.gather_sequence(x, tp, replicated=True).reshape(-1, H)
            whole_TH = self._experts(whole_TH, routing, pad_free, sequence_split=True)
            y_TH = whole_TH.view(x.shape[0], tp.size, -1, H)[:, tp.rank].reshape(-1, H)
        if self.cfg.mlp_type == "residual":
            dense, _ = self.dense(x)
            coef_T2 = self.mix(x_TH).softmax(dim=-1)
            y_TH = y_TH * coef_T2[:, :1] + dense.reshape(-1, H) * coef_T2[:, 1:]
        if self.shared_expert is not None:
            y_TH = y_TH + self.shared_expert(x).reshape(-1, H)
        return y_TH.view_as(x), self._aux(routing)

    def _experts(self, x_TH, routing, pad_free: bool, *, own: bool = False,
                 sequence_split: bool = False) -> torch.Tensor:
        """Dispatch, the local experts, combine (dispatcher.py: `own`, the tokens are this rank's
        alone; `sequence_split`, they are the whole sequence but this rank uses its part only)."""
        bias = self.dispatcher.fc2_bias(self.experts.b2)  # added inside fc2, before its reduction
        if pad_free:
            tokens, counts, plan = self.dispatcher.dispatch_packed(x_TH, routing, own=own)
            if getattr(plan, "packed", None) is not None and plan.packed.tight:
                # nearly equal counts: one bmm over [E_l, max count, H]
                partial = self.experts(tokens, bias)
            else:  # grouped GEMMs over the real rows
                partial = self.experts.forward_packed(tokens, counts, bias)
        else:
            tokens, plan = self.dispatcher.dispatch(x_TH, routing, sequence_split=sequence_split)
            partial = self.experts(tokens, bias)
        return self.dispatcher.combine(partial, plan)

    def _check_tp_routing(self, routing) -> None:
        """--check-tp-routing N: DTD is only correct if the TP ranks route identically (on NCCL a
        1-ulp drift of the replicated gate can flip an argmax). Every N-th forward, compare a
        checksum of the routing over TP (one small all-reduce and a host read) and stop if not."""
        every, tp = self.cfg.check_tp_routing, self.groups.tp
        self.forwards += 1
        if every and tp.size > 1 and (self.forwards - 1) % every == 0:
            try:
                comm.check_same(routing.checksum(), tp,
                                "MoE routing (experts, kept assignments, slots)")
            except comm.ReplicaMismatch as e:
                raise comm.ReplicaMismatch(
                    f"{e}. The TP ranks of this MoE layer routed differently (forward "
                    f"{self.forwards}): DTD and the TP-split experts compute wrong outputs unless "
                    "every TP rank routes identically. The router's replicated weight or its input "
                    "has drifted across TP (on GPUs, e.g. 1-ulp differences from non-deterministic "
                    "reductions flipping an argmax); stopping.") from None

    def _aux(self, routing) -> MoEAux:
        loss = self.cfg.aux_loss_coeff * routing.aux_loss + self.cfg.z_loss_coeff * routing.z_loss
        return MoEAux(self.layer, loss, routing.aux_loss.detach(), routing.z_loss.detach(),
                      routing.keep_A.sum(), routing.keep_A.numel(), routing.counts_E)
