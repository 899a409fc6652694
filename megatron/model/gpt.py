"""GPT: vocab-parallel embedding, positions, transformer layers, final norm, vocab-parallel output
and loss. Built on CPU, initialized layout-independently, then moved to `device`."""

from __future__ import annotations

from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding

from megatron.model.config import ModelConfig
from megatron.model.cross_entropy import vocab_parallel_cross_entropy
from megatron.model.params import init_parameters, set_spec
from megatron.model.recompute import checkpoint
from megatron.model.rng import TPRandom
from megatron.model.transformer import (
    RotaryEmbedding,
    TransformerLayer,
    _no_init,
    build_norm,
    column_linear,
    megatron_parallel_config,
)
from megatron.parallel.topology import TEDGroups


@dataclass
class GPTOutput:
    lm_loss: torch.Tensor  # mean over unmasked tokens of this micro-batch
    aux: list = field(default_factory=list)  # one entry per MoE layer (see ted_patches.moe_layer)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' weighted auxiliary losses (0 for a dense model)."""
        return sum((a.loss for a in self.aux), torch.zeros((), device=self.lm_loss.device))

    @property
    def loss(self) -> torch.Tensor:
        return self.lm_loss + self.aux_loss


class GPTModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, groups: TEDGroups, *, seed: int, device="cpu", mlp=None):
        """`mlp(layer_index)` gives a layer's feed-forward block (ted_patches.build: an MoE layer),
        or None for the dense MLP; every parameter is drawn once, at the end, from `seed`."""
        super().__init__()
        self.cfg, self.groups = cfg, groups
        mp = megatron_parallel_config(cfg, groups)
        self.rng = TPRandom(seed, groups.tp.rank, device)
        std = cfg.init_method_std

        self.embedding = VocabParallelEmbedding(
            cfg.padded_vocab_size, cfg.hidden_size, init_method=_no_init, config=mp,
            tp_group=groups.tp.pg
        )
        set_spec(self.embedding.weight, init="normal", std=std, tp_dim=0, rows=cfg.vocab_size)
        self.position_embedding = None
        self.rotary = None
        if cfg.position_embedding_type == "learned_absolute":
            self.position_embedding = torch.nn.Embedding(cfg.max_position_embeddings,
                                                         cfg.hidden_size)
            set_spec(self.position_embedding.weight, init="normal", std=std)
        elif cfg.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_base)

        self.layers = torch.nn.ModuleList(
            TransformerLayer(cfg, mp, groups, self.rng, mlp(i) if mlp else None)
            for i in range(cfg.num_layers))
        # Activation checkpointing (set by ted_patches.cac.apply_recompute): layer ranges run
        # under one checkpoint each, and, for communication-aware checkpointing, the factory of
        # the stash that keeps their collectives' outputs for the recompute.
        self.checkpoint_chunks: list[list[int]] = []
        self.checkpoint_stash = None
        self.final_norm = build_norm(cfg)
        # The output layer shares the embedding weight unless untied (then it has its own).
        untied = cfg.untie_embeddings_and_output_weights
        self.output = column_linear(mp, groups, cfg.hidden_size, cfg.padded_vocab_size, std=std,
                                    bias=False, weight=untied, rows=cfg.vocab_size)
        # This rank's vocabulary slice and how much of it is padding (masked out of the softmax).
        local = cfg.padded_vocab_size // groups.tp.size
        self.real_local_vocab = min(local, max(0, cfg.vocab_size - groups.tp.rank * local))
        init_parameters(self, seed, groups)
        self.to(device)

    def forward(self, tokens, position_ids, labels=None, loss_mask=None):
        """tokens, position_ids, labels, loss_mask: [b, s]. Returns GPTOutput, or the vocab-split
        logits [b, s, V/TP] (padded ids at -inf) when no labels are given."""
        x = self.embedding(tokens)
        rope = None
        if self.position_embedding is not None:
            x = x + self.position_embedding(position_ids)
        elif self.rotary is not None:
            rope = self.rotary(position_ids)
        x = F.dropout(x, self.cfg.hidden_dropout, self.training)
        aux = []
        for start, end, recompute in self._segments():
            if recompute:
                stash = self.checkpoint_stash() if self.checkpoint_stash else None
                x, seg_aux = checkpoint(self._run_layers, x, rope, start, end, rng=self.rng,
                                        stash=stash)
            else:
                x, seg_aux = self._run_layers(x, rope, start, end)
            aux += seg_aux
        x = self.final_norm(x)
        weight = None if self.cfg.untie_embeddings_and_output_weights else self.embedding.weight
        logits, _ = self.output(x, weight=weight)
        if self.real_local_vocab < logits.shape[-1]:  # padded ids: probability exactly 0
            logits = logits.clone()
            logits[..., self.real_local_vocab:] = float("-inf")
        if labels is None:
            return logits
        losses = vocab_parallel_cross_entropy(logits.float(), labels, self.groups.tp)
        mask = torch.ones_like(losses) if loss_mask is None else loss_mask.float()
        lm_loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
        return GPTOutput(lm_loss, aux)

    def _run_layers(self, x, rope, start: int, end: int):
        aux = []
        for layer in self.layers[start:end]:
            x, layer_aux = layer(x, rope)
            if layer_aux is not None:
                aux.append(layer_aux)
        return x, aux

    def _segments(self) -> list[tuple[int, int, bool]]:
        """(start, end, checkpointed) ranges covering all layers in order."""
        out, position = [], 0
        for chunk in self.checkpoint_chunks:
            if chunk[0] > position:
                out.append((position, chunk[0], False))
            out.append((chunk[0], chunk[-1] + 1, True))
            position = chunk[-1] + 1
        if position < len(self.layers):
            out.append((position, len(self.layers), False))
        return out

