"""Our stored tensors <-> Hugging Face models (Mixtral, Qwen2-MoE, GPT-2), and the consolidated
one-process files.

Stored tensors are what a checkpoint holds whatever the layout (megatron.model.params): full
tensors by parameter name, each expert under its global id, SwiGLU's [gate | up] as ".gate" and
".up", the vocabulary without padding rows. Export maps them to the Hub's tensor names and a
config.json that transformers (5.x, and the 4.x Hub layout it converts from) loads with no
missing or unexpected keys; import maps a Mixtral Hub directory back. Every mapping is a
permutation, split or transpose, so a round trip is bit-exact.

What the targets compute, and therefore what fits them (`blockers` names whatever does not):
  mixtral    RMSNorm, RoPE (rotate-half), SwiGLU experts, no biases, MoE in every layer, top-k
             gates renormalized over the k choices (top-1 weight 1.0)
  qwen2_moe  like Mixtral, but dense SwiGLU layers may sit between MoE layers (mlp_only_layers)
             and the gates may stay raw probabilities (norm_topk_prob false: DeepSpeed's top-1);
             its always-present shared expert is written as zeros, contributing exactly 0
  gpt2       dense, LayerNorm, learned positions, exact GELU; a model without biases gets zero
             biases (the same function)
No Hugging Face model has an expert capacity: an exported MoE model computes ours with
--disable-moe-token-dropping (or with no token dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import torch

from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

EXPORT_FORMATS = ("mixtral", "qwen2_moe", "gpt2")
IMPORT_FORMATS = ("mixtral",)
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "gpt2": "GPT2LMHeadModel"}
CONSOLIDATED_TENSORS, CONSOLIDATED_META = "model.safetensors", "meta.json"
# Qwen2-MoE always has a shared expert; ours is absent, written as zeros of the smallest width.
QWEN_SHARED_WIDTH = 1
# whether this ModelConfig has grouped-query attention (num_query_groups), which import may need
_HAS_GQA = "num_query_groups" in {f.name for f in dataclasses.fields(ModelConfig)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """A model that does not fit a format, or input files that are not what they claim."""


# ---- what fits each format ----------------------------------------------------------------------
def blockers(fmt: str, model: ModelConfig, moe: Optional[MoEConfig]) -> list[str]:
    """The features of (model, moe) that `fmt` cannot express, each naming the flag to change;
    empty when the model fits."""
    if fmt == "gpt2":
        return _gpt2_blockers(model, moe)
    if fmt not in ("mixtral", "qwen2_moe"):
        raise ConversionError(f"unknown format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    out = _llama_like_blockers(model, fmt)
    if moe is None:
        out.append(f"a dense model (no --num-experts): {fmt} is a mixture of experts")
        return out
    counts = getattr(moe, "experts_per_layer", None) or (moe.num_experts,)
    if len(set(counts)) > 1:
        out.append(f"a different expert count per MoE layer (pyramid MoE, --num-experts {' '.join(map(str, counts))}): "
                   f"{fmt} has one num_experts")
    if moe.mlp_type == "residual":
        out.append("residual MoE (--mlp-type residual): its dense MLP mixed by a learned softmax gate has no "
                   f"counterpart in {fmt}")
    if fmt == "mixtral":
        missing = [i for i in range(model.num_layers) if i not in moe.layers]
        if missing:
            out.append(f"MoE not in every layer (layers {missing} are dense): Mixtral has MoE in every layer "
                       "(--expert-interval 1), or export as qwen2_moe")
        if not _renormalized_over_topk(moe):
            weight = "the raw probability" if moe.topk == 1 else "raw probabilities"
            out.append(f"top-{moe.topk} gates are {weight} (--moe-gate-normalization {moe.gate_normalization}): "
                       "Mixtral renormalizes over the top-k (its top-1 weight is 1.0); export as qwen2_moe")
    return out


def _llama_like_blockers(model: ModelConfig, fmt: str) -> list[str]:
    checks = [
        (model.normalization == "RMSNorm", f"LayerNorm: {fmt} uses RMSNorm (--normalization RMSNorm)"),
        (model.position_embedding_type == "rope",
         f"learned absolute positions: {fmt} uses RoPE (--position-embedding-type rope)"),
        (model.swiglu, f"a GELU MLP: {fmt} uses SwiGLU (--swiglu)"),
        (not model.add_bias_linear, f"biases in the linear layers: {fmt} has none (--disable-bias-linear)"),
    ]
    return [message for ok, message in checks if not ok]


def _gpt2_blockers(model: ModelConfig, moe: Optional[MoEConfig]) -> list[str]:
    checks = [
        (moe is None, "MoE layers (--num-experts): GPT-2 is dense; export as mixtral or qwen2_moe"),
        (model.normalization == "LayerNorm", "RMSNorm: GPT-2 uses LayerNorm (--normalization LayerNorm)"),
        (model.position_embedding_type == "learned_absolute",
         "RoPE: GPT-2 uses learned absolute positions (--position-embedding-type learned_absolute)"),
        (not model.swiglu, "SwiGLU: GPT-2's MLP is GELU (drop --swiglu)"),
        (query_groups(model) == model.num_attention_heads,
         "grouped-query attention (--group-query-attention): GPT-2 has a key and value per head"),
    ]
    return [message for ok, message in checks if not ok]


def _renormalized_over_topk(moe: MoEConfig) -> bool:
    """Whether, with no token dropped, the gates are the top-k probabilities over their sum."""
    return moe.gate_normalization == "topk" or (moe.gate_normalization == "surviving" and moe.topk > 1)


def check_exportable(fmt: str, model: ModelConfig, moe: Optional[MoEConfig]) -> None:
    found = blockers(fmt, model, moe)
    if found:
        raise ConversionError(f"cannot export as {fmt}: " + "; ".join(found))


# ---- attention: our fused QKV rows are [group, (q_1 .. q_r, k, v), head_dim] ------------------
def query_groups(model: ModelConfig) -> int:
    """Key/value heads (grouped-query attention); one per query head without it."""
    return getattr(model, "num_query_groups", None) or model.num_attention_heads


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> list[torch.Tensor]:
    """Our fused QKV weight (or bias) -> q [heads * d, ...] with rows [head, d], k and v
    [groups * d, ...] with rows [group, d]: query head i reads group i // (heads / groups), as
    the Hub's grouped-query attention does."""
    r, rest = heads // groups, qkv.shape[1:]
    per_group = qkv.reshape(groups, r + 2, -1, *rest)
    q = per_group[:, :r].reshape(-1, *rest)
    k, v = (per_group[:, i].reshape(-1, *rest) for i in (r, r + 1))
    return [t.contiguous() for t in (q, k, v)]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    r, rest = heads // groups, q.shape[1:]
    parts = [q.reshape(groups, r, -1, *rest), k.reshape(groups, 1, -1, *rest), v.reshape(groups, 1, -1, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous()


# ---- export -------------------------------------------------------------------------------------
def to_hf(fmt: str, tensors: dict[str, torch.Tensor], model: ModelConfig, moe: Optional[MoEConfig],
          special_ids: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> tuple[dict, dict]:
    """(config.json contents, {Hub tensor name: tensor}) of the model, in `dtype` (default: the
    stored tensors'). `special_ids` may give bos_token_id / eos_token_id / pad_token_id (the
    tokenizer's). Raises ConversionError when the model does not fit `fmt` or a stored tensor is
    missing."""
    check_exportable(fmt, model, moe)
    dtype = dtype or next(iter(tensors.values())).dtype
    try:
        if fmt == "gpt2":
            hf = _gpt2_tensors(tensors, model)
        else:
            hf = _llama_like_tensors(fmt, tensors, model, moe, dtype)
    except KeyError as e:
        raise ConversionError(f"no stored tensor {e.args[0]!r}: the tensors do not match the model's config") from None
    hf = {name: t.to(dtype) for name, t in hf.items()}
    config = _hf_config(fmt, model, moe, dtype)
    config.update({k: v for k, v in (special_ids or {}).items() if v is not None and 0 <= v < model.vocab_size})
    return config, hf


def _llama_like_tensors(fmt, tensors, model: ModelConfig, moe: MoEConfig, dtype) -> dict[str, torch.Tensor]:
    hf = {"model.embed_tokens.weight": tensors["embedding.weight"], "model.norm.weight": tensors["final_norm.weight"]}
    if model.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = tensors["output.weight"]
    for i in range(model.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        hf[theirs + "input_layernorm.weight"] = tensors[ours + "input_norm.weight"]
        hf[theirs + "post_attention_layernorm.weight"] = tensors[ours + "post_attention_norm.weight"]
        q, k, v = split_qkv(tensors[ours + "attention.qkv.weight"], model.num_attention_heads, query_groups(model))
        attn = theirs + "self_attn."
        hf.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v,
                   attn + "o_proj.weight": tensors[ours + "attention.proj.weight"]})
        if i not in moe.layers:  # qwen2_moe only (mixtral's blockers require MoE everywhere)
            hf.update(_dense_swiglu(tensors, ours + "mlp.", theirs + "mlp."))
        elif fmt == "mixtral":
            hf.update(_experts(tensors, ours + "mlp.", theirs + "block_sparse_moe.", moe.num_experts,
                               ("w1", "w3", "w2")))
        else:
            hf.update(_experts(tensors, ours + "mlp.", theirs + "mlp.", moe.num_experts,
                               ("gate_proj", "up_proj", "down_proj")))
            hf.update(_zero_shared_expert(theirs + "mlp.", model.hidden_size, dtype))
    return hf


def _dense_swiglu(tensors, ours: str, theirs: str) -> dict[str, torch.Tensor]:
    # our column/row-parallel weights are [out, in] like nn.Linear's
    return {theirs + "gate_proj.weight": tensors[ours + "fc1.weight.gate"],
            theirs + "up_proj.weight": tensors[ours + "fc1.weight.up"],
            theirs + "down_proj.weight": tensors[ours + "fc2.weight"]}


def _experts(tensors, ours: str, theirs: str, num_experts: int, names: tuple[str, str, str]) -> dict:
    """Router and experts; our expert weights are [in, out], the Hub's nn.Linear [out, in]."""
    gate, up, down = names
    out = {theirs + "gate.weight": tensors[ours + "router.weight"]}
    for e in range(num_experts):
        src, dst = f"{ours}experts.{e}.", f"{theirs}experts.{e}."
        out[dst + gate + ".weight"] = _t(tensors[src + "w1.gate"])
        out[dst + up + ".weight"] = _t(tensors[src + "w1.up"])
        out[dst + down + ".weight"] = _t(tensors[src + "w2"])
    return out


def _zero_shared_expert(theirs: str, hidden: int, dtype) -> dict[str, torch.Tensor]:
    # sigmoid(gate . x) * down(silu(gate_proj x) * up_proj x) with every weight 0 is exactly 0
    w = QWEN_SHARED_WIDTH
    return {theirs + "shared_expert.gate_proj.weight": torch.zeros(w, hidden, dtype=dtype),
            theirs + "shared_expert.up_proj.weight": torch.zeros(w, hidden, dtype=dtype),
            theirs + "shared_expert.down_proj.weight": torch.zeros(hidden, w, dtype=dtype),
            theirs + "shared_expert_gate.weight": torch.zeros(1, hidden, dtype=dtype)}


def _gpt2_tensors(tensors, model: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D weights are [in, out]; c_attn's columns are [q | k | v]."""
    heads, h, f = model.num_attention_heads, model.hidden_size, model.ffn_hidden_size

    def bias(name, size):  # a model without biases computes the same with zero biases
        return tensors[name] if model.add_bias_linear else torch.zeros(size, dtype=tensors["embedding.weight"].dtype)

    hf = {"transformer.wte.weight": tensors["embedding.weight"],
          "transformer.wpe.weight": tensors["position_embedding.weight"],
          "transformer.ln_f.weight": tensors["final_norm.weight"], "transformer.ln_f.bias": tensors["final_norm.bias"]}
    if model.untie_embeddings_and_output_weights:  # tie_word_embeddings false: lm_head is its own
        hf["lm_head.weight"] = tensors["output.weight"]
    for i in range(model.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in (("input_norm", "ln_1"), ("post_attention_norm", "ln_2")):
            hf[f"{theirs}{b}.weight"] = tensors[f"{ours}{a}.weight"]
            hf[f"{theirs}{b}.bias"] = tensors[f"{ours}{a}.bias"]
        qkv_w = torch.cat(split_qkv(tensors[ours + "attention.qkv.weight"], heads, heads))
        hf[theirs + "attn.c_attn.weight"] = _t(qkv_w)
        hf[theirs + "attn.c_attn.bias"] = torch.cat(split_qkv(bias(ours + "attention.qkv.bias", 3 * h), heads, heads))
        hf[theirs + "attn.c_proj.weight"] = _t(tensors[ours + "attention.proj.weight"])
        hf[theirs + "attn.c_proj.bias"] = bias(ours + "attention.proj.bias", h)
        hf[theirs + "mlp.c_fc.weight"] = _t(tensors[ours + "mlp.fc1.weight"])
        hf[theirs + "mlp.c_fc.bias"] = bias(ours + "mlp.fc1.bias", f)
        hf[theirs + "mlp.c_proj.weight"] = _t(tensors[ours + "mlp.fc2.weight"])
        hf[theirs + "mlp.c_proj.bias"] = bias(ours + "mlp.fc2.bias", h)
    return hf


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hf_config(fmt: str, model: ModelConfig, moe: Optional[MoEConfig], dtype) -> dict:
    common = {"architectures": [ARCHITECTURES[fmt]], "model_type": fmt, "vocab_size": model.vocab_size,
              "initializer_range": model.init_method_std, "dtype": _dtype_name(dtype), "use_cache": True,
              "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if fmt == "gpt2":
        return {**common, "n_embd": model.hidden_size, "n_layer": model.num_layers,
                "n_head": model.num_attention_heads, "n_inner": model.ffn_hidden_size,
                "n_positions": model.max_position_embeddings, "activation_function": "gelu",  # exact erf GELU
                "layer_norm_epsilon": model.norm_epsilon, "resid_pdrop": model.hidden_dropout,
                "embd_pdrop": model.hidden_dropout, "attn_pdrop": model.attention_dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    ffn = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    llama_like = {**common, "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
                  "num_attention_heads": model.num_attention_heads,
                  "num_key_value_heads": query_groups(model), "head_dim": model.head_dim,
                  "hidden_act": "silu", "max_position_embeddings": model.max_position_embeddings,
                  "rms_norm_eps": model.norm_epsilon, "attention_dropout": model.attention_dropout,
                  # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta
                  "rope_theta": model.rotary_base,
                  "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base},
                  "num_experts_per_tok": moe.topk, "router_aux_loss_coef": moe.aux_loss_coeff,
                  "output_router_logits": False}
    if fmt == "mixtral":
        return {**llama_like, "intermediate_size": ffn, "num_local_experts": moe.num_experts,
                "router_jitter_noise": moe.jitter_eps, "sliding_window": None}
    return {**llama_like, "intermediate_size": model.ffn_hidden_size, "moe_intermediate_size": ffn,
            "num_experts": moe.num_experts, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(model.num_layers) if i not in moe.layers],
            "norm_topk_prob": _renormalized_over_topk(moe), "shared_expert_intermediate_size": QWEN_SHARED_WIDTH,
            "qkv_bias": False, "use_sliding_window": False, "sliding_window": None}


# ---- import (Mixtral) ---------------------------------------------------------------------------
def configs_from_hf(fmt: str, config: dict) -> tuple[ModelConfig, MoEConfig]:
    """Our configs of a Hub config.json. Raises ConversionError naming the first key we cannot
    represent."""
    if fmt not in IMPORT_FORMATS:
        raise ConversionError(f"import --format {fmt!r}: only {', '.join(IMPORT_FORMATS)} can be imported")
    if config.get("model_type") != fmt:
        raise ConversionError(f"config.json has model_type {config.get('model_type')!r}, not {fmt!r}")
    try:
        return _mixtral_configs(config)
    except KeyError as e:
        raise ConversionError(f"config.json has no {e.args[0]!r}") from None


def _mixtral_configs(config: dict) -> tuple[ModelConfig, MoEConfig]:
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 1e6)}
    unsupported = [
        (kv_heads == heads or _HAS_GQA,
         f"num_key_value_heads {kv_heads} != num_attention_heads {heads}: grouped-query attention is not supported"),
        (heads % kv_heads == 0, f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}"),
        (config.get("head_dim") in (None, hidden // heads),
         f"head_dim {config.get('head_dim')} != hidden_size / num_attention_heads {hidden // heads}"),
        (config.get("hidden_act", "silu") == "silu", f"hidden_act {config.get('hidden_act')!r}: only silu (SwiGLU)"),
        (rope.get("rope_type", "default") == "default",
         f"rope_type {rope.get('rope_type')!r}: only plain RoPE (no scaling)"),
        (config.get("sliding_window") is None or config["sliding_window"] >= config["max_position_embeddings"],
         f"sliding_window {config.get('sliding_window')}: sliding-window attention is not supported"),
    ]
    for ok, message in unsupported:
        if not ok:
            raise ConversionError(f"config.json: {message}")
    model = ModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        vocab_size=config["vocab_size"], max_position_embeddings=config["max_position_embeddings"],
        ffn_hidden_size=config["intermediate_size"], position_embedding_type="rope",
        rotary_base=float(rope["rope_theta"]), normalization="RMSNorm", norm_epsilon=config.get("rms_norm_eps", 1e-5),
        swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        hidden_dropout=0.0, attention_dropout=config.get("attention_dropout", 0.0),
        init_method_std=config.get("initializer_range", 0.02),
        params_dtype=_DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32),
        **({} if kv_heads == heads else {"num_query_groups": kv_heads}),
    )
    # Mixtral's routing: top-k renormalized over the k, no capacity, a switch-style balancing loss
    moe = MoEConfig(num_experts=config["num_local_experts"], layers=tuple(range(model.num_layers)),
                    topk=config["num_experts_per_tok"], drop_tokens=False, gate_normalization="topk",
                    aux_loss_type="aux_loss", aux_loss_coeff=config.get("router_aux_loss_coef", 0.0),
                    jitter_eps=config.get("router_jitter_noise", 0.0))
    return model, moe


def from_hf(fmt: str, config: dict, hf: dict[str, torch.Tensor]) -> tuple[ModelConfig, MoEConfig, dict]:
    """(model config, MoE config, stored tensors) of a Hub model. Raises ConversionError naming
    missing or unexpected tensors."""
    model, moe = configs_from_hf(fmt, config)
    if "model.embed_tokens.weight" in hf:  # the weights' own dtype, whatever config.json says
        model = dataclasses.replace(model, params_dtype=hf["model.embed_tokens.weight"].dtype)
    expected = set(_llama_like_tensors("mixtral", _NameOnly(model), model, moe, None))
    missing, unexpected = sorted(expected - hf.keys()), sorted(hf.keys() - expected)
    if missing or unexpected:
        raise ConversionError(f"the {fmt} tensors do not match config.json: missing {_few(missing)}, "
                              f"unexpected {_few(unexpected)}")
    for name in sorted(hf):
        want = _mixtral_shape(name, model, moe)
        if tuple(hf[name].shape) != want:
            raise ConversionError(f"{name} has shape {tuple(hf[name].shape)}, config.json implies {want}")
    return model, moe, _mixtral_to_stored(hf, model, moe)


def _mixtral_shape(name: str, model: ModelConfig, moe: MoEConfig) -> tuple[int, ...]:
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


def _mixtral_to_stored(hf, model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Tensor]:
    out = {"embedding.weight": hf["model.embed_tokens.weight"], "final_norm.weight": hf["model.norm.weight"]}
    if model.untie_embeddings_and_output_weights:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(model.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        out[ours + "input_norm.weight"] = hf[theirs + "input_layernorm.weight"]
        out[ours + "post_attention_norm.weight"] = hf[theirs + "post_attention_layernorm.weight"]
        out[ours + "attention.qkv.weight"] = fuse_qkv(hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"],
                                                      hf[attn + "v_proj.weight"], model.num_attention_heads,
                                                      query_groups(model))
        out[ours + "attention.proj.weight"] = hf[attn + "o_proj.weight"]
        moe_in = theirs + "block_sparse_moe."
        out[ours + "mlp.router.weight"] = hf[moe_in + "gate.weight"]
        for e in range(moe.num_experts):
            src, dst = f"{moe_in}experts.{e}.", f"{ours}mlp.experts.{e}."
            out[dst + "w1.gate"] = _t(hf[src + "w1.weight"])
            out[dst + "w1.up"] = _t(hf[src + "w3.weight"])
            out[dst + "w2"] = _t(hf[src + "w2.weight"])
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


# ---- Hub directories ----------------------------------------------------------------------------
def write_hf(out_dir: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """config.json and model.safetensors (one file: these tools serve models one process holds)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(_owned(tensors), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "config.json"), config)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_hf_tokenizer(out_dir: str, tokenizer: dict) -> Optional[str]:
    """The checkpoint's tokenizer (its record in the checkpoint: type and file paths) into the Hub
    folder: its own files and a tokenizer_config.json naming the transformers class that reads
    them, so AutoTokenizer encodes text as we do. GPT-2 BPE: vocab.json, merges.txt and
    tokenizer.json for GPT2Tokenizer (a literal "<|endoftext|>" in text is the end-of-text id
    there, ordinary text in ours, as in Megatron-LM). sentencepiece: tokenizer.model for
    LlamaTokenizer, which adds no BOS or EOS (ours adds none) and keeps sentencepiece's own
    whitespace handling (legacy). Returns the class, or None for NullTokenizer (ids only, no
    files). Raises OSError when a file has gone."""
    kind = tokenizer.get("tokenizer_type")
    if kind == "GPT2BPETokenizer":
        from tokenizers import ByteLevelBPETokenizer

        shutil.copyfile(tokenizer["vocab_file"], os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(tokenizer["merge_file"], os.path.join(out_dir, "merges.txt"))
        # and the same tokenizer serialized (what ours encodes with): AutoTokenizer reads it under any
        # model type (with a Mixtral config.json it would not build GPT-2's from the two files)
        ByteLevelBPETokenizer(tokenizer["vocab_file"], tokenizer["merge_file"]).save(
            os.path.join(out_dir, "tokenizer.json"))
        eod = "<|endoftext|>"
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eod, "eos_token": eod, "unk_token": eod,
                  "add_prefix_space": False}
    elif kind == "SentencePieceTokenizer":
        import sentencepiece

        shutil.copyfile(tokenizer["tokenizer_model"], os.path.join(out_dir, "tokenizer.model"))
        sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer["tokenizer_model"])
        piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": True, "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
                  "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id())}
    else:
        return None
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {k: v for k, v in config.items() if v is not None})
    return config["tokenizer_class"]


def read_hf(in_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, all tensors) of a Hub directory: model.safetensors, or the shards its
    model.safetensors.index.json names."""
    from safetensors.torch import load_file

    config_path = os.path.join(in_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"--input {in_dir}: no config.json (give a Hugging Face model directory)")
    with open(config_path) as f:
        config = json.load(f)
    index = os.path.join(in_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(in_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"--input {in_dir}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors weights are read)")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(in_dir, name)))
    return config, tensors


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (views of one parameter): copy those."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[name] = t if whole else t.contiguous().clone()
    return out


# ---- consolidated one-process files ---------------------------------------------------------
def write_consolidated(out_dir: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The stored tensors as one safetensors file beside the checkpoint's meta as JSON."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(_owned(tensors), os.path.join(out_dir, CONSOLIDATED_TENSORS), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, CONSOLIDATED_META), meta)


def is_consolidated(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in (CONSOLIDATED_TENSORS, CONSOLIDATED_META))


def read_model(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, stored tensors) of a consolidated directory or of a checkpoint of any layout (a
    --save directory or one iter_NNNNNNN directory), in this one process."""
    if is_consolidated(path):
        from safetensors.torch import load_file

        with open(os.path.join(path, CONSOLIDATED_META)) as f:
            return json.load(f), load_file(os.path.join(path, CONSOLIDATED_TENSORS))
    from megatron.checkpoint import read_checkpoint_meta, read_stored_tensors

    return read_checkpoint_meta(path), read_stored_tensors(path)
