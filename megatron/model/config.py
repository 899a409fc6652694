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
        if self.hidden_size % self.num_attention_heads:
            raise _error(f"{{hidden_size}} {self.hidden_size} is not divisible by "
                         f"{{num_attention_heads}} {self.num_attention_heads}")
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise _error(f"{{position_embedding_type}} {self.position_embedding_type!r}: use "
                         "learned_absolute or rope")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise _error(f"{{normalization}} {self.normalization!r}: use LayerNorm or RMSNorm")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
