"""Model configuration: pure data, no groups, no devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.parallel.fields import FieldError


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # the tokenizer's: the model's function is defined on these ids alone
    max_position_embeddings: int
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden
    # learned_absolute | rope | none (--no-position-embedding)
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    params_dtype: torch.dtype = torch.float32
    # Rows the embedding and output layer allocate (Megatron pads to a multiple of
    # make_vocab_size_divisible_by x TP, so it depends on the layout). The padded rows are zero,
    # their logits masked out and never stored: the padding does not change the model.
    padded_vocab_size: Optional[int] = None
    # grouped-query attention: key/value heads (default: one per head)
    num_query_groups: Optional[int] = None
    # ---- attention variants (Megatron-Core's fields and meanings) ----
    # head dim of q, k, v (default hidden / heads); hidden need not be heads x kv_channels
    kv_channels: Optional[int] = None
    # rotary on the first int(head_dim x rotary_percent) dims of each head (MLA: of the rope dims)
    rotary_percent: float = 1.0
    # rope | yarn; None: yarn with multi-latent attention, rope otherwise (--rope-type)
    rope_type: Optional[str] = None
    # YaRN (rope_type yarn): interpolation factor, the original context, the ramp's ends (in
    # rotations), and the attention temperature's mscale / mscale_all_dim
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # per-head norm (of `normalization`'s type) of q and k before rotary; with multi-latent
    # attention, the norms of the q and kv latents (Megatron-Core's layer specs)
    qk_layernorm: bool = False
    # multi-latent attention (DeepSeek-V2/V3): q through a q_lora_rank latent (None: directly),
    # k and v through one kv_lora_rank latent, a rope key of qk_pos_emb_head_dim dims shared by
    # all heads; per head qk_head_dim + qk_pos_emb_head_dim query/key dims, v_head_dim value dims
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 32
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128

    def __post_init__(self):
        for field in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                      "vocab_size"):
            if getattr(self, field) < 1:
                raise _error(f"{{{field}}} must be >= 1 (got {getattr(self, field)})")
        for field in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise _error(f"{{{field}}} must be in [0, 1) (got {getattr(self, field)})")
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups:
            raise _error(f"{{num_query_groups}} {self.num_query_groups} must divide "
                         f"{{num_attention_heads}} {self.num_attention_heads}")
        if self.padded_vocab_size is None:
            object.__setattr__(self, "padded_vocab_size", self.vocab_size)
        if self.padded_vocab_size < self.vocab_size:
            raise _error(f"{{padded_vocab_size}} {self.padded_vocab_size} is smaller than "
                         f"{{vocab_size}} {self.vocab_size}")
        if self.ffn_hidden_size is None:
            # Megatron-LM's defaults: 4h, or for SwiGLU 8h/3 rounded down to a multiple of 64
            ffn = int(8 * self.hidden_size / 3 / 64) * 64 if self.swiglu else 4 * self.hidden_size
            object.__setattr__(self, "ffn_hidden_size", ffn)
        if self.ffn_hidden_size < 1:
            raise _error(f"{{ffn_hidden_size}} must be >= 1 (got {self.ffn_hidden_size}); "
                         f"with {{swiglu}} and a hidden size below 24 give it explicitly")
        if (self.kv_channels is None and not self.multi_latent_attention
                and self.hidden_size % self.num_attention_heads):
            raise _error(f"{{hidden_size}} {self.hidden_size} is not divisible by "
                         f"{{num_attention_heads}} {self.num_attention_heads} (or give "
                         "{kv_channels})")
        self._check_attention()
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise _error(f"{{position_embedding_type}} {self.position_embedding_type!r}: use "
                         "learned_absolute or rope")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise _error(f"{{normalization}} {self.normalization!r}: use LayerNorm or RMSNorm")

    def _check_attention(self) -> None:
        if self.rope_type is None:
            object.__setattr__(self, "rope_type",
                               "yarn" if self.multi_latent_attention else "rope")
        if self.rope_type not in ("rope", "yarn"):
            raise _error(f"{{rope_type}} {self.rope_type!r}: use rope or yarn")
        if self.kv_channels is not None and self.kv_channels < 1:
            raise _error(f"{{kv_channels}} must be >= 1 (got {self.kv_channels})")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise _error(f"{{rotary_percent}} must be in (0, 1] (got {self.rotary_percent})")
        rope_dims = (self.qk_pos_emb_head_dim if self.multi_latent_attention else self.head_dim)
        rotated = int(rope_dims * self.rotary_percent)
        if self.rotary_percent < 1.0 and (rotated < 2 or rotated % 2):
            raise _error(f"{{rotary_percent}} {self.rotary_percent} rotates {rotated} of the "
                         f"{rope_dims} dims of a head: it must be an even number >= 2")
        if self.rope_type == "yarn":
            if self.rotary_percent < 1.0:
                raise _error("{rotary_percent} below 1 with {rope_type} yarn: YaRN scales the "
                             "whole head (Megatron-Core's YarnRotaryEmbedding); use one of them")
            for field in ("rotary_scaling_factor", "original_max_position_embeddings",
                          "beta_fast", "beta_slow"):
                if getattr(self, field) <= 0:
                    raise _error(f"{{{field}}} must be > 0 (got {getattr(self, field)})")
        if self.multi_latent_attention:
            self._check_mla()

    def _check_mla(self) -> None:
        for field in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if getattr(self, field) < 1:
                raise _error(f"{{{field}}} must be >= 1 with {{multi_latent_attention}} "
                             f"(got {getattr(self, field)})")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise _error(f"{{q_lora_rank}} must be >= 1 (got {self.q_lora_rank}); leave it out "
                         "for a full-rank query")
        if self.qk_pos_emb_head_dim % 2:
            raise _error(f"{{qk_pos_emb_head_dim}} {self.qk_pos_emb_head_dim} must be even "
                         "(rotary turns pairs of dims)")
        if self.num_query_groups != self.num_attention_heads:
            raise _error("{multi_latent_attention} has no query groups: every head reads the "
                         "shared latent (drop {num_query_groups})")
        if self.kv_channels is not None:
            raise _error("{kv_channels} with {multi_latent_attention}: the head dims are "
                         "{qk_head_dim}, {qk_pos_emb_head_dim} and {v_head_dim}")

    @property
    def head_dim(self) -> int:
        """Dims of one head's q, k and v (standard attention): kv_channels, or hidden / heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def attention_flops(self, seq_length: int) -> tuple[int, int]:
        """Forward FLOPs per token of one attention layer: (its projections, its core: scores
        and context over all seq_length keys, as Megatron counts them)."""
        H, n = self.hidden_size, self.num_attention_heads
        if self.multi_latent_attention:
            q_dim, v_dim = self.qk_head_dim + self.qk_pos_emb_head_dim, self.v_head_dim
            q = (2 * H * self.q_lora_rank + 2 * self.q_lora_rank * n * q_dim
                 if self.q_lora_rank else 2 * H * n * q_dim)
            kv = (2 * H * (self.kv_lora_rank + self.qk_pos_emb_head_dim)
                  + 2 * self.kv_lora_rank * n * (self.qk_head_dim + v_dim))
            proj = q + kv + 2 * n * v_dim * H
        else:
            q_dim = v_dim = self.head_dim
            proj = 2 * H * (n + 2 * self.num_query_groups) * q_dim + 2 * n * q_dim * H
        return proj, 2 * seq_length * n * (q_dim + v_dim)

    def tp_split_sizes(self) -> dict[str, int]:
        """The sizes split over TP, by {field}: each must be divisible by the TP size
        (megatron.parallel.topology.check_layout)."""
        return {"{num_attention_heads}": self.num_attention_heads,
                "{num_query_groups}": self.num_query_groups,
                "{hidden_size}": self.hidden_size, "{ffn_hidden_size}": self.ffn_hidden_size}


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation checkpointing (Megatron's flags) and TED's communication-aware variant."""

    granularity: Optional[str] = None  # None | full | selective (the attention core only)
    # full only: uniform (chunks of num_layers) | block (first num_layers)
    method: Optional[str] = None
    num_layers: int = 1
    cac: bool = True  # reuse the MoE all-to-all / TP gather outputs in the recompute

    def check(self, model_layers: int) -> None:
        def error(message: str) -> FieldError:
            return _error(message, "RecomputeConfig")

        if self.granularity not in (None, "full", "selective"):
            raise error(f"{{granularity}} {self.granularity!r}: use full or selective")
        if self.granularity == "full" and self.method not in ("uniform", "block"):
            raise error("{granularity} full needs {method} uniform or block")
        if self.granularity != "full" and self.method is not None:
            raise error("{method} applies to {granularity} full only")
        if self.granularity == "full" and not 1 <= self.num_layers <= model_layers:
            raise error(f"{{num_layers}} {self.num_layers} must be in [1, the model's layers "
                        f"{model_layers}]")

    def full_chunks(self, model_layers: int) -> list[list[int]]:
        """Layer indices run under one checkpoint each (full granularity); other layers run
        plain."""
        if self.granularity != "full":
            return []
        if self.method == "uniform":
            n = self.num_layers
            return [list(range(i, min(i + n, model_layers))) for i in range(0, model_layers, n)]
        return [[i] for i in range(self.num_layers)]


def _error(message: str, owner: str = "ModelConfig") -> FieldError:
    return FieldError(message, owner)
