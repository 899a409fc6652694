"""GLM-4.5 MoE (Glm4MoeForCausalLM): the DeepSeek-V3 router without multi-latent attention.

  router   sigmoid scores; the expert chosen by score + e_score_correction_bias (ours: the
           sigmoid gate's expert_bias, --moe-router-enable-expert-bias; zeros without); weights
           the chosen scores, renormalized over the k (norm_topk_prob) and times
           routed_scaling_factor (--moe-router-topk-scaling-factor)
  groups   n_group / topk_group (--moe-router-num-groups / --moe-router-group-topk); a group
           scores the sum of its best 2 experts, Megatron-Core's of its best k / group_topk:
           the same when k = 2 x group_topk, refused otherwise
  shared   an ungated shared expert of n_shared_experts x moe_intermediate_size (ours: a width
           that is a multiple of the experts' FFN); a model without one gets a zero one
  layers   dense SwiGLU layers first (first_k_dense_replace), MoE in every later layer
  attention  GQA without biases, partial rotary (partial_rotary_factor: --rotary-percent),
           optional per-head QK-norm (use_qk_norm: --qk-layernorm), head_dim (--kv-channels)
Export and import (import turns the selection bias on: GLM trains with it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron.convert import llama
from megatron.convert.allowlist import ANY, Declaration, any_value, only, when
from megatron.convert.common import ConversionError
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "glm4_moe", "Glm4MoeForCausalLM"
_NAMES = ("gate_proj", "up_proj", "down_proj")
_SHARED = tuple(f"shared_experts.{n}.weight" for n in _NAMES)


def _expert_ffn(model: ModelConfig, moe: MoEConfig) -> int:
    return moe.expert_ffn_hidden_size or model.ffn_hidden_size


def _first_k(model: ModelConfig, moe: MoEConfig) -> int:
    return min(moe.layers)


def _layers_ok(layers, model, moe) -> bool:
    return tuple(layers) == tuple(range(min(layers), model.num_layers))


def _groups_ok(groups, model, moe) -> bool:
    return groups is None or moe.topk == 2 * moe.router_group_topk


EXPRESSES = Declaration(
    FORMAT,
    model={
        **llama.model_rules(FORMAT),
        # written as partial_rotary_factor, use_qk_norm and head_dim
        "rotary_percent": ANY, "qk_layernorm": ANY, "kv_channels": ANY,
    },
    dense_refused=f"a dense model (no --num-experts): {FORMAT} is a mixture of experts",
    moe={
        **llama.moe_rules(FORMAT),
        "score_function": only("sigmoid", message=lambda name, model, moe:
                               f"a {name} router: {FORMAT}'s router is a sigmoid "
                               "(--moe-router-score-function sigmoid)"),
        "layers": when(_layers_ok, lambda layers, model, moe:
                       f"MoE layers {list(layers)}: {FORMAT} has its dense layers first, then "
                       "MoE in every layer (--moe-layer-freq 1 --first-k-dense-replace K)"),
        "router_num_groups": when(_groups_ok, lambda groups, model, moe:
                                  f"--moe-router-num-groups with top-{moe.topk} and "
                                  f"--moe-router-group-topk {moe.router_group_topk}: Megatron-"
                                  f"Core scores a group by its best {moe.topk} // "
                                  f"{moe.router_group_topk} experts, {FORMAT} by its best 2 (use "
                                  "--moe-router-topk = 2 x --moe-router-group-topk)"),
        "shared_expert_intermediate_size": when(
            lambda size, model, moe: size is None or size % _expert_ffn(model, moe) == 0,
            lambda size, model, moe: f"a shared expert of width {size}: {FORMAT}'s is "
                                     "n_shared_experts x the experts' FFN "
                                     f"{_expert_ffn(model, moe)} (--moe-ffn-hidden-size)"),
        "shared_expert_gate": only(False, message=f"a gated shared expert "
                                                  f"(--moe-shared-expert-gate): {FORMAT}'s is "
                                                  "ungated"),
        # written to config.json: num_experts as n_routed_experts, expert_ffn_hidden_size as
        # moe_intermediate_size, the gate normalization as norm_topk_prob, topk_scaling_factor
        # as routed_scaling_factor, the bias as e_score_correction_bias, the group top-k as
        # topk_group; pre_softmax means nothing to a sigmoid, router_dtype only rounds
        **any_value("num_experts", "topk", "expert_ffn_hidden_size", "gate_normalization",
                    "topk_scaling_factor", "enable_expert_bias", "router_group_topk",
                    "aux_loss_coeff", "bias_update_rate", "pre_softmax", "router_dtype"),
    },
)


# ---- export -------------------------------------------------------------------------------------
def hub_tensors(tensors, model: ModelConfig, moe: MoEConfig,
                dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    def block(tensors, ours: str, theirs: str) -> dict:
        out = llama.experts(tensors, ours + "mlp.", theirs + "mlp.", moe.num_experts, _NAMES)
        bias = (tensors[ours + "mlp.router.gate.expert_bias"] if moe.enable_expert_bias
                else torch.zeros(moe.num_experts))
        out[theirs + "mlp.gate.e_score_correction_bias"] = bias.float()
        out.update(_shared(tensors, ours + "mlp.shared_expert.", theirs + "mlp.", model, moe,
                           dtype))
        return out
    return llama.hub_tensors(tensors, model, moe, block)


def _shared(tensors, ours: str, theirs: str, model: ModelConfig, moe: MoEConfig, dtype) -> dict:
    names = [theirs + n for n in _SHARED]
    if moe.shared_expert_intermediate_size is None:  # a zero shared expert contributes 0
        f, h = _expert_ffn(model, moe), model.hidden_size
        return {n: torch.zeros(s, dtype=dtype) for n, s in zip(names, ((f, h), (f, h), (h, f)))}
    return dict(zip(names, (tensors[ours + "fc1.weight.gate"], tensors[ours + "fc1.weight.up"],
                            tensors[ours + "fc2.weight"])))


def _norm_topk(moe: MoEConfig) -> bool:
    """Our sigmoid gate keeps top-1's raw score in every mode, and over k > 1 renormalizes
    unless the mode is none (over the surviving choices: the same with no token dropped)."""
    return moe.topk > 1 and moe.gate_normalization != "none"


def hub_config(model: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> dict:
    ffn = _expert_ffn(model, moe)
    config = llama.hub_config(FORMAT, ARCHITECTURE, model, moe, dtype)
    config["rope_parameters"]["partial_rotary_factor"] = model.rotary_percent
    return {**config, "partial_rotary_factor": model.rotary_percent,
            "intermediate_size": model.ffn_hidden_size, "moe_intermediate_size": ffn,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": (moe.shared_expert_intermediate_size or ffn) // ffn,
            "first_k_dense_replace": _first_k(model, moe),
            "n_group": moe.router_num_groups or 1, "topk_group": moe.router_group_topk or 1,
            "routed_scaling_factor": moe.topk_scaling_factor or 1.0,
            "norm_topk_prob": _norm_topk(moe), "use_qk_norm": model.qk_layernorm,
            "attention_bias": False, "num_nextn_predict_layers": 0}


# ---- import -------------------------------------------------------------------------------------
def configs_from_hub(config: dict) -> tuple[ModelConfig, MoEConfig]:
    """Our configs of a Glm4Moe config.json (a missing key raises KeyError)."""
    if config.get("attention_bias", False):
        raise ConversionError("config.json: attention_bias true: biases in the attention "
                              "projections are not supported")
    groups, group_topk = config.get("n_group", 1), config.get("topk_group", 1)
    k = config["num_experts_per_tok"]
    if groups > 1 and k != 2 * group_topk:
        raise ConversionError(f"config.json: n_group {groups} with topk_group {group_topk} and "
                              f"num_experts_per_tok {k}: groups scored by their best 2 experts "
                              "are ours only when num_experts_per_tok = 2 x topk_group")
    model = llama.model_from_hub(config, ffn_hidden_size=config["intermediate_size"],
                                 qk_layernorm=config.get("use_qk_norm", False), head_dim=True)
    rope = config.get("rope_parameters") or {}
    model = dataclasses.replace(model, rotary_percent=float(
        rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))))
    ffn, shared = config["moe_intermediate_size"], config.get("n_shared_experts", 1)
    scale = config.get("routed_scaling_factor", 1.0)
    moe = MoEConfig(num_experts=config["n_routed_experts"],
                    layers=tuple(range(config.get("first_k_dense_replace", 1), model.num_layers)),
                    topk=k, drop_tokens=False, score_function="sigmoid",
                    gate_normalization="topk" if config.get("norm_topk_prob", True) else "none",
                    topk_scaling_factor=None if scale == 1.0 else scale,
                    enable_expert_bias=True, aux_loss_type="none", aux_loss_coeff=0.0,
                    router_num_groups=groups if groups > 1 else None,
                    router_group_topk=group_topk if groups > 1 else None,
                    expert_ffn_hidden_size=ffn,
                    shared_expert_intermediate_size=ffn * shared if shared else None)
    return model, moe


def from_hub(model: ModelConfig, moe: MoEConfig,
             hf: dict[str, torch.Tensor]) -> tuple[ModelConfig, MoEConfig, dict]:
    model = llama.checked_hub(FORMAT, hub_tensors, model, moe, hf, _shape)
    if all(not hf[f"model.layers.{i}.mlp.{n}"].any() for i in moe.layers for n in _SHARED):
        moe = dataclasses.replace(moe, shared_expert_intermediate_size=None)  # export's zeros

    def bias_and_shared(ours: str, theirs: str) -> dict:
        out = {ours + "router.gate.expert_bias": hf[theirs + "gate.e_score_correction_bias"]}
        if moe.shared_expert_intermediate_size is not None:
            gate, up, down = (hf[theirs + n] for n in _SHARED)
            out.update({ours + "shared_expert.fc1.weight.gate": gate,
                        ours + "shared_expert.fc1.weight.up": up,
                        ours + "shared_expert.fc2.weight": down})
        return out

    return model, moe, llama.moe_hub_to_stored(hf, model, moe, _NAMES, bias_and_shared)


def _shape(name: str, model: ModelConfig, moe: MoEConfig) -> tuple[int, ...]:
    f = model.ffn_hidden_size
    if ".experts." in name:
        f = _expert_ffn(model, moe)
    elif ".shared_experts." in name:
        f = moe.shared_expert_intermediate_size or _expert_ffn(model, moe)
    if name.endswith("e_score_correction_bias"):
        return (moe.num_experts,)
    return llama.moe_shape(name, model, moe, f)
