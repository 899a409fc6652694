"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-latent attention on GLM-4.5's MoE (the same
sigmoid router with a selection bias and group-limited routing, an ungated shared expert, dense
layers first: megatron/convert/glm4_moe.py, whose MoE rules and tensors this adapter shares).

  attention  MLA (--multi-latent-attention): q_a_proj / q_a_layernorm / q_b_proj (or q_proj
             without --q-lora-rank), kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj, o_proj;
             the latent norms always (--qk-layernorm), with eps 1e-6 (transformers' default for
             them: --norm-epsilon 1e-6); rotary on pairs of the rope dims (rope_interleave),
             YaRN as rope_parameters with its attention_factor written out (Megatron-Core's
             mscale(f, mscale) / mscale(f, mscale_all_dim) in every case)
Export only (not registered in megatron/convert/__init__.py yet: see the module's tests).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.convert import glm4_moe, llama
from megatron.convert.allowlist import ANY, Declaration, any_value, only, when
from megatron.convert.common import base_config
from megatron.model.config import ModelConfig
from megatron.model.rotary import yarn_mscale
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "deepseek_v3", "DeepseekV3ForCausalLM"


def _plain_rope_scale_ok(rope_type, model, moe) -> bool:
    """With plain rope transformers scales the softmax by 1/sqrt(d) only; Megatron-Core's MLA by
    mscale(factor, mscale_all_dim)^2 too, which is 1 unless both are set."""
    return (rope_type == "yarn"
            or yarn_mscale(model.rotary_scaling_factor, model.mscale_all_dim) == 1.0)


EXPRESSES = Declaration(
    FORMAT,
    model={
        **llama.model_rules(FORMAT),
        "multi_latent_attention": only(True, message="standard attention: deepseek_v3 is "
                                                     "multi-latent attention "
                                                     "(--multi-latent-attention)"),
        "qk_layernorm": only(True, message="no latent norms: deepseek_v3 normalizes the q and "
                                           "kv latents (--qk-layernorm)"),
        "norm_epsilon": only(1e-6, message=lambda eps, model, moe:
                             f"--norm-epsilon {eps}: deepseek_v3's latent norms use 1e-6 "
                             "(--norm-epsilon 1e-6)"),
        "rope_type": when(_plain_rope_scale_ok, "--rope-type rope with --rotary-scaling-factor "
                                                "and --mscale-all-dim: deepseek_v3 scales the "
                                                "softmax by them only with YaRN"),
        # written to config.json (q_lora_rank, kv_lora_rank, qk_nope_head_dim,
        # qk_rope_head_dim, v_head_dim, rope_parameters)
        **any_value("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                    "v_head_dim", "rotary_scaling_factor", "original_max_position_embeddings",
                    "beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
        # refused with MLA by ModelConfig itself (no query groups, no kv_channels)
        "num_query_groups": ANY, "kv_channels": ANY,
    },
    dense_refused=f"a dense model (no --num-experts): {FORMAT} is a mixture of experts",
    moe=glm4_moe.EXPRESSES.moe,
)


def hub_tensors(tensors, model: ModelConfig, moe: MoEConfig,
                dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """{Hub name: tensor}: MLA's projections and latent norms; glm4_moe's MoE blocks."""
    hf = {"model.embed_tokens.weight": tensors["embedding.weight"],
          "model.norm.weight": tensors["final_norm.weight"]}
    if model.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = tensors["output.weight"]
    for i in range(model.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        hf[theirs + "input_layernorm.weight"] = tensors[ours + "input_norm.weight"]
        hf[theirs + "post_attention_layernorm.weight"] = (
            tensors[ours + "post_attention_norm.weight"])
        hf.update(_attention(tensors, ours + "attention.", theirs + "self_attn.", model))
        if i not in moe.layers:
            hf.update(llama.dense_swiglu(tensors, ours + "mlp.", theirs + "mlp."))
            continue
        hf.update(llama.experts(tensors, ours + "mlp.", theirs + "mlp.", moe.num_experts,
                                glm4_moe._NAMES))
        bias = (tensors[ours + "mlp.router.gate.expert_bias"] if moe.enable_expert_bias
                else torch.zeros(moe.num_experts))
        hf[theirs + "mlp.gate.e_score_correction_bias"] = bias.float()
        hf.update(glm4_moe._shared(tensors, ours + "mlp.shared_expert.", theirs + "mlp.", model,
                                   moe, dtype))
    return hf


def _attention(tensors, ours: str, attn: str, model: ModelConfig) -> dict:
    out = {attn + "kv_a_proj_with_mqa.weight": tensors[ours + "kv_down.weight"],
           attn + "kv_a_layernorm.weight": tensors[ours + "kv_norm.weight"],
           attn + "kv_b_proj.weight": tensors[ours + "kv_up.weight"],
           attn + "o_proj.weight": tensors[ours + "proj.weight"]}
    if model.q_lora_rank:
        out.update({attn + "q_a_proj.weight": tensors[ours + "q_down.weight"],
                    attn + "q_a_layernorm.weight": tensors[ours + "q_norm.weight"],
                    attn + "q_b_proj.weight": tensors[ours + "q_up.weight"]})
    else:
        out[attn + "q_proj.weight"] = tensors[ours + "q_up.weight"]
    return out


def hub_config(model: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> dict:
    g = glm4_moe.hub_config(model, moe, dtype)
    rope = {"rope_type": "default", "rope_theta": model.rotary_base}
    if model.rope_type == "yarn":
        f = model.rotary_scaling_factor
        rope = {"rope_type": "yarn", "rope_theta": model.rotary_base, "factor": f,
                "original_max_position_embeddings": model.original_max_position_embeddings,
                "beta_fast": model.beta_fast, "beta_slow": model.beta_slow,
                "mscale": model.mscale, "mscale_all_dim": model.mscale_all_dim,
                "attention_factor": yarn_mscale(f, model.mscale)
                / yarn_mscale(f, model.mscale_all_dim)}
    keep = ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
            "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor",
            "norm_topk_prob", "num_experts_per_tok", "router_aux_loss_coef",
            "output_router_logits", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "attention_dropout", "num_hidden_layers", "hidden_size")
    return {**base_config(FORMAT, ARCHITECTURE, model, dtype),
            **{k: g[k] for k in keep if k in g},
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_attention_heads,
            "q_lora_rank": model.q_lora_rank, "kv_lora_rank": model.kv_lora_rank,
            "qk_nope_head_dim": model.qk_head_dim, "qk_rope_head_dim": model.qk_pos_emb_head_dim,
            "v_head_dim": model.v_head_dim, "head_dim": model.qk_pos_emb_head_dim,
            "rope_interleave": True, "attention_bias": False, "rope_theta": model.rotary_base,
            "rope_parameters": rope, "num_nextn_predict_layers": 0}
