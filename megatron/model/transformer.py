"""Pre-norm transformer layer with Megatron tensor parallelism.

Activations between blocks are [b, s, h] and replicated over the TP group. Attention splits heads
over TP (QKV column-parallel, projection row-parallel: one all-reduce forward, one backward);
the MLP is fc1 column-parallel -> activation -> fc2 row-parallel. The MLP slot returns
`(y, aux)`: aux is None for a dense MLP and the MoE layer's auxiliary losses otherwise.

Sequence parallelism (Megatron's, `groups.sequence_parallel`): between blocks each TP rank holds
[b, s/TP, h], its part of the sequence, so norms, dropout and residuals cost 1/TP. A column-
parallel linear all-gathers the sequence first (backward: reduce-scatter) and a row-parallel one
reduce-scatters its output instead of all-reducing it (backward: all-gather): the same bytes as
the two all-reduces. Parameters used on this rank's part only (norms, the row-parallel biases)
get partial gradients, summed over TP by the optimizer (ParamSpec.sequence_parallel). The
collectives are ours (megatron.parallel.comm): megatron-core's sequence-parallel path allocates
its buffers on CUDA.
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
from megatron.model.rotary import RotaryEmbedding, apply_rotary  # noqa: F401 (moved there)
from megatron.model.rng import TPRandom
from megatron.parallel import comm
from megatron.parallel.context import causal_attention
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


class _GatherLinear(torch.autograd.Function):
    """y = all-gather(x) @ w.T (+ b), keeping only this rank's part of x for the backward, which
    gathers it again for the weight gradient (as Megatron's sequence-parallel linear does): the
    whole sequence's input is never held between forward and backward. The input gradient is
    reduce-scattered back to this rank's part."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        with comm.unstashed():  # a recompute gathers again: CAC keeps no whole sequence
            whole = comm.gather_sequence(x.detach(), group)
        return F.linear(whole, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        whole = comm.gather_sequence(x, ctx.group)
        g = g.contiguous()
        grad_w = g.flatten(0, -2).t() @ whole.flatten(0, -2)
        grad_b = g.flatten(0, -2).sum(0) if ctx.has_bias else None
        grad_x = comm.reduce_scatter_sequence(g @ weight, ctx.group)
        return grad_x, grad_w, grad_b, None


class _SequenceParallelColumn(ColumnParallelLinear):
    """The column-parallel linear under sequence parallelism: all-gather the sequence over TP,
    then this rank's GEMM (backward: reduce-scatter of the input gradient)."""

    def forward(self, x, weight=None):
        w = self.weight if weight is None else weight
        return _GatherLinear.apply(x, w, self.bias, self.ted_tp), None


class _SequenceParallelRow(RowParallelLinear):
    """The row-parallel linear under sequence parallelism: this rank's GEMM, then reduce-scatter
    over TP by sequence; the (replicated) bias added to this rank's part."""

    def forward(self, x):
        with comm.unstashed():
            y = comm.reduce_scatter_sequence(F.linear(x, self.weight), self.ted_tp)
        return (y if self.bias is None else y + self.bias), None


def column_linear(mp, groups, in_size, out_size, *, std, bias, stride=1, weight=True,
                  rows=None) -> ColumnParallelLinear:
    cls = _SequenceParallelColumn if groups.sequence_parallel else ColumnParallelLinear
    layer = cls(
        in_size, out_size, config=mp, init_method=_no_init, bias=bias, gather_output=False,
        stride=stride, skip_weight_param_allocation=not weight, tp_group=groups.tp.pg,
    )
    layer.ted_tp = groups.tp
    if weight:
        set_spec(layer.weight, init="normal", std=std, tp_dim=0, tp_stride=stride, rows=rows)
    if bias:
        set_spec(layer.bias, init="zeros", tp_dim=0, tp_stride=stride)
    return layer


def row_linear(mp, groups, in_size, out_size, *, std, bias) -> RowParallelLinear:
    cls = _SequenceParallelRow if groups.sequence_parallel else RowParallelLinear
    layer = cls(
        in_size, out_size, config=mp, init_method=_no_init, bias=bias, input_is_parallel=True,
        skip_bias_add=False, tp_group=groups.tp.pg,
    )
    layer.ted_tp = groups.tp
    set_spec(layer.weight, init="normal", std=std, tp_dim=1)
    if bias:
        # added after the all-reduce (replicated), or to this rank's part under SP
        set_spec(layer.bias, init="zeros", sequence_parallel=groups.sequence_parallel)
    return layer


def build_norm(cfg: ModelConfig, sequence_parallel: bool = False) -> torch.nn.Module:
    """`sequence_parallel`: the norm runs on this rank's part of the sequence (its gradients are
    partial over TP)."""
    sp = dict(sequence_parallel=sequence_parallel)
    if cfg.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
    else:
        norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
        set_spec(norm.bias, init="zeros", **sp)
    set_spec(norm.weight, init="ones", **sp)
    return norm


def activation(cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """GELU, or SwiGLU on [gate | up] halves of the last dim (each split alike over TP)."""
    if cfg.swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


# ---- blocks -----------------------------------------------------------------------------------
class HeadNorm(torch.nn.Module):
    """Megatron-Core's QK-norm: one norm (of --normalization's type) over each head's dims, its
    weight shared by all heads. A TP rank holds some of the heads, so its weight gradient is a
    partial sum: the weight enters through `copy_to_split` (backward: all-reduce over TP), so
    every TP rank holds the full, identical gradient of a replicated parameter."""

    def __init__(self, cfg: ModelConfig, dim: int, groups: TEDGroups):
        super().__init__()
        self.tp, self.eps, self.rms = groups.tp, cfg.norm_epsilon, cfg.normalization == "RMSNorm"
        self.weight = set_spec(torch.nn.Parameter(torch.empty(dim)), init="ones")
        self.bias = None
        if not self.rms:
            self.bias = set_spec(torch.nn.Parameter(torch.empty(dim)), init="zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = comm.copy_to_split(self.weight, self.tp)
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return F.layer_norm(x, (x.shape[-1],), w, comm.copy_to_split(self.bias, self.tp),
                            self.eps)


def build_attention(cfg: ModelConfig, mp, groups: TEDGroups, rng: TPRandom) -> torch.nn.Module:
    """The layer's attention: multi-latent (megatron/model/mla.py) or SelfAttention."""
    if cfg.multi_latent_attention:
        from megatron.model.mla import MLASelfAttention  # it builds on this module's linears

        return MLASelfAttention(cfg, mp, groups, rng)
    return SelfAttention(cfg, mp, groups, rng)


class SelfAttention(torch.nn.Module):
    """Causal self-attention with G query groups (grouped-query attention; G = heads is plain
    multi-head): this rank computes groups [tp*G/TP, (tp+1)*G/TP) and their query heads.

    The full QKV weight's rows are ordered [group, (q_1 .. q_{heads/G}, k, v), head_dim] (Megatron's
    layout), so a contiguous TP slice holds whole groups with their queries, key and value.
    head_dim is --kv-channels (default hidden / heads); with --qk-layernorm each head's q and k
    are normalized before rotary; rotary turns the first --rotary-percent of each head's dims."""

    def __init__(self, cfg: ModelConfig, mp, groups: TEDGroups, rng: TPRandom):
        super().__init__()
        self.cfg, self.rng, self.cp = cfg, rng, groups.cp
        self.recompute_core = False  # selective recompute: checkpoint the attention core only
        self.groups = cfg.num_query_groups // groups.tp.size
        self.per_group = cfg.num_attention_heads // cfg.num_query_groups
        self.heads = self.groups * self.per_group
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_size = cfg.num_query_groups * (self.per_group + 2) * d
        self.qkv = column_linear(mp, groups, h, qkv_size, std=cfg.init_method_std,
                                 bias=cfg.add_bias_linear)
        self.q_norm = self.k_norm = None
        if cfg.qk_layernorm:
            self.q_norm, self.k_norm = HeadNorm(cfg, d, groups), HeadNorm(cfg, d, groups)
        self.proj = row_linear(mp, groups, cfg.num_attention_heads * d, h, std=output_std(cfg),
                               bias=cfg.add_bias_linear)

    def forward(self, x_BSH: torch.Tensor, rope: Optional[tuple]) -> torch.Tensor:
        qkv, _ = self.qkv(x_BSH)  # [b, s, ...]: the whole sequence, also under SP
        b, s = qkv.shape[:2]
        r, d = self.per_group, self.cfg.head_dim
        qkv = qkv.view(b, s, self.groups, r + 2, d)
        q = qkv[:, :, :, :r].reshape(b, s, self.heads, d).transpose(1, 2)  # [b, heads, s, d]
        k, v = (qkv[:, :, :, i].transpose(1, 2) for i in (r, r + 1))  # [b, groups, s, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.recompute_core:
            ctx = checkpoint(self._core, q, k, v, rng=self.rng)
        else:
            ctx = self._core(q, k, v)
        out, _ = self.proj(ctx.transpose(1, 2).reshape(b, s, self.heads * d))
        return out

    def _core(self, q, k, v):
        """Causal attention (over context parallelism: keys and values gathered over CP)."""
        p = self.cfg.attention_dropout if self.training else 0.0
        gqa = self.per_group > 1  # query head i reads key/value group i // per_group
        if p == 0:
            return causal_attention(q, k, v, self.cp, enable_gqa=gqa)
        with self.rng.fork():  # dropout on this rank's heads: a per-TP-rank stream
            return causal_attention(q, k, v, self.cp, dropout=p, enable_gqa=gqa)


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
        self.hidden_dropout, self.rng = cfg.hidden_dropout, rng
        self.sequence_parallel = groups.sequence_parallel
        self.input_norm = build_norm(cfg, groups.sequence_parallel)
        self.attention = build_attention(cfg, mp, groups, rng)
        self.post_attention_norm = build_norm(cfg, groups.sequence_parallel)
        self.mlp = MLP(cfg, mp, groups) if mlp is None else mlp

    def forward(self, x: torch.Tensor, rope: Optional[tuple]):
        """x: [b, s, h], or this rank's part [b, s/TP, h] under sequence parallelism."""
        x = x + self._dropout(self.attention(self.input_norm(x), rope))
        h, aux = self.mlp(self.post_attention_norm(x))
        return x + self._dropout(h), aux

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        return hidden_dropout(h, self.hidden_dropout, self.training, self.rng,
                              self.sequence_parallel)


def hidden_dropout(h: torch.Tensor, p: float, training: bool, rng: TPRandom,
                   sequence_parallel: bool) -> torch.Tensor:
    """Dropout in the residual stream: the default stream where TP ranks hold the same
    positions; under sequence parallelism each holds its own part, so masks come from the
    per-TP-rank stream (as Megatron forks its model-parallel RNG there)."""
    if not training or p == 0:
        return h
    if not sequence_parallel:
        return F.dropout(h, p, True)
    with rng.fork():
        return F.dropout(h, p, True)
