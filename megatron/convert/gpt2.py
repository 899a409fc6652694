"""GPT-2 (GPT2LMHeadModel): dense, LayerNorm, learned positions, exact GELU; a model without
biases gets zero biases (the same function). Export only."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.convert.allowlist import Declaration, any_value, only, when
from megatron.convert.common import base_config, query_groups, split_qkv, transpose
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "gpt2", "GPT2LMHeadModel"

EXPRESSES = Declaration(
    FORMAT,
    moe_refused="MoE layers (--num-experts): GPT-2 is dense; export as mixtral or qwen2_moe",
    model={
        "normalization": only("LayerNorm", message="RMSNorm: GPT-2 uses LayerNorm "
                                                   "(--normalization LayerNorm)"),
        "position_embedding_type": only("learned_absolute",
                                        message="RoPE: GPT-2 uses learned absolute positions "
                                                "(--position-embedding-type learned_absolute)"),
        "swiglu": only(False, message="SwiGLU: GPT-2's MLP is GELU (drop --swiglu)"),
        "num_query_groups": when(
            lambda groups, model, moe: query_groups(model) == model.num_attention_heads,
            "grouped-query attention (--group-query-attention): GPT-2 has a key and value per "
            "head"),
        # written to config.json
        **any_value("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "ffn_hidden_size", "norm_epsilon",
                    "untie_embeddings_and_output_weights", "hidden_dropout",
                    "attention_dropout", "init_method_std"),
        # no biases: zero biases compute the same; rotary_base: no RoPE with learned positions;
        # the dtype is the export's (--dtype); padded rows are never stored
        **any_value("add_bias_linear", "rotary_base", "params_dtype", "padded_vocab_size"),
        # attention variants: GPT-2's heads are n_embd / n_head wide, its q and k plain
        "kv_channels": when(lambda d, model, moe: model.head_dim * model.num_attention_heads
                            == model.hidden_size,
                            lambda d, model, moe: f"--kv-channels {d}: GPT-2's head dim is "
                            f"hidden / heads = {model.hidden_size // model.num_attention_heads}"),
        "qk_layernorm": only(False, message="per-head QK-norm (--qk-layernorm): GPT-2 has none"),
        "multi_latent_attention": only(False, message="multi-latent attention "
                                                      "(--multi-latent-attention): GPT-2 has "
                                                      "q/k/v projections per head"),
        # rotary settings and MLA's sizes: no rotary with learned positions, MLA refused above
        **any_value("rotary_percent", "rope_type", "rotary_scaling_factor",
                    "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
                    "qk_pos_emb_head_dim", "v_head_dim"),
    },
)


def hub_tensors(tensors, model: ModelConfig, moe: Optional[MoEConfig],
                dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D weights are [in, out]; c_attn's columns are [q | k | v]."""
    heads, h, f = model.num_attention_heads, model.hidden_size, model.ffn_hidden_size

    def bias(name, size):  # a model without biases computes the same with zero biases
        if model.add_bias_linear:
            return tensors[name]
        return torch.zeros(size, dtype=tensors["embedding.weight"].dtype)

    hf = {"transformer.wte.weight": tensors["embedding.weight"],
          "transformer.wpe.weight": tensors["position_embedding.weight"],
          "transformer.ln_f.weight": tensors["final_norm.weight"],
          "transformer.ln_f.bias": tensors["final_norm.bias"]}
    if model.untie_embeddings_and_output_weights:  # tie_word_embeddings false: lm_head is its own
        hf["lm_head.weight"] = tensors["output.weight"]
    for i in range(model.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in (("input_norm", "ln_1"), ("post_attention_norm", "ln_2")):
            hf[f"{theirs}{b}.weight"] = tensors[f"{ours}{a}.weight"]
            hf[f"{theirs}{b}.bias"] = tensors[f"{ours}{a}.bias"]
        qkv_w = torch.cat(split_qkv(tensors[ours + "attention.qkv.weight"], heads, heads))
        hf[theirs + "attn.c_attn.weight"] = transpose(qkv_w)
        hf[theirs + "attn.c_attn.bias"] = torch.cat(
            split_qkv(bias(ours + "attention.qkv.bias", 3 * h), heads, heads))
        hf[theirs + "attn.c_proj.weight"] = transpose(tensors[ours + "attention.proj.weight"])
        hf[theirs + "attn.c_proj.bias"] = bias(ours + "attention.proj.bias", h)
        hf[theirs + "mlp.c_fc.weight"] = transpose(tensors[ours + "mlp.fc1.weight"])
        hf[theirs + "mlp.c_fc.bias"] = bias(ours + "mlp.fc1.bias", f)
        hf[theirs + "mlp.c_proj.weight"] = transpose(tensors[ours + "mlp.fc2.weight"])
        hf[theirs + "mlp.c_proj.bias"] = bias(ours + "mlp.fc2.bias", h)
    return hf


def hub_config(model: ModelConfig, moe: Optional[MoEConfig], dtype: torch.dtype) -> dict:
    return {**base_config(FORMAT, ARCHITECTURE, model, dtype), "n_embd": model.hidden_size,
            "n_layer": model.num_layers, "n_head": model.num_attention_heads,
            "n_inner": model.ffn_hidden_size, "n_positions": model.max_position_embeddings,
            "activation_function": "gelu",  # exact erf GELU
            "layer_norm_epsilon": model.norm_epsilon, "resid_pdrop": model.hidden_dropout,
            "embd_pdrop": model.hidden_dropout, "attn_pdrop": model.attention_dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}
