"""Qwen2-MoE (Qwen2MoeForCausalLM): like Mixtral, but dense SwiGLU layers may sit between MoE
layers (mlp_only_layers) and the gates may stay raw probabilities (norm_topk_prob false:
DeepSpeed's top-1); its always-present shared expert is written as zeros, contributing exactly
0. Export only."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.convert import llama
from megatron.convert.allowlist import Declaration, any_value, only, when
from megatron.convert.common import renormalized_over_topk
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "qwen2_moe", "Qwen2MoeForCausalLM"
# Qwen2-MoE always has a shared expert; ours is absent, written as zeros of the smallest width.
SHARED_WIDTH = 1


def _pyramid(counts, model, moe) -> str:
    counts = counts or (moe.num_experts,)
    return (f"a different expert count per MoE layer (pyramid MoE, --num-experts "
            f"{' '.join(map(str, counts))}): qwen2_moe has one num_experts")


EXPRESSES = Declaration(
    FORMAT,
    model={
        "normalization": only("RMSNorm", message="LayerNorm: qwen2_moe uses RMSNorm "
                                                 "(--normalization RMSNorm)"),
        "position_embedding_type": only("rope",
                                        message="learned absolute positions: qwen2_moe uses RoPE "
                                                "(--position-embedding-type rope)"),
        "swiglu": only(True, message="a GELU MLP: qwen2_moe uses SwiGLU (--swiglu)"),
        "add_bias_linear": only(False, message="biases in the linear layers: qwen2_moe has none "
                                               "(--disable-bias-linear)"),
        # written to config.json (num_key_value_heads for num_query_groups; ffn_hidden_size is
        # the dense layers' intermediate_size)
        **any_value("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "ffn_hidden_size", "rotary_base", "norm_epsilon",
                    "untie_embeddings_and_output_weights", "attention_dropout", "init_method_std",
                    "num_query_groups"),
        # not the function: dropout is training's, the dtype the export's (--dtype), padded rows
        # are never stored
        **any_value("hidden_dropout", "params_dtype", "padded_vocab_size"),
    },
    dense_refused="a dense model (no --num-experts): qwen2_moe is a mixture of experts",
    moe={
        "experts_per_layer": when(lambda counts, model, moe: len(set(counts or ())) <= 1,
                                  _pyramid),
        "mlp_type": only("standard", message="residual MoE (--mlp-type residual): its dense MLP "
                                             "mixed by a learned softmax gate has no counterpart "
                                             "in qwen2_moe"),
        "score_function": only("softmax", message=lambda name, model, moe:
                               f"a {name} router (MoEConfig.score_function {name!r}): qwen2_moe's "
                               "router is a softmax (--moe-router-score-function softmax)"),
        # written to config.json: layers as mlp_only_layers, the gate normalization (with topk)
        # as norm_topk_prob, expert_ffn_hidden_size as moe_intermediate_size
        **any_value("num_experts", "layers", "topk", "gate_normalization",
                    "expert_ffn_hidden_size", "aux_loss_coeff"),
        # no expert capacity in Hugging Face models: an export computes ours with no token
        # dropped (--disable-moe-token-dropping), whatever the capacity settings
        **any_value("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens",
                    "drop_policy"),
        # training's losses and noise, and how (not what) we compute: the function is the same
        **any_value("aux_loss_type", "z_loss_coeff", "jitter_eps", "dtd", "pad_free",
                    "check_tp_routing"),
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
