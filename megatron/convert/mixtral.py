"""Mixtral (MixtralForCausalLM): RMSNorm, RoPE (rotate-half), SwiGLU experts, no biases, MoE in
every layer, top-k gates renormalized over the k choices (top-1 weight 1.0). Export and import."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.convert import llama
from megatron.convert.allowlist import Declaration, any_value, only, when
from megatron.convert.common import renormalized_over_topk
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "mixtral", "MixtralForCausalLM"


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
        "shared_expert_intermediate_size": only(None, message=lambda size, model, moe:
                                                f"a shared expert (--moe-shared-expert-"
                                                f"intermediate-size {size}): Mixtral has none; "
                                                "export as qwen2_moe"),
        # only with a shared expert (refused above)
        **any_value("shared_expert_gate"),
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
    model = llama.model_from_hub(config, ffn_hidden_size=config["intermediate_size"])
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
    model = llama.checked_hub(FORMAT, hub_tensors, model, moe, hf, _shape)
    return model, moe, _to_stored(hf, model, moe)


def _shape(name: str, model: ModelConfig, moe: MoEConfig) -> tuple[int, ...]:
    """The shape config.json implies for a Mixtral Hub tensor (nn.Linear weights are [out, in])."""
    h, f = model.hidden_size, model.ffn_hidden_size
    if name.endswith("gate.weight"):
        return moe.num_experts, h
    if name.endswith(("w1.weight", "w3.weight")):
        return f, h
    if name.endswith("w2.weight"):
        return h, f
    return llama.shape(name, model)


def _to_stored(hf, model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Tensor]:
    out = llama.to_stored(hf, model)
    for i in range(model.num_layers):
        ours, moe_in = f"layers.{i}.", f"model.layers.{i}.block_sparse_moe."
        out.update(llama.experts_to_stored(hf, ours + "mlp.", moe_in, moe.num_experts,
                                           ("w1", "w3", "w2")))
    return out
