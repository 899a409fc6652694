"""Qwen2-MoE (Qwen2MoeForCausalLM): like Mixtral, but dense SwiGLU layers may sit between MoE
layers (mlp_only_layers) and the gates may stay raw probabilities (norm_topk_prob false:
DeepSpeed's top-1); its always-present shared expert is written as zeros, contributing exactly
0. Export only."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.convert import llama
from megatron.convert.allowlist import Declaration, any_value
from megatron.convert.common import renormalized_over_topk
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "qwen2_moe", "Qwen2MoeForCausalLM"
# Qwen2-MoE always has a shared expert; ours is absent, written as zeros of the smallest width.
SHARED_WIDTH = 1


EXPRESSES = Declaration(
    FORMAT,
    model=llama.model_rules(FORMAT),
    dense_refused="a dense model (no --num-experts): qwen2_moe is a mixture of experts",
    moe={
        **llama.moe_rules(FORMAT),
        # written to config.json: layers as mlp_only_layers, the gate normalization (with topk)
        # as norm_topk_prob, expert_ffn_hidden_size as moe_intermediate_size
        **any_value("num_experts", "layers", "topk", "gate_normalization",
                    "expert_ffn_hidden_size", "aux_loss_coeff"),
    },
)


def _moe_block(model: ModelConfig, moe: MoEConfig, dtype: Optional[torch.dtype]):
    def block(tensors, ours: str, theirs: str) -> dict:
        return {**llama.experts(tensors, ours + "mlp.", theirs + "mlp.", moe.num_experts,
                                ("gate_proj", "up_proj", "down_proj")),
                **_zero_shared_expert(theirs + "mlp.", model.hidden_size, dtype)}
    return block


def _zero_shared_expert(theirs: str, hidden: int, dtype) -> dict[str, torch.Tensor]:
    # sigmoid(gate . x) * down(silu(gate_proj x) * up_proj x) with every weight 0 is exactly 0
    w = SHARED_WIDTH
    return {theirs + "shared_expert.gate_proj.weight": torch.zeros(w, hidden, dtype=dtype),
            theirs + "shared_expert.up_proj.weight": torch.zeros(w, hidden, dtype=dtype),
            theirs + "shared_expert.down_proj.weight": torch.zeros(hidden, w, dtype=dtype),
            theirs + "shared_expert_gate.weight": torch.zeros(1, hidden, dtype=dtype)}


def hub_tensors(tensors, model: ModelConfig, moe: MoEConfig,
                dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    return llama.hub_tensors(tensors, model, moe, _moe_block(model, moe, dtype))


def hub_config(model: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> dict:
    ffn = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    return {**llama.hub_config(FORMAT, ARCHITECTURE, model, moe, dtype),
            "intermediate_size": model.ffn_hidden_size, "moe_intermediate_size": ffn,
            "num_experts": moe.num_experts, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(model.num_layers) if i not in moe.layers],
            "norm_topk_prob": renormalized_over_topk(moe),
            "shared_expert_intermediate_size": SHARED_WIDTH, "qkv_bias": False,
            "use_sliding_window": False, "sliding_window": None}
