"""What Mixtral and Qwen2-MoE share (Llama's layers: RMSNorm, RoPE, SwiGLU, separate q/k/v
projections, no biases): their tensor names outside the MoE block and their config.json keys.
Each format declares what it can express in its own module."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.convert.common import base_config, query_groups, split_qkv, transpose
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

# (stored tensors, our layer prefix "layers.i.", the Hub's "model.layers.i.") -> Hub tensors
MoEBlock = Callable[[dict, str, str], dict]


def hub_tensors(tensors, model: ModelConfig, moe: MoEConfig,
                moe_block: MoEBlock) -> dict[str, torch.Tensor]:
    """{Hub name: tensor}; `moe_block` maps one MoE layer's MLP, a layer outside moe.layers gets
    a dense SwiGLU MLP."""
    hf = {"model.embed_tokens.weight": tensors["embedding.weight"],
          "model.norm.weight": tensors["final_norm.weight"]}
    if model.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = tensors["output.weight"]
    for i in range(model.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        hf[theirs + "input_layernorm.weight"] = tensors[ours + "input_norm.weight"]
        hf[theirs + "post_attention_layernorm.weight"] = (
            tensors[ours + "post_attention_norm.weight"])
        q, k, v = split_qkv(tensors[ours + "attention.qkv.weight"], model.num_attention_heads,
                            query_groups(model))
        attn = theirs + "self_attn."
        hf.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v,
                   attn + "o_proj.weight": tensors[ours + "attention.proj.weight"]})
        if i not in moe.layers:  # qwen2_moe only (mixtral's declaration requires MoE everywhere)
            hf.update(dense_swiglu(tensors, ours + "mlp.", theirs + "mlp."))
        else:
            hf.update(moe_block(tensors, ours, theirs))
    return hf


def dense_swiglu(tensors, ours: str, theirs: str) -> dict[str, torch.Tensor]:
    # our column/row-parallel weights are [out, in] like nn.Linear's
    return {theirs + "gate_proj.weight": tensors[ours + "fc1.weight.gate"],
            theirs + "up_proj.weight": tensors[ours + "fc1.weight.up"],
            theirs + "down_proj.weight": tensors[ours + "fc2.weight"]}


def experts(tensors, ours: str, theirs: str, num_experts: int,
            names: tuple[str, str, str]) -> dict:
    """Router and experts; our expert weights are [in, out], the Hub's nn.Linear [out, in]."""
    gate, up, down = names
    out = {theirs + "gate.weight": tensors[ours + "router.weight"]}
    for e in range(num_experts):
        src, dst = f"{ours}experts.{e}.", f"{theirs}experts.{e}."
        out[dst + gate + ".weight"] = transpose(tensors[src + "w1.gate"])
        out[dst + up + ".weight"] = transpose(tensors[src + "w1.up"])
        out[dst + down + ".weight"] = transpose(tensors[src + "w2"])
    return out


def hub_config(fmt: str, architecture: str, model: ModelConfig, moe: MoEConfig,
               dtype: Optional[torch.dtype]) -> dict:
    """The config.json keys Mixtral and Qwen2-MoE share."""
    return {**base_config(fmt, architecture, model, dtype),
            "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": query_groups(model), "head_dim": model.head_dim,
            "hidden_act": "silu", "max_position_embeddings": model.max_position_embeddings,
            "rms_norm_eps": model.norm_epsilon, "attention_dropout": model.attention_dropout,
            # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta
            "rope_theta": model.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base},
            "num_experts_per_tok": moe.topk, "router_aux_loss_coef": moe.aux_loss_coeff,
            "output_router_logits": False}
