"""What the formats share: the error, the QKV split and fuse, and config.json's common keys."""

from __future__ import annotations

import dataclasses

import torch

from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig


class ConversionError(ValueError):
    """A model that does not fit a format, or input files that are not what they claim."""


# whether this ModelConfig has grouped-query attention (num_query_groups), which import may need
HAS_GQA = "num_query_groups" in {f.name for f in dataclasses.fields(ModelConfig)}


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


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
             groups: int) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    r, rest = heads // groups, q.shape[1:]
    parts = [q.reshape(groups, r, -1, *rest), k.reshape(groups, 1, -1, *rest),
             v.reshape(groups, 1, -1, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


def transpose(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous()


# ---- routing ------------------------------------------------------------------------------------
def renormalized_over_topk(moe: MoEConfig) -> bool:
    """Whether, with no token dropped, the gates are the top-k probabilities over their sum."""
    return (moe.gate_normalization == "topk"
            or (moe.gate_normalization == "surviving" and moe.topk > 1))


# ---- config.json --------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def base_config(fmt: str, architecture: str, model: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json keys every format has (the special token ids are filled in later)."""
    return {"architectures": [architecture], "model_type": fmt, "vocab_size": model.vocab_size,
            "initializer_range": model.init_method_std, "dtype": dtype_name(dtype),
            "use_cache": True, "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
