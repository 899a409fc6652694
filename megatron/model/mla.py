"""Multi-latent attention (DeepSeek-V2/V3; Megatron-Core's MLASelfAttention), heads split over TP.

Per token x [H]:
    q_in  = q_norm(x W_qd^T)            [q_lora_rank]    (x itself when q_lora_rank is None)
    c, kr = split(x W_kvd^T)            [kv_lora_rank], [qk_pos_emb_head_dim]
    c     = kv_norm(c)
    q_h   = q_in W_qu,h^T               [qk_head_dim + qk_pos_emb_head_dim] per head h
    k_h,v_h = c W_kvu,h^T               [qk_head_dim], [v_head_dim] per head h
    query = [q_h nope | rope(q_h pe)], key = [k_h | rope(kr)]: the rope key is shared by every head
    out   = softmax(query key^T * mscale^2 / sqrt(qk + pe)) v, projected back [heads x v] -> [H]
The norms exist with --qk-layernorm (as in Megatron-Core's layer specs); rotary turns pairs of
the rope dims (DeepSeek's interleaved layout, regrouped into halves as Megatron-Core does), with
YaRN by default (--rope-type). mscale = YaRN's mscale(rotary_scaling_factor, mscale_all_dim).

Under sequence parallelism the layer input (this rank's part of the sequence) is all-gathered
first and the projection reduce-scatters its output back to parts (row_linear).

TP: the down projections and the latent norms are replicated; each rank's up projections hold
its heads' rows, the output projection its heads' columns (row-parallel, one all-reduce
forward). The latents enter the split region once, concatenated, through `copy_to_split`: one
all-reduce of their partial gradients in backward, so every replicated weight gets the full,
identical gradient. Full tensors (what a checkpoint stores) have one process's shapes; the up
projections' rows are ordered [head, dims], so a contiguous TP slice is whole heads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.model.config import ModelConfig
from megatron.model.params import set_spec
from megatron.model.recompute import checkpoint
from megatron.model.rng import TPRandom
from megatron.model.rotary import apply_rotary, yarn_mscale
from megatron.model.transformer import output_std, row_linear
from megatron.parallel import comm
from megatron.parallel.context import causal_attention
from megatron.parallel.topology import TEDGroups


def _weight(out_size: int, in_size: int, std: float,
            tp: Optional[int] = None) -> torch.nn.Parameter:
    """A [out, in] weight drawn in full; `tp`: split on rows over that many ranks."""
    rows = out_size if tp is None else out_size // tp
    w = torch.nn.Parameter(torch.empty(rows, in_size))
    return set_spec(w, init="normal", std=std, tp_dim=None if tp is None else 0)


def _latent_norm(cfg: ModelConfig, dim: int) -> torch.nn.Module:
    """A norm of --normalization's type over a latent (replicated; its gradient is full)."""
    if cfg.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(dim, eps=cfg.norm_epsilon)
    else:
        norm = torch.nn.LayerNorm(dim, eps=cfg.norm_epsilon)
        set_spec(norm.bias, init="zeros")
    set_spec(norm.weight, init="ones")
    return norm


class _Linear(torch.nn.Module):
    """A bias-free local matmul on this rank's weight (replicated, or this rank's rows)."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MLASelfAttention(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mp, groups: TEDGroups, rng: TPRandom):
        super().__init__()
        self.cfg, self.rng, self.tp, self.cp = cfg, rng, groups.tp, groups.cp
        self.sequence_parallel = getattr(groups, "sequence_parallel", False)
        self.recompute_core = False  # selective recompute: checkpoint the attention core only
        t, H, std = groups.tp.size, cfg.hidden_size, cfg.init_method_std
        n = cfg.num_attention_heads
        self.heads = n // t
        self.q_dim = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
        self.q_in = cfg.q_lora_rank or H
        latent = cfg.kv_lora_rank
        self.q_down = self.q_norm = self.kv_norm = None
        if cfg.q_lora_rank is not None:
            self.q_down = _Linear(_weight(cfg.q_lora_rank, H, std))
            if cfg.qk_layernorm:
                self.q_norm = _latent_norm(cfg, cfg.q_lora_rank)
        self.kv_down = _Linear(_weight(latent + cfg.qk_pos_emb_head_dim, H, std))
        if cfg.qk_layernorm:
            self.kv_norm = _latent_norm(cfg, latent)
        self.q_up = _Linear(_weight(n * self.q_dim, self.q_in, std, tp=t))
        self.kv_up = _Linear(_weight(n * (cfg.qk_head_dim + cfg.v_head_dim), latent, std, tp=t))
        self.proj = row_linear(mp, groups, n * cfg.v_head_dim, H, std=output_std(cfg),
                               bias=cfg.add_bias_linear)
        # Megatron-Core's, whatever --rope-type (1 with the default --rotary-scaling-factor 1)
        mscale = yarn_mscale(cfg.rotary_scaling_factor, cfg.mscale_all_dim)
        self.softmax_scale = mscale * mscale / math.sqrt(self.q_dim)

    def forward(self, x_BSH: torch.Tensor, rope: Optional[tuple]) -> torch.Tensor:
        cfg = self.cfg
        if self.sequence_parallel:  # this rank's part of the sequence -> all of it; the down
            # projections are replicated, so backward keeps this rank's part of a full gradient
            x_BSH = comm.gather_sequence(x_BSH, self.tp, replicated=True)
        b, s, _ = x_BSH.shape
        q_in = x_BSH if self.q_down is None else self.q_down(x_BSH)
        if self.q_norm is not None:
            q_in = self.q_norm(q_in)
        c, k_pe = self.kv_down(x_BSH).split([cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim], dim=-1)
        if self.kv_norm is not None:
            c = self.kv_norm(c)
        # into the heads' region: one all-reduce of the latents' partial gradients in backward
        z = comm.copy_to_split(torch.cat([q_in, c, k_pe], dim=-1), self.tp)
        q_in, c, k_pe = z.split([self.q_in, cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim], dim=-1)
        q = self.q_up(q_in).view(b, s, self.heads, self.q_dim).transpose(1, 2)
        kv = self.kv_up(c).view(b, s, self.heads, cfg.qk_head_dim + cfg.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([cfg.qk_head_dim, cfg.v_head_dim], dim=-1)
        q_nope, q_pe = q.split([cfg.qk_head_dim, cfg.qk_pos_emb_head_dim], dim=-1)
        k_pe = k_pe.unsqueeze(1)  # [b, 1, s, pe]: one rope key for every head
        q_pe = apply_rotary(q_pe, *rope, interleaved_input=True)
        k_pe = apply_rotary(k_pe, *rope, interleaved_input=True)
        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, k_pe.expand(-1, self.heads, -1, -1)], dim=-1)
        if self.recompute_core:
            ctx = checkpoint(self._core, query, key, v, rng=self.rng)
        else:
            ctx = self._core(query, key, v)
        out, _ = self.proj(ctx.transpose(1, 2).reshape(b, s, self.heads * cfg.v_head_dim))
        return out

    def _core(self, q, k, v):
        p = self.cfg.attention_dropout if self.training else 0.0
        if p == 0:
            return causal_attention(q, k, v, self.cp, scale=self.softmax_scale)
        with self.rng.fork():  # dropout on this rank's heads: a per-TP-rank stream
            return causal_attention(q, k, v, self.cp, dropout=p, scale=self.softmax_scale)
