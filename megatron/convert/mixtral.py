"""Mixtral (MixtralForCausalLM): RMSNorm, RoPE (rotate-half), SwiGLU experts, no biases, MoE in
every layer, top-k gates renormalized over the k choices (top-1 weight 1.0). Export and import."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron.convert import llama
from megatron.convert.allowlist import Declaration, any_value, when
from megatron.convert.common import (
    HAS_GQA,
    ConversionError,
    fuse_qkv,
    query_groups,
    renormalized_over_topk,
    transpose,
)
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "mixtral", "MixtralForCausalLM"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dense_layers(model: ModelConfig, moe: MoEConfig) -> list[int]:
    return [i for i in range(model.num_layers) if i not in moe.layers]


def _raw_gates(normalization, model, moe) -> str:
    weight = "the raw probability" if moe.topk == 1 else "raw probabilities"
    return (f"top-{moe.topk} gates are {weight} (--moe-gate-normalization {normalization}): "
            "Mixtral renormalizes over the top-k (its top-1 weight is 1.0); export as qwen2_moe")


EXPRESSES = Declaration(
    FORMAT,
    model=llama.model_rules(FORMAT),
    dense_refused="a dense model (no --num-experts): mixtral is a mixture of experts",
    moe={
        **llama.moe_rules(FORMAT),
        "layers": when(lambda layers, model, moe: not _dense_layers(model, moe),
                       lambda layers, model, moe:
                       f"MoE not in every layer (layers {_dense_layers(model, moe)} are dense): "
                       "Mixtral has MoE in every layer (--expert-interval 1), or export as "
                       "qwen2_moe"),
        # reads topk too: top-1 "surviving" keeps the raw probability
        "gate_normalization": when(lambda normalization, model, moe: renormalized_over_topk(moe),
                                   _raw_gates),
        # written to config.json (expert_ffn_hidden_size as intermediate_size, jitter_eps as
        # router_jitter_noise; topk's interplay with the gates is gate_normalization's rule)
        **any_value("num_experts", "topk", "expert_ffn_hidden_size", "aux_loss_coeff"),
    },
)


# ---- export -------------------------------------------------------------------------------------
def _moe_block(moe: MoEConfig):
    def block(tensors, ours: str, theirs: str) -> dict:
        return llama.experts(tensors, ours + "mlp.", theirs + "block_sparse_moe.",
                             moe.num_experts, ("w1", "w3", "w2"))
    return block


def hub_tensors(tensors, model: ModelConfig, moe: MoEConfig,
                dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    return llama.hub_tensors(tensors, model, moe, _moe_block(moe))


def hub_config(model: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> dict:
    ffn = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    return {**llama.hub_config(FORMAT, ARCHITECTURE, model, moe, dtype), "intermediate_size": ffn,
            "num_local_experts": moe.num_experts, "router_jitter_noise": moe.jitter_eps,
            "sliding_window": None}


# ---- import -------------------------------------------------------------------------------------
def configs_from_hub(config: dict) -> tuple[ModelConfig, MoEConfig]:
    """Our configs of a Mixtral config.json (a missing key raises KeyError)."""
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    rope = (config.get("rope_parameters")
            or {"rope_type": "default", "rope_theta": config.get("rope_theta", 1e6)})
    unsupported = [
        (kv_heads == heads or HAS_GQA,
         f"num_key_value_heads {kv_heads} != num_attention_heads {heads}: grouped-query "
         "attention is not supported"),
        (heads % kv_heads == 0,
         f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}"),
        (config.get("head_dim") in (None, hidden // heads),
         f"head_dim {config.get('head_dim')} != hidden_size / num_attention_heads "
         f"{hidden // heads}"),
        (config.get("hidden_act", "silu") == "silu",
         f"hidden_act {config.get('hidden_act')!r}: only silu (SwiGLU)"),
        (rope.get("rope_type", "default") == "default",
         f"rope_type {rope.get('rope_type')!r}: only plain RoPE (no scaling)"),
        (config.get("sliding_window") is None
         or config["sliding_window"] >= config["max_position_embeddings"],
         f"sliding_window {config.get('sliding_window')}: sliding-window attention is not "
         "supported"),
    ]
    for ok, message in unsupported:
        if not ok:
            raise ConversionError(f"config.json: {message}")
    model = ModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        vocab_size=config["vocab_size"], max_position_embeddings=config["max_position_embeddings"],
        ffn_hidden_size=config["intermediate_size"], position_embedding_type="rope",
        rotary_base=float(rope["rope_theta"]), normalization="RMSNorm",
        norm_epsilon=config.get("rms_norm_eps", 1e-5), swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        hidden_dropout=0.0, attention_dropout=config.get("attention_dropout", 0.0),
        init_method_std=config.get("initializer_range", 0.02),
        params_dtype=_DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32),
        **({} if kv_heads == heads else {"num_query_groups": kv_heads}),
    )
    # Mixtral's routing: top-k renormalized over the k, no capacity, a switch-style balancing loss
    moe = MoEConfig(num_experts=config["num_local_experts"], layers=tuple(range(model.num_layers)),
                    topk=config["num_experts_per_tok"], drop_tokens=False,
                    gate_normalization="topk", aux_loss_type="aux_loss",
                    aux_loss_coeff=config.get("router_aux_loss_coef", 0.0),
                    jitter_eps=config.get("router_jitter_noise", 0.0))
    return model, moe


def from_hub(model: ModelConfig, moe: MoEConfig,
             hf: dict[str, torch.Tensor]) -> tuple[ModelConfig, MoEConfig, dict]:
    """(model config, MoE config, stored tensors) of the Hub tensors of the model whose configs
    `configs_from_hub` read. Raises ConversionError naming missing or unexpected tensors."""
    if "model.embed_tokens.weight" in hf:  # the weights' own dtype, whatever config.json says
        model = dataclasses.replace(model, params_dtype=hf["model.embed_tokens.weight"].dtype)
    expected = set(hub_tensors(_NameOnly(model), model, moe, None))
    missing, unexpected = sorted(expected - hf.keys()), sorted(hf.keys() - expected)
    if missing or unexpected:
        raise ConversionError(f"the {FORMAT} tensors do not match config.json: missing "
                              f"{_few(missing)}, unexpected {_few(unexpected)}")
    for name in sorted(hf):
        want = _shape(name, model, moe)
        if tuple(hf[name].shape) != want:
            raise ConversionError(f"{name} has shape {tuple(hf[name].shape)}, config.json "
                                  f"implies {want}")
    return model, moe, _to_stored(hf, model, moe)


def _shape(name: str, model: ModelConfig, moe: MoEConfig) -> tuple[int, ...]:
    """The shape config.json implies for a Mixtral Hub tensor (nn.Linear weights are [out, in])."""
    h, f = model.hidden_size, model.ffn_hidden_size
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return query_groups(model) * model.head_dim, h
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return model.vocab_size, h
    if name.endswith("norm.weight"):
        return (h,)
    if name.endswith("gate.weight"):
        return moe.num_experts, h
    if name.endswith(("w1.weight", "w3.weight")):
        return f, h
    if name.endswith("w2.weight"):
        return h, f
    return h, h  # the attention projections


def _to_stored(hf, model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Tensor]:
    out = {"embedding.weight": hf["model.embed_tokens.weight"],
           "final_norm.weight": hf["model.norm.weight"]}
    if model.untie_embeddings_and_output_weights:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(model.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        out[ours + "input_norm.weight"] = hf[theirs + "input_layernorm.weight"]
        out[ours + "post_attention_norm.weight"] = hf[theirs + "post_attention_layernorm.weight"]
        out[ours + "attention.qkv.weight"] = fuse_qkv(hf[attn + "q_proj.weight"],
                                                      hf[attn + "k_proj.weight"],
                                                      hf[attn + "v_proj.weight"],
                                                      model.num_attention_heads,
                                                      query_groups(model))
        out[ours + "attention.proj.weight"] = hf[attn + "o_proj.weight"]
        moe_in = theirs + "block_sparse_moe."
        out[ours + "mlp.router.weight"] = hf[moe_in + "gate.weight"]
        for e in range(moe.num_experts):
            src, dst = f"{moe_in}experts.{e}.", f"{ours}mlp.experts.{e}."
            out[dst + "w1.gate"] = transpose(hf[src + "w1.weight"])
            out[dst + "w1.up"] = transpose(hf[src + "w3.weight"])
            out[dst + "w2"] = transpose(hf[src + "w2.weight"])
    return out


class _NameOnly(dict):
    """Stands in for the stored tensors when only the Hub names are wanted (so import expects
    exactly the names export writes)."""

    def __init__(self, model: ModelConfig):
        super().__init__()
        self.rows = model.num_attention_heads + 2 * query_groups(model)  # enough for split_qkv

    def __missing__(self, key):
        return torch.zeros(self.rows, 1)


def _few(names: list[str], n: int = 4) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
