"""Qwen2-MoE (Qwen2MoeForCausalLM): like Mixtral, but dense SwiGLU layers may sit between MoE
layers (mlp_only_layers), the gates may stay raw probabilities (norm_topk_prob false:
DeepSpeed's top-1), and every MoE layer has a shared expert scaled by
sigmoid(shared_expert_gate . x). Export and import.

Our shared expert (ted_patches/shared_expert.py) maps onto theirs:
  gated      the same weights (the gate is theirs)
  ungated    the gate weight 0 (sigmoid 0.5) and down_proj doubled: 0.5 * (2 W) h is W h exactly
             (scaling by powers of two is exact in floating point)
  none       zeros of width 1, contributing exactly 0
Import reads them back the same way (a zero gate: ungated, down_proj halved; all zero: none),
so a round trip ours -> Hub -> ours is bit-exact. A shared expert with biases is refused with the
rest of the model's biases (--disable-bias-linear).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron.convert import llama
from megatron.convert.allowlist import Declaration, any_value
from megatron.convert.common import ConversionError, renormalized_over_topk
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT, ARCHITECTURE = "qwen2_moe", "Qwen2MoeForCausalLM"
# Qwen2-MoE always has a shared expert; a model without one gets zeros of the smallest width.
ABSENT_WIDTH = 1
SHARED = ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
          "shared_expert.down_proj.weight", "shared_expert_gate.weight")


EXPRESSES = Declaration(
    FORMAT,
    model=llama.model_rules(FORMAT),
    dense_refused="a dense model (no --num-experts): qwen2_moe is a mixture of experts",
    moe={
        **llama.moe_rules(FORMAT),
        # written to config.json: layers as mlp_only_layers, the gate normalization (with topk)
        # as norm_topk_prob, expert_ffn_hidden_size as moe_intermediate_size, the shared expert
        # as shared_expert_intermediate_size (gated or not: see above)
        **any_value("num_experts", "layers", "topk", "gate_normalization",
                    "expert_ffn_hidden_size", "aux_loss_coeff", "shared_expert_intermediate_size",
                    "shared_expert_gate"),
    },
)


# ---- export -------------------------------------------------------------------------------------
def _moe_block(model: ModelConfig, moe: MoEConfig, dtype: Optional[torch.dtype]):
    def block(tensors, ours: str, theirs: str) -> dict:
        return {**llama.experts(tensors, ours + "mlp.", theirs + "mlp.", moe.num_experts,
                                ("gate_proj", "up_proj", "down_proj")),
                **_shared_expert(tensors, ours + "mlp.shared_expert.", theirs + "mlp.", model,
                                 moe, dtype)}
    return block


def _shared_expert(tensors, ours: str, theirs: str, model: ModelConfig, moe: MoEConfig,
                   dtype) -> dict[str, torch.Tensor]:
    names = [theirs + n for n in SHARED]
    h = model.hidden_size
    if moe.shared_expert_intermediate_size is None:
        # sigmoid(0 . x) * down(silu(0 x) * 0 x) with every weight 0 is exactly 0
        w = ABSENT_WIDTH
        shapes = ((w, h), (w, h), (h, w), (1, h))
        return {n: torch.zeros(s, dtype=dtype) for n, s in zip(names, shapes)}
    down = tensors[ours + "fc2.weight"]
    if moe.shared_expert_gate:
        gate = tensors[ours + "gate.weight"]
    else:  # sigmoid(0) = 0.5 exactly: double down_proj
        gate, down = torch.zeros(1, h, dtype=down.dtype), down * 2
    return dict(zip(names, (tensors[ours + "fc1.weight.gate"], tensors[ours + "fc1.weight.up"],
                            down, gate)))


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
            "shared_expert_intermediate_size": (moe.shared_expert_intermediate_size
                                                or ABSENT_WIDTH),
            "qkv_bias": False, "use_sliding_window": False, "sliding_window": None}


# ---- import -------------------------------------------------------------------------------------
def configs_from_hub(config: dict) -> tuple[ModelConfig, MoEConfig]:
    """Our configs of a Qwen2-MoE config.json (a missing key raises KeyError). The shared expert
    is taken as gated here; `from_hub` reads from the tensors whether it is."""
    if config.get("qkv_bias", True):  # transformers' default is True
        raise ConversionError("config.json: qkv_bias true (or absent, which means true): biases "
                              "in the attention projections are not supported")
    model = llama.model_from_hub(config, ffn_hidden_size=config["intermediate_size"])
    layers = llama.qwen_moe_layers(config, model.num_layers,
                                   ": import a dense model as another format")
    moe = MoEConfig(layers=layers, **llama.qwen_moe_kwargs(config),
                    shared_expert_intermediate_size=config["shared_expert_intermediate_size"],
                    shared_expert_gate=True)
    return model, moe


def from_hub(model: ModelConfig, moe: MoEConfig,
             hf: dict[str, torch.Tensor]) -> tuple[ModelConfig, MoEConfig, dict]:
    """(model config, MoE config, stored tensors) of the Hub tensors of the model whose configs
    `configs_from_hub` read. Raises ConversionError naming missing or unexpected tensors."""
    model = llama.checked_hub(FORMAT, hub_tensors, model, moe, hf, _shape)
    moe = _shared_kind(moe, hf)

    def shared(ours: str, theirs: str) -> dict:
        if moe.shared_expert_intermediate_size is None:
            return {}
        gate, up, down, gate_w = (hf[theirs + n] for n in SHARED)
        out = {ours + "shared_expert.fc1.weight.gate": gate,
               ours + "shared_expert.fc1.weight.up": up,
               ours + "shared_expert.fc2.weight": down if moe.shared_expert_gate else down / 2}
        if moe.shared_expert_gate:
            out[ours + "shared_expert.gate.weight"] = gate_w
        return out

    return model, moe, llama.moe_hub_to_stored(hf, model, moe,
                                               ("gate_proj", "up_proj", "down_proj"), shared)


def _shared_kind(moe: MoEConfig, hf: dict) -> MoEConfig:
    """Gated, ungated (every gate weight 0) or absent (every shared-expert weight 0), as export
    writes them; the same in every MoE layer."""
    def zero(suffixes) -> bool:
        return all(not hf[f"model.layers.{i}.mlp.{s}"].any() for i in moe.layers for s in suffixes)

    if zero(SHARED):
        return dataclasses.replace(moe, shared_expert_intermediate_size=None,
                                   shared_expert_gate=False)
    if zero(SHARED[3:]):
        return dataclasses.replace(moe, shared_expert_gate=False)
    return moe


def _shape(name: str, model: ModelConfig, moe: MoEConfig) -> tuple[int, ...]:
    """The shape config.json implies for a Qwen2-MoE Hub tensor ([out, in])."""
    f = (model.ffn_hidden_size if ".experts." not in name
         else moe.expert_ffn_hidden_size or model.ffn_hidden_size)
    if ".shared_expert." in name:
        f = moe.shared_expert_intermediate_size
    if name.endswith("shared_expert_gate.weight"):
        return 1, model.hidden_size
    return llama.moe_shape(name, model, moe, f)
