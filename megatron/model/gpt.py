"""GPT: vocab-parallel embedding, positions, transformer layers, final norm, vocab-parallel output
and loss. Built on CPU, initialized layout-independently, then moved to `device`."""

from __future__ import annotations

from dataclasses import dataclass, field
import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding

from megatron.model.config import ModelConfig
from megatron.model.cross_entropy import vocab_parallel_cross_entropy
from megatron.model.params import init_parameters, set_spec
from megatron.model.recompute import checkpoint
from megatron.model.rng import TPRandom
from megatron.model.rotary import build_rotary
from megatron.model.transformer import (
    TransformerLayer,
    _no_init,
    build_norm,
    column_linear,
    hidden_dropout,
    megatron_parallel_config,
)
from megatron.parallel import comm
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


class Absent(torch.nn.Module):
    """A layer another pipeline stage holds: keeps the layer list indexed by global layer id."""

    def forward(self, *args):
        raise RuntimeError("this layer lives on another pipeline stage")


class GPTModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, groups: TEDGroups, *, seed: int, device="cpu", mlp=None,
                 layers=None, pre_process: bool = True, post_process: bool = True):
        """`mlp(layer_index)` gives a layer's feed-forward block (ted_patches.build: an MoE layer),
        or None for the dense MLP; every parameter is drawn once, at the end, from `seed`.
        Pipeline parallelism: `layers`, the global indices of the layers this rank holds (None:
        all; the others are `Absent`, so parameters keep their global names, "layers.5.*");
        `pre_process`, the embedding; `post_process`, the final norm, output layer and loss. A
        last stage with tied embeddings holds a copy of the word embedding (its ParamSpec says
        `pipeline_copy`): drawn alike, its gradient summed with the first stage's."""
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.pre_process, self.post_process = pre_process, post_process
        mp = megatron_parallel_config(cfg, groups)
        self.rng = TPRandom(seed, groups.tp.rank, device)
        std = cfg.init_method_std
        tied = not cfg.untie_embeddings_and_output_weights

        self.embedding = self.position_embedding = self.rotary = None
        if pre_process or (post_process and tied):
            self.embedding = VocabParallelEmbedding(
                cfg.padded_vocab_size, cfg.hidden_size, init_method=_no_init, config=mp,
                tp_group=groups.tp.pg
            )
            set_spec(self.embedding.weight, init="normal", std=std, tp_dim=0, rows=cfg.vocab_size,
                     pipeline_copy=not pre_process)
        if cfg.position_embedding_type == "learned_absolute" and pre_process:
            self.position_embedding = torch.nn.Embedding(cfg.max_position_embeddings,
                                                         cfg.hidden_size)
            set_spec(self.position_embedding.weight, init="normal", std=std)
        if cfg.multi_latent_attention:  # MLA always rotates its rope dims (Megatron-Core)
            self.rotary = build_rotary(cfg, cfg.qk_pos_emb_head_dim)
        elif cfg.position_embedding_type == "rope":
            self.rotary = build_rotary(cfg, cfg.head_dim)

        held = set(range(cfg.num_layers)) if layers is None else set(layers)
        self.layers = torch.nn.ModuleList(
            TransformerLayer(cfg, mp, groups, self.rng, mlp(i) if mlp else None) if i in held
            else Absent() for i in range(cfg.num_layers))
        # Activation checkpointing (set by ted_patches.cac.apply_recompute): layer ranges run
        # under one checkpoint each, and, for communication-aware checkpointing, the factory of
        # the stash that keeps their collectives' outputs for the recompute.
        self.checkpoint_chunks: list[list[int]] = []
        self.checkpoint_stash = None
        self.final_norm = self.output = None
        if post_process:
            self.final_norm = build_norm(cfg, groups.sequence_parallel)
            # The output layer shares the embedding weight unless untied (then it has its own).
            self.output = column_linear(mp, groups, cfg.hidden_size, cfg.padded_vocab_size,
                                        std=std, bias=False, weight=not tied, rows=cfg.vocab_size)
        # This rank's vocabulary slice and how much of it is padding (masked out of the softmax).
        local = cfg.padded_vocab_size // groups.tp.size
        self.real_local_vocab = min(local, max(0, cfg.vocab_size - groups.tp.rank * local))
        init_parameters(self, seed, groups)
        self.to(device)

    def pipeline_shared(self) -> list:
        """Parameters another pipeline stage holds a copy of: the tied word embedding, when the
        first and the last stage live on different ranks (their gradients are summed)."""
        tied = not self.cfg.untie_embeddings_and_output_weights
        if tied and self.embedding is not None and self.pre_process != self.post_process:
            return [self.embedding.weight]
        return []

    def forward(self, tokens, position_ids, labels=None, loss_mask=None):
        """tokens, position_ids, labels, loss_mask: [b, s]. Returns GPTOutput, or the vocab-split
        logits [b, s, V/TP] (padded ids at -inf) when no labels are given. The whole model: a
        pipeline stage runs `embed`, `run_layers` and `head` / `lm_loss` for its part."""
        x = self.embed(tokens, position_ids)
        x, aux = self.run_layers(x, self.rope(position_ids), 0, self.cfg.num_layers)
        logits = self.head(x)
        if labels is None:
            return logits
        return GPTOutput(self.lm_loss(logits, labels, loss_mask), aux)

    def embed(self, tokens, position_ids) -> torch.Tensor:
        """[b, s, h], or this rank's part of the sequence [b, s/TP, h] under sequence
        parallelism."""
        x = self.embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(position_ids)
        sp = self.groups.sequence_parallel
        if sp:
            x = comm.scatter_sequence(x, self.groups.tp)
        return hidden_dropout(x, self.cfg.hidden_dropout, self.training, self.rng, sp)

    def rope(self, position_ids):
        """RoPE's cos / sin for these positions (None without RoPE); every stage computes its
        own."""
        return None if self.rotary is None else self.rotary(position_ids)

    def run_layers(self, x, rope, start: int, end: int):
        """Layers [start, end) (held by this rank), under activation checkpointing where set;
        returns (x, the MoE layers' aux outputs)."""
        aux = []
        for first, last, recompute in self._segments(start, end):
            if recompute:
                stash = self.checkpoint_stash() if self.checkpoint_stash else None
                x, seg_aux = checkpoint(self._run_layers, x, rope, first, last, rng=self.rng,
                                        stash=stash)
            else:
                x, seg_aux = self._run_layers(x, rope, first, last)
            aux += seg_aux
        return x, aux

    def head(self, x) -> torch.Tensor:
        """Final norm and output layer: the vocab-split logits [b, s, V/TP], padded ids at -inf
        (under sequence parallelism the output layer gathers the sequence first)."""
        x = self.final_norm(x)
        weight = None if self.cfg.untie_embeddings_and_output_weights else self.embedding.weight
        logits, _ = self.output(x, weight=weight)
        if self.real_local_vocab < logits.shape[-1]:  # padded ids: probability exactly 0
            logits = logits.clone()
            logits[..., self.real_local_vocab:] = float("-inf")
        return logits

    def lm_loss(self, logits, labels, loss_mask=None) -> torch.Tensor:
        """Mean cross-entropy over the unmasked tokens. Under context parallelism this rank's
        share: the sum over its tokens divided by the whole sequence's count (the shares add up
        over CP to the mean; each rank's gradient is that of its own tokens)."""
        losses = vocab_parallel_cross_entropy(logits.float(), labels, self.groups.tp)
        mask = torch.ones_like(losses) if loss_mask is None else loss_mask.float()
        count = comm.all_reduce_(mask.sum(), self.groups.cp)  # the whole sequence's
        return (losses * mask).sum() / count.clamp(min=1.0)

    def _run_layers(self, x, rope, start: int, end: int):
        aux = []
        for layer in self.layers[start:end]:
            x, layer_aux = layer(x, rope)
            if layer_aux is not None:
                aux.append(layer_aux)
        return x, aux

    def _segments(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """(first, last, checkpointed) ranges covering layers [start, end) in order (a
        checkpointed chunk cut at a stage boundary is checkpointed on each side)."""
        out, position = [], start
        for chunk in self.checkpoint_chunks:
            first, last = max(chunk[0], start), min(chunk[-1] + 1, end)
            if first >= last:
                continue
            if first > position:
                out.append((position, first, False))
            out.append((first, last, True))
            position = last
        if position < end:
            out.append((position, end, False))
        return out

