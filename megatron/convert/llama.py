"""What Mixtral and Qwen2-MoE share (Llama's layers: RMSNorm, RoPE, SwiGLU, separate q/k/v
projections, no biases): their tensor names outside the MoE block and their config.json keys.
Each format declares what it can express in its own module, from the rules they share here."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.convert.allowlist import any_value, only, when
from megatron.convert.common import base_config, query_groups, split_qkv, transpose
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

# (stored tensors, our layer prefix "layers.i.", the Hub's "model.layers.i.") -> Hub tensors
MoEBlock = Callable[[dict, str, str], dict]


def model_rules(fmt: str) -> dict:
    """What a Llama-style format expresses of ModelConfig (allowlist.Declaration's `model`)."""
    return {
        "normalization": only("RMSNorm", message=f"LayerNorm: {fmt} uses RMSNorm "
                                                 "(--normalization RMSNorm)"),
        "position_embedding_type": only("rope",
                                        message=f"learned absolute positions: {fmt} uses RoPE "
                                                "(--position-embedding-type rope)"),
        "swiglu": only(True, message=f"a GELU MLP: {fmt} uses SwiGLU (--swiglu)"),
        "add_bias_linear": only(False, message=f"biases in the linear layers: {fmt} has none "
                                               "(--disable-bias-linear)"),
        # written to config.json (num_key_value_heads for num_query_groups; a format with dense
        # layers writes ffn_hidden_size as their intermediate_size)
        **any_value("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "ffn_hidden_size", "rotary_base", "norm_epsilon",
                    "untie_embeddings_and_output_weights", "attention_dropout", "init_method_std",
                    "num_query_groups"),
        # not the function: dropout is training's, the dtype the export's (--dtype), padded rows
        # are never stored
        **any_value("hidden_dropout", "params_dtype", "padded_vocab_size"),
    }


def moe_rules(fmt: str) -> dict:
    """What every Llama-style MoE format here expresses of MoEConfig alike (the rest, each
    format's own, is declared in its module)."""

    def pyramid(counts, model, moe) -> str:
        counts = counts or (moe.num_experts,)
        return (f"a different expert count per MoE layer (pyramid MoE, --num-experts "
                f"{' '.join(map(str, counts))}): {fmt} has one num_experts")

    return {
        "experts_per_layer": when(lambda counts, model, moe: len(set(counts or ())) <= 1,
                                  pyramid),
        "mlp_type": only("standard", message="residual MoE (--mlp-type residual): its dense MLP "
                                             "mixed by a learned softmax gate has no counterpart "
                                             f"in {fmt}"),
        "score_function": only("softmax", message=lambda name, model, moe:
                               f"a {name} router (MoEConfig.score_function {name!r}): {fmt}'s "
                               "router is a softmax (--moe-router-score-function softmax)"),
        # no expert capacity in Hugging Face models: an export computes ours with no token
        # dropped (--disable-moe-token-dropping), whatever the capacity settings
        **any_value("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens",
                    "drop_policy"),
        # training's losses and noise, and how (not what) we compute: the function is the same
        **any_value("aux_loss_type", "z_loss_coeff", "jitter_eps", "dtd", "pad_free",
                    "check_tp_routing"),
    }


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
