"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen2-MoE's layout (dense SwiGLU layers in mlp_only_layers,
softmax top-k gates, renormalized or not by norm_topk_prob) without a shared expert, and with
per-head QK-norm: an RMSNorm over each head's dims, one weight shared by the heads, on q and k
before RoPE (ours: --qk-layernorm with --normalization RMSNorm); head_dim may differ from
hidden / heads (--kv-channels). Export and import."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.convert import llama
from megatron.convert.allowlist import ANY, Declaration, any_value, only
from megatron.convert.common import ConversionError, renormalized_over_topk
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "qwen3_moe", "Qwen3MoeForCausalLM"
_NAMES = ("gate_proj", "up_proj", "down_proj")

EXPRESSES = Declaration(
    FORMAT,
    model={
        **llama.model_rules(FORMAT),
        # Qwen3's attention always normalizes q and k per head (RMSNorm, like the model's norms)
        "qk_layernorm": only(True, message=f"no per-head QK-norm: {FORMAT} normalizes q and k "
                                           "per head (--qk-layernorm)"),
        "kv_channels": ANY,  # written as head_dim
    },
    dense_refused=f"a dense model (no --num-experts): {FORMAT} is a mixture of experts",
    moe={
        **llama.moe_rules(FORMAT),
        "shared_expert_intermediate_size": only(None, message=lambda size, model, moe:
                                                f"a shared expert (--moe-shared-expert-"
                                                f"intermediate-size {size}): {FORMAT} has none; "
                                                "export as qwen2_moe"),
        # only with a shared expert (refused above)
        **any_value("shared_expert_gate"),
        # written to config.json: layers as mlp_only_layers, the gate normalization (with topk)
        # as norm_topk_prob, expert_ffn_hidden_size as moe_intermediate_size
        **any_value("num_experts", "layers", "topk", "gate_normalization",
                    "expert_ffn_hidden_size", "aux_loss_coeff"),
    },
)


def hub_tensors(tensors, model: ModelConfig, moe: MoEConfig,
                dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    def block(tensors, ours: str, theirs: str) -> dict:
        return llama.experts(tensors, ours + "mlp.", theirs + "mlp.", moe.num_experts, _NAMES)
    return llama.hub_tensors(tensors, model, moe, block)


def hub_config(model: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> dict:
    ffn = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    return {**llama.hub_config(FORMAT, ARCHITECTURE, model, moe, dtype),
            "intermediate_size": model.ffn_hidden_size, "moe_intermediate_size": ffn,
            "num_experts": moe.num_experts, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(model.num_layers) if i not in moe.layers],
            "norm_topk_prob": renormalized_over_topk(moe), "attention_bias": False,
            "use_sliding_window": False, "sliding_window": None}


# ---- import -------------------------------------------------------------------------------------
def configs_from_hub(config: dict) -> tuple[ModelConfig, MoEConfig]:
    """Our configs of a Qwen3-MoE config.json (a missing key raises KeyError)."""
    if config.get("attention_bias", False):
        raise ConversionError("config.json: attention_bias true: biases in the attention "
                              "projections are not supported")
    model = llama.model_from_hub(config, ffn_hidden_size=config["intermediate_size"],
                                 qk_layernorm=True, head_dim=True)
    moe = MoEConfig(layers=llama.qwen_moe_layers(config, model.num_layers),
                    **llama.qwen_moe_kwargs(config))
    return model, moe


def from_hub(model: ModelConfig, moe: MoEConfig,
             hf: dict[str, torch.Tensor]) -> tuple[ModelConfig, MoEConfig, dict]:
    model = llama.checked_hub(FORMAT, hub_tensors, model, moe, hf, _shape)
    return model, moe, llama.moe_hub_to_stored(hf, model, moe, _NAMES)


def _shape(name: str, model: ModelConfig, moe: MoEConfig) -> tuple[int, ...]:
    f = (moe.expert_ffn_hidden_size or model.ffn_hidden_size if ".experts." in name
         else model.ffn_hidden_size)
    return llama.moe_shape(name, model, moe, f)
