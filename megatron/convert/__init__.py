"""Our stored tensors <-> Hugging Face models (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4-MoE,
GPT-2), and the consolidated one-process files.

Stored tensors are what a checkpoint holds whatever the layout (megatron.model.params): full
tensors by parameter name, each expert under its global id, SwiGLU's [gate | up] as ".gate" and
".up", the vocabulary without padding rows. Export maps them to the Hub's tensor names and a
config.json that transformers (5.x, and the 4.x Hub layout it converts from) loads with no
missing or unexpected keys; import maps a Mixtral, Qwen2-MoE, Qwen3-MoE or GLM-4-MoE Hub
directory back. Every mapping is a permutation, split, transpose or exact power-of-two scaling,
so a round trip is bit-exact.

One adapter per format, each declaring what it can express (its EXPRESSES, allowlist.py): for
every field of ModelConfig and MoEConfig, any value or the values it can, with the message
naming what blocks the others; a field it does not declare is refused by name. `blockers`
names whatever does not fit:
  mixtral    RMSNorm, RoPE (rotate-half), SwiGLU experts, no biases, MoE in every layer, top-k
             gates renormalized over the k choices (top-1 weight 1.0)
  qwen2_moe  like Mixtral, but dense SwiGLU layers may sit between MoE layers (mlp_only_layers)
             and the gates may stay raw probabilities (norm_topk_prob false: DeepSpeed's top-1);
             our shared expert is its shared expert (ungated: a zero gate and down_proj x 2; none:
             zeros)
  qwen3_moe  Qwen2-MoE's layout without a shared expert, with per-head QK-norm (--qk-layernorm)
             and a free head_dim (--kv-channels)
  glm4_moe   sigmoid router with a selection bias and group-limited routing, an ungated shared
             expert, dense layers first, partial rotary, optional QK-norm
  gpt2       dense, LayerNorm, learned positions, exact GELU; a model without biases gets zero
             biases (the same function)
No Hugging Face model has an expert capacity: an exported MoE model computes ours with
--disable-moe-token-dropping (or with no token dropped).

allowlist.py   the declarations' vocabulary (ANY, only, when, Declaration)
common.py      the error, QKV split / fuse, config.json's common keys
llama.py       what the Llama-style formats share (tensor names outside the MoE block, config,
               import's checks)
mixtral.py, qwen2_moe.py, qwen3_moe.py, glm4_moe.py, gpt2.py   one adapter per format (all
               but gpt2 import)
hub.py         Hub directories, the tokenizer's files, the consolidated files
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.convert import deepseek_v3, glm4_moe, gpt2, mixtral, qwen2_moe, qwen3_moe
from megatron.convert.common import (
    HAS_GQA as _HAS_GQA,
    ConversionError,
    fuse_qkv,
    query_groups,
    split_qkv,
)
from megatron.convert.hub import (
    CONSOLIDATED_META,
    CONSOLIDATED_TENSORS,
    is_consolidated,
    read_hf,
    read_model,
    write_consolidated,
    write_hf,
    write_hf_tokenizer,
)
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

# An exporter has FORMAT, ARCHITECTURE, EXPRESSES (its Declaration), hub_tensors(tensors, model,
# moe, dtype) and hub_config(model, moe, dtype); an importer also configs_from_hub(config) and
# from_hub(model, moe, hf).
ADAPTERS = {adapter.FORMAT: adapter
            for adapter in (mixtral, qwen2_moe, qwen3_moe, glm4_moe, deepseek_v3, gpt2)}
IMPORTERS = {adapter.FORMAT: adapter
             for adapter in (mixtral, qwen2_moe, qwen3_moe, glm4_moe)}
EXPORT_FORMATS = tuple(ADAPTERS)
IMPORT_FORMATS = tuple(IMPORTERS)
ARCHITECTURES = {fmt: adapter.ARCHITECTURE for fmt, adapter in ADAPTERS.items()}

__all__ = ["ADAPTERS", "IMPORTERS", "EXPORT_FORMATS", "IMPORT_FORMATS", "ARCHITECTURES",
           "CONSOLIDATED_META", "CONSOLIDATED_TENSORS", "ConversionError", "blockers",
           "check_exportable", "to_hf", "from_hf", "configs_from_hf", "read_hf", "write_hf",
           "write_hf_tokenizer", "read_model", "write_consolidated", "is_consolidated",
           "split_qkv", "fuse_qkv", "query_groups", "_HAS_GQA"]


def _exporter(fmt: str):
    if fmt not in ADAPTERS:
        raise ConversionError(f"unknown format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    return ADAPTERS[fmt]


# ---- what fits each format ----------------------------------------------------------------------
def blockers(fmt: str, model: ModelConfig, moe: Optional[MoEConfig]) -> list[str]:
    """The features of (model, moe) that `fmt` cannot express, each naming the flag to change;
    empty when the model fits."""
    return _exporter(fmt).EXPRESSES.blockers(model, moe)


def check_exportable(fmt: str, model: ModelConfig, moe: Optional[MoEConfig]) -> None:
    found = blockers(fmt, model, moe)
    if found:
        raise ConversionError(f"cannot export as {fmt}: " + "; ".join(found))


# ---- export -------------------------------------------------------------------------------------
def to_hf(fmt: str, tensors: dict[str, torch.Tensor], model: ModelConfig,
          moe: Optional[MoEConfig], special_ids: Optional[dict] = None,
          dtype: Optional[torch.dtype] = None) -> tuple[dict, dict]:
    """(config.json contents, {Hub tensor name: tensor}) of the model, in `dtype` (default: the
    stored tensors'). `special_ids` may give bos_token_id / eos_token_id / pad_token_id (the
    tokenizer's). Raises ConversionError when the model does not fit `fmt` or a stored tensor is
    missing."""
    check_exportable(fmt, model, moe)
    adapter = ADAPTERS[fmt]
    dtype = dtype or next(iter(tensors.values())).dtype
    try:
        hf = adapter.hub_tensors(tensors, model, moe, dtype)
    except KeyError as e:
        raise ConversionError(f"no stored tensor {e.args[0]!r}: the tensors do not match the "
                              "model's config") from None
    hf = {name: t.to(dtype) for name, t in hf.items()}
    config = adapter.hub_config(model, moe, dtype)
    config.update({k: v for k, v in (special_ids or {}).items()
                   if v is not None and 0 <= v < model.vocab_size})
    return config, hf


# ---- import -------------------------------------------------------------------------------------
def configs_from_hf(fmt: str, config: dict) -> tuple[ModelConfig, MoEConfig]:
    """Our configs of a Hub config.json. Raises ConversionError naming the first key we cannot
    represent."""
    if fmt not in IMPORTERS:
        raise ConversionError(f"import --format {fmt!r}: only {', '.join(IMPORT_FORMATS)} can be "
                              "imported")
    if config.get("model_type") != fmt:
        raise ConversionError(f"config.json has model_type {config.get('model_type')!r}, not "
                              f"{fmt!r}")
    try:
        return IMPORTERS[fmt].configs_from_hub(config)
    except KeyError as e:
        raise ConversionError(f"config.json has no {e.args[0]!r}") from None


def from_hf(fmt: str, config: dict,
            hf: dict[str, torch.Tensor]) -> tuple[ModelConfig, MoEConfig, dict]:
    """(model config, MoE config, stored tensors) of a Hub model. Raises ConversionError naming
    missing or unexpected tensors."""
    model, moe = configs_from_hf(fmt, config)
    return IMPORTERS[fmt].from_hub(model, moe, hf)
