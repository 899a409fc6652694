"""Rotary position embedding: Megatron-Core's non-interleaved form, partial rotary
(`rotary_percent`: the first int(head_dim x percent) dims of each head rotate, the rest pass
through) and YaRN (`rope_type` yarn: frequencies blended between the original and the
`rotary_scaling_factor`-interpolated ones by a ramp over the dims, cos and sin scaled by the
concentration factor mscale(s, mscale) / mscale(s, mscale_all_dim)), as
megatron/core/models/common/embeddings/{rotary,yarn_rotary}_pos_embedding.py define them.

Frequencies are computed in fp32 at every call (no buffer), so casting the model to bf16 cannot
round them. Nothing here depends on the layout: every TP rank rotates its own heads alike.
"""

from __future__ import annotations

import math

import torch

from megatron.model.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_positions: int) -> float:
    """The dim whose wavelength makes `rotations` turns over `max_positions` positions."""
    return dim * math.log(max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))


class RotaryEmbedding(torch.nn.Module):
    """cos and sin for the rotated dims of one head (`dim`: the head's dims that carry a position;
    the rotary part is int(dim x percent) of them)."""

    def __init__(self, dim: int, base: float, *, percent: float = 1.0, rope_type: str = "rope",
                 scaling_factor: float = 1.0, original_max_position_embeddings: int = 4096,
                 beta_fast: float = 32.0, beta_slow: float = 1.0, mscale: float = 1.0,
                 mscale_all_dim: float = 0.0):
        super().__init__()
        self.rot_dim = int(dim * percent) if percent < 1.0 else dim
        self.base, self.rope_type = base, rope_type
        self.scaling_factor, self.original = scaling_factor, original_max_position_embeddings
        self.beta_fast, self.beta_slow = beta_fast, beta_slow
        self.concentration = 1.0
        if rope_type == "yarn":
            self.concentration = (yarn_mscale(scaling_factor, mscale)
                                  / yarn_mscale(scaling_factor, mscale_all_dim))

    def inv_freq(self, device=None) -> torch.Tensor:
        d = self.rot_dim
        inv = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        if self.rope_type != "yarn":
            return inv
        # YaRN: dims that turn fewer than beta_slow times over the original context take the
        # interpolated frequency, those over beta_fast times keep theirs, a linear ramp between
        low = math.floor(_correction_dim(self.beta_fast, d, self.base, self.original))
        high = math.ceil(_correction_dim(self.beta_slow, d, self.base, self.original))
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low)
                / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp
        return inv / self.scaling_factor * (1 - keep) + inv * keep

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [b, 1, s, rot_dim] for the given positions [b, s] (YaRN's
        concentration factor folded in)."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        if self.concentration == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.concentration, emb.sin() * self.concentration


def build_rotary(cfg: ModelConfig, dim: int) -> RotaryEmbedding:
    """The model's rotary embedding for heads of `dim` position-carrying dims (head_dim, or MLA's
    qk_pos_emb_head_dim)."""
    return RotaryEmbedding(
        dim, cfg.rotary_base, percent=cfg.rotary_percent, rope_type=cfg.rope_type,
        scaling_factor=cfg.rotary_scaling_factor,
        original_max_position_embeddings=cfg.original_max_position_embeddings,
        beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
        mscale_all_dim=cfg.mscale_all_dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 interleaved_input: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [..., d] (NeoX halves); the rest pass through.
    `interleaved_input` (multi-latent attention, Megatron-Core's and DeepSeek's layout): the
    rotated dims arrive as pairs (x0, x1), (x2, x3), ... and are regrouped into halves first."""
    rot = cos.shape[-1]
    head, rest = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    if interleaved_input:
        head = torch.cat([head[..., 0::2], head[..., 1::2]], dim=-1)
    x1, x2 = head.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (head.float() * cos + rotated.float() * sin).to(x.dtype)
    return out if rest is None else torch.cat([out, rest], dim=-1)
