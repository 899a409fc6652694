"""What Mixtral and Qwen2-MoE share (Llama's layers: RMSNorm, RoPE, SwiGLU, separate q/k/v
projections, no biases): their tensor names outside the MoE block and their config.json keys.
Each format declares what it can express in its own module, from the rules they share here."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from megatron.convert.allowlist import ANY, any_value, only, when
from megatron.convert.common import (
    HAS_GQA,
    ConversionError,
    base_config,
    fuse_qkv,
    query_groups,
    split_qkv,
    transpose,
)
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
        **attention_rules(fmt),
    }


def attention_rules(fmt: str) -> dict:
    """The attention variants (megatron/model/config.py) in a Llama-style format: the head dim
    is config.json's head_dim; partial rotary, YaRN, QK-norm and MLA have no counterpart here."""
    return {
        "kv_channels": ANY,  # written as head_dim
        "rotary_percent": only(1.0, message=lambda pct, model, moe:
                               f"partial rotary (--rotary-percent {pct}): {fmt} rotates whole "
                               "heads"),
        "rope_type": only("rope", message=f"YaRN (--rope-type yarn): {fmt} is exported with "
                                          "plain RoPE (--rope-type rope)"),
        "qk_layernorm": only(False, message=f"per-head QK-norm (--qk-layernorm): {fmt} has none"),
        "multi_latent_attention": only(False, message="multi-latent attention "
                                                      f"(--multi-latent-attention): {fmt} has "
                                                      "q/k/v projections per head"),
        # YaRN's settings (refused with rope_type yarn above) and MLA's sizes (refused with it)
        # do not change the function otherwise
        **any_value("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast",
                    "beta_slow", "mscale", "mscale_all_dim", "q_lora_rank", "kv_lora_rank",
                    "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"),
    }


def router_variant_rules(fmt: str) -> dict:
    """The router variants (ted_patches/gates) a softmax top-k format cannot express: a format
    that can (glm4_moe) declares these fields again after `moe_rules`."""
    return {
        # the losses are training's; Sinkhorn also changes the gates (sigmoid at top-1, raw
        # softmax otherwise) and is a different selection
        "aux_loss_type": when(lambda kind, model, moe: kind != "sinkhorn",
                              f"Sinkhorn routing (--moe-router-load-balancing-type sinkhorn): "
                              f"{fmt} selects and weighs by a plain softmax top-k"),
        "pre_softmax": only(False, message="--moe-router-pre-softmax: ask for the same gates "
                                           "(raw softmax probabilities) with "
                                           "--moe-gate-normalization none"),
        "topk_scaling_factor": only(None, 1.0, message=lambda f, model, moe:
                                    f"gates scaled by {f} (--moe-router-topk-scaling-factor): "
                                    f"{fmt}'s are not scaled"),
        "enable_expert_bias": only(False, message="a selection bias (--moe-router-enable-expert-"
                                                  f"bias): {fmt}'s router has none"),
        "router_num_groups": only(None, message="group-limited routing (--moe-router-num-groups"
                                                f"): {fmt} routes over all experts"),
        # router_group_topk goes with router_num_groups (refused there); the update rate is
        # training's; the router's dtype only rounds
        **any_value("router_group_topk", "bias_update_rate", "router_dtype"),
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
        **any_value("z_loss_coeff", "jitter_eps", "dtd", "pad_free", "check_tp_routing"),
        **router_variant_rules(fmt),
        # how we train, not what the model computes: the overlap is a schedule, upcycling an
        # initialization, per-layer statistics a log
        **any_value("shared_expert_overlap", "use_upcycling", "per_layer_logging"),
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
        if getattr(model, "qk_layernorm", False):  # a format whose rules admit it (qwen3_moe)
            hf.update({attn + f"{n}_norm.weight": tensors[f"{ours}attention.{n}_norm.weight"]
                       for n in ("q", "k")})
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


# ---- import -------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_from_hub(config: dict, ffn_hidden_size: int, qk_layernorm: bool = False,
                   head_dim: bool = False) -> ModelConfig:
    """Our ModelConfig of a Llama-style config.json (a missing key raises KeyError; a feature we
    cannot represent raises ConversionError naming its key). `qk_layernorm`: the format's
    per-head q/k RMSNorm; `head_dim`: the format's head_dim may differ from hidden / heads (our
    kv_channels)."""
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
        (head_dim or config.get("head_dim") in (None, hidden // heads),
         f"head_dim {config.get('head_dim')} != hidden_size / num_attention_heads "
         f"{hidden // heads}"),
        (config.get("hidden_act", "silu") == "silu",
         f"hidden_act {config.get('hidden_act')!r}: only silu (SwiGLU)"),
        (rope.get("rope_type", "default") == "default",
         f"rope_type {rope.get('rope_type')!r}: only plain RoPE (no scaling)"),
        (not config.get("use_sliding_window", True) or config.get("sliding_window") is None
         or config["sliding_window"] >= config["max_position_embeddings"],
         f"sliding_window {config.get('sliding_window')}: sliding-window attention is not "
         "supported"),
        (not config.get("qkv_bias", False) and not config.get("attention_bias", False),
         "qkv_bias / attention_bias: biases in the attention projections are not supported"),
    ]
    for ok, message in unsupported:
        if not ok:
            raise ConversionError(f"config.json: {message}")
    return ModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        vocab_size=config["vocab_size"], max_position_embeddings=config["max_position_embeddings"],
        ffn_hidden_size=ffn_hidden_size, position_embedding_type="rope",
        rotary_base=float(rope["rope_theta"]), normalization="RMSNorm",
        norm_epsilon=config.get("rms_norm_eps", 1e-5), swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        hidden_dropout=0.0, attention_dropout=config.get("attention_dropout", 0.0),
        init_method_std=config.get("initializer_range", 0.02),
        params_dtype=_DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32),
        **({} if kv_heads == heads else {"num_query_groups": kv_heads}),
        **({"qk_layernorm": True} if qk_layernorm else {}),
        **({"kv_channels": config["head_dim"]}
           if head_dim and config.get("head_dim") not in (None, hidden // heads) else {}),
    )


def weights_dtype(model: ModelConfig, hf: dict) -> ModelConfig:
    """The weights' own dtype, whatever config.json says."""
    if "model.embed_tokens.weight" in hf:
        return dataclasses.replace(model, params_dtype=hf["model.embed_tokens.weight"].dtype)
    return model


def check_tensors(fmt: str, expected: dict, hf: dict, shape: Callable[[str], tuple]) -> None:
    """Raise ConversionError unless `hf` holds exactly the `expected` names, each of `shape`."""
    missing, unexpected = sorted(expected.keys() - hf.keys()), sorted(hf.keys() - expected.keys())
    if missing or unexpected:
        raise ConversionError(f"the {fmt} tensors do not match config.json: missing "
                              f"{_few(missing)}, unexpected {_few(unexpected)}")
    for name in sorted(hf):
        want = shape(name)
        if tuple(hf[name].shape) != want:
            raise ConversionError(f"{name} has shape {tuple(hf[name].shape)}, config.json "
                                  f"implies {want}")


def shape(name: str, model: ModelConfig) -> tuple[int, ...]:
    """The shape config.json implies for a Hub tensor outside the MLP blocks."""
    h, d = model.hidden_size, model.head_dim
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return query_groups(model) * d, h
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return model.vocab_size, h
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return (d,)
    if name.endswith("norm.weight"):
        return (h,)
    if name.endswith("q_proj.weight"):
        return model.num_attention_heads * d, h
    return h, model.num_attention_heads * d  # o_proj


def to_stored(hf, model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our stored tensors outside the MLP blocks."""
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
        if getattr(model, "qk_layernorm", False):
            for n in ("q", "k"):
                out[f"{ours}attention.{n}_norm.weight"] = hf[attn + f"{n}_norm.weight"]
    return out


def dense_to_stored(hf, ours: str, theirs: str) -> dict[str, torch.Tensor]:
    """Inverse of `dense_swiglu`."""
    return {ours + "fc1.weight.gate": hf[theirs + "gate_proj.weight"],
            ours + "fc1.weight.up": hf[theirs + "up_proj.weight"],
            ours + "fc2.weight": hf[theirs + "down_proj.weight"]}


def experts_to_stored(hf, ours: str, theirs: str, num_experts: int,
                      names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """Inverse of `experts`."""
    gate, up, down = names
    out = {ours + "router.weight": hf[theirs + "gate.weight"]}
    for e in range(num_experts):
        src, dst = f"{theirs}experts.{e}.", f"{ours}experts.{e}."
        out[dst + "w1.gate"] = transpose(hf[src + gate + ".weight"])
        out[dst + "w1.up"] = transpose(hf[src + up + ".weight"])
        out[dst + "w2"] = transpose(hf[src + down + ".weight"])
    return out


class NameOnly(dict):
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


def qwen_moe_layers(config: dict, num_layers: int, advice: str = "") -> tuple[int, ...]:
    """The MoE layers of a Qwen-MoE config.json: every decoder_sparse_step-th layer but the
    mlp_only_layers (none without experts); a ConversionError when there is none."""
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or ())
    layers = tuple(i for i in range(num_layers)
                   if i not in dense and config["num_experts"] > 0 and (i + 1) % step == 0)
    if not layers:
        raise ConversionError("config.json: no MoE layer (num_experts, mlp_only_layers, "
                              f"decoder_sparse_step){advice}")
    return layers


def qwen_moe_kwargs(config: dict) -> dict:
    """MoEConfig fields a Qwen-MoE config.json gives (dropless top-k; the switch aux loss)."""
    return dict(num_experts=config["num_experts"], topk=config["num_experts_per_tok"],
                drop_tokens=False,
                gate_normalization="topk" if config.get("norm_topk_prob") else "none",
                aux_loss_type="aux_loss", aux_loss_coeff=config.get("router_aux_loss_coef", 0.0),
                expert_ffn_hidden_size=config["moe_intermediate_size"])


def checked_hub(fmt: str, hub_tensors, model: ModelConfig, moe: MoEConfig, hf: dict,
                shape) -> ModelConfig:
    """`model` in the Hub weights' dtype, once the Hub tensors are exactly those export writes
    (names by `hub_tensors`, shapes by `shape(name, model, moe)`)."""
    model = weights_dtype(model, hf)
    check_tensors(fmt, hub_tensors(NameOnly(model), model, moe, None), hf,
                  lambda name: shape(name, model, moe))
    return model


def moe_hub_to_stored(hf: dict, model: ModelConfig, moe: MoEConfig, names: tuple,
                      moe_layer=None) -> dict:
    """Our stored tensors of a Hub MoE model: what every Llama-style format shares, each dense
    layer's MLP, each MoE layer's experts (Hub linears `names`) and what `moe_layer(ours,
    theirs)` adds in it (a router bias, a shared expert)."""
    out = to_stored(hf, model)
    for i in range(model.num_layers):
        ours, theirs = f"layers.{i}.mlp.", f"model.layers.{i}.mlp."
        if i not in moe.layers:
            out.update(dense_to_stored(hf, ours, theirs))
            continue
        out.update(experts_to_stored(hf, ours, theirs, moe.num_experts, names))
        if moe_layer is not None:
            out.update(moe_layer(ours, theirs))
    return out


def moe_shape(name: str, model: ModelConfig, moe: MoEConfig, ffn: int) -> tuple[int, ...]:
    """The shape of a Llama-style MoE model's Hub tensor ([out, in]); `ffn`: the width of the
    MLP `name` is in (dense, expert or shared expert)."""
    h = model.hidden_size
    if name.endswith("mlp.gate.weight"):
        return moe.num_experts, h
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return ffn, h
    if name.endswith("down_proj.weight"):
        return h, ffn
    return shape(name, model)
