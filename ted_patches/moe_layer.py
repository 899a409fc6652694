"""The TED MoE layer: route -> dispatch -> experts -> combine (see dispatcher.py for the data
flow and its collectives). It stands in a transformer layer's MLP slot and returns `(y, aux)`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.model.config import ModelConfig
from megatron.model.params import set_spec
from megatron.model.transformer import MLP, megatron_parallel_config
from ted_patches.config import MoEConfig
from ted_patches.dispatcher import Dispatcher
from ted_patches.experts import GroupedExperts
from ted_patches.router import Router
from megatron.parallel.topology import TEDGroups


@dataclass(frozen=True)
class MoEAux:
    """One MoE layer's auxiliary outputs for one micro-batch."""

    loss: torch.Tensor  # aux_loss_coeff * aux + z_loss_coeff * z: added to the LM loss
    aux_loss: torch.Tensor  # unweighted, detached (for logging)
    z_loss: torch.Tensor  # unweighted, detached
    dropped: float  # fraction of the T*K assignments dropped
    counts_E: torch.Tensor  # assignments per expert before dropping


class MoELayer(torch.nn.Module):
    def __init__(self, model_cfg: ModelConfig, cfg: MoEConfig, groups: TEDGroups):
        super().__init__()
        cfg.check_layout(groups.topology)
        self.cfg = cfg
        ffn = cfg.expert_ffn_hidden_size or model_cfg.ffn_hidden_size
        self.router = Router(model_cfg.hidden_size, cfg, groups, std=model_cfg.init_method_std)
        self.dispatcher = Dispatcher(groups, cfg.num_experts, cfg.topk, cfg.dtd)
        self.experts = GroupedExperts(model_cfg, cfg.num_experts // groups.ep.size, ffn, groups)
        if cfg.mlp_type == "residual":  # Megatron-DeepSpeed's residual MoE
            self.dense = MLP(model_cfg, megatron_parallel_config(model_cfg, groups), groups)
            self.mix = torch.nn.Linear(model_cfg.hidden_size, 2)
            set_spec(self.mix.weight, init="normal", std=model_cfg.init_method_std)
            set_spec(self.mix.bias, init="zeros")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        x_TH = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TH)
        tokens, plan = self.dispatcher.dispatch(x_TH, routing)
        partial, bias = self.experts(tokens)
        y_TH = self.dispatcher.combine(partial, bias, plan)
        if self.cfg.mlp_type == "residual":
            dense_TH, _ = self.dense(x_TH)
            coef_T2 = self.mix(x_TH).softmax(dim=-1)
            y_TH = y_TH * coef_T2[:, :1] + dense_TH * coef_T2[:, 1:]
        return y_TH.view_as(x), self._aux(routing, x_TH.shape[0])

    def _aux(self, routing, num_tokens: int) -> MoEAux:
        loss = self.cfg.aux_loss_coeff * routing.aux_loss + self.cfg.z_loss_coeff * routing.z_loss
        dropped = 1.0 - routing.assign_N.numel() / (num_tokens * self.cfg.topk)
        return MoEAux(loss, routing.aux_loss.detach(), routing.z_loss.detach(), dropped, routing.counts_E)
