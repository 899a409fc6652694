"""Pre-norm transformer layer with Megatron tensor parallelism.

Activations between blocks are [b, s, h] and replicated over the TP group. Attention splits heads
over TP (QKV column-parallel, projection row-parallel: one all-reduce forward, one backward);
the MLP is fc1 column-parallel -> activation -> fc2 row-parallel. The MLP slot returns
`(y, aux)`: aux is None for a dense MLP and the MoE layer's auxiliary losses otherwise.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron.model.config import ModelConfig
from megatron.model.params import set_spec
from megatron.model.recompute import checkpoint
from megatron.model.rng import TPRandom
from megatron.parallel.topology import TEDGroups


def _no_init(_):
    """Megatron's layers take an init method; ours runs later in params.init_parameters."""


def megatron_parallel_config(cfg: ModelConfig, groups: TEDGroups) -> ModelParallelConfig:
    # CPU construction, no megatron init (ours is layout-independent), no CUDA-only fusions.
    return ModelParallelConfig(
        tensor_model_parallel_size=groups.tp.size,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def output_std(cfg: ModelConfig) -> float:
    """Megatron's scaled init for the layers that write into the residual stream."""
    return cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)


def column_linear(mp, groups, in_size, out_size, *, std, bias, stride=1, weight=True,
                  rows=None) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(
        in_size, out_size, config=mp, init_method=_no_init, bias=bias, gather_output=False,
        stride=stride, skip_weight_param_allocation=not weight, tp_group=groups.tp.pg,
    )
    if weight:
        set_spec(layer.weight, init="normal", std=std, tp_dim=0, tp_stride=stride, rows=rows)
    if bias:
        set_spec(layer.bias, init="zeros", tp_dim=0, tp_stride=stride)
    return layer


def row_linear(mp, groups, in_size, out_size, *, std, bias) -> RowParallelLinear:
    layer = RowParallelLinear(
        in_size, out_size, config=mp, init_method=_no_init, bias=bias, input_is_parallel=True,
        skip_bias_add=False, tp_group=groups.tp.pg,
    )
    set_spec(layer.weight, init="normal", std=std, tp_dim=1)
    if bias:
        set_spec(layer.bias, init="zeros")  # added after the all-reduce: replicated
    return layer


def build_norm(cfg: ModelConfig) -> torch.nn.Module:
    if cfg.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
    else:
        norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
        set_spec(norm.bias, init="zeros")
    set_spec(norm.weight, init="ones")
    return norm


def activation(cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """GELU, or SwiGLU on [gate | up] halves of the last dim (each split alike over TP)."""
    if cfg.swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


# ---- rotary position embedding (Megatron's non-interleaved form) ------------------------------
class RotaryEmbedding(torch.nn.Module):
    """Frequencies are computed in fp32 at every call (no buffer), so casting the model to bf16
    cannot round them."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [b, 1, s, head_dim] for the given positions [b, s]."""
        d = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                     device=position_ids.device) / d))
        freqs = position_ids.float().unsqueeze(-1) * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---- blocks -----------------------------------------------------------------------------------
class SelfAttention(torch.nn.Module):
    """Causal self-attention with G query groups (grouped-query attention; G = heads is plain
    multi-head): this rank computes groups [tp*G/TP, (tp+1)*G/TP) and their query heads.

    The full QKV weight's rows are ordered [group, (q_1 .. q_{heads/G}, k, v), head_dim] (Megatron's
    layout), so a contiguous TP slice holds whole groups with their queries, key and value."""

    def __init__(self, cfg: ModelConfig, mp, groups: TEDGroups, rng: TPRandom):
        super().__init__()
        self.cfg, self.rng = cfg, rng
        self.recompute_core = False  # selective recompute: checkpoint the attention core only
        self.groups = cfg.num_query_groups // groups.tp.size
        self.per_group = cfg.num_attention_heads // cfg.num_query_groups
        self.heads = self.groups * self.per_group
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_size = cfg.num_query_groups * (self.per_group + 2) * d
        self.qkv = column_linear(mp, groups, h, qkv_size, std=cfg.init_method_std,
                                 bias=cfg.add_bias_linear)
        self.proj = row_linear(mp, groups, h, h, std=output_std(cfg), bias=cfg.add_bias_linear)

    def forward(self, x_BSH: torch.Tensor, rope: Optional[tuple]) -> torch.Tensor:
        b, s, _ = x_BSH.shape
        qkv, _ = self.qkv(x_BSH)
        r, d = self.per_group, self.cfg.head_dim
        qkv = qkv.view(b, s, self.groups, r + 2, d)
        q = qkv[:, :, :, :r].reshape(b, s, self.heads, d).transpose(1, 2)  # [b, heads, s, d]
        k, v = (qkv[:, :, :, i].transpose(1, 2) for i in (r, r + 1))  # [b, groups, s, d]
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.recompute_core:
            ctx = checkpoint(self._core, q, k, v, rng=self.rng)
        else:
            ctx = self._core(q, k, v)
        out, _ = self.proj(ctx.transpose(1, 2).reshape(b, s, self.heads * self.cfg.head_dim))
        return out


    def _core(self, q, k, v):
        p = self.cfg.attention_dropout if self.training else 0.0
        gqa = self.per_group > 1  # query head i reads key/value group i // per_group
        if p == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        with self.rng.fork():  # dropout on this rank's heads: a per-TP-rank stream
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                  enable_gqa=gqa)


class MLP(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mp, groups: TEDGroups):
        super().__init__()
        self.cfg = cfg
        stride = 2 if cfg.swiglu else 1
        f = cfg.ffn_hidden_size
        self.fc1 = column_linear(mp, groups, cfg.hidden_size, stride * f, std=cfg.init_method_std,
                                 bias=cfg.add_bias_linear, stride=stride)
        self.fc2 = row_linear(mp, groups, f, cfg.hidden_size, std=output_std(cfg),
                              bias=cfg.add_bias_linear)

    def forward(self, x: torch.Tensor):
        h, _ = self.fc1(x)
        y, _ = self.fc2(activation(self.cfg, h))
        return y, None


class TransformerLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mp, groups: TEDGroups, rng: TPRandom, mlp=None):
        """`mlp`: the feed-forward block (e.g. an MoE layer returning (y, aux)); None: the dense
        MLP."""
        super().__init__()
        self.hidden_dropout = cfg.hidden_dropout
        self.input_norm = build_norm(cfg)
        self.attention = SelfAttention(cfg, mp, groups, rng)
        self.post_attention_norm = build_norm(cfg)
        self.mlp = MLP(cfg, mp, groups) if mlp is None else mlp

    def forward(self, x: torch.Tensor, rope: Optional[tuple]):
        x = x + F.dropout(self.attention(self.input_norm(x), rope), self.hidden_dropout,
                          self.training)
        h, aux = self.mlp(self.post_attention_norm(x))
        return x + F.dropout(h, self.hidden_dropout, self.training), aux
