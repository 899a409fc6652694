"""Context parallelism: each sequence split over the CP group, as Megatron splits it.

The sequence of s tokens is cut into 2 x CP chunks of c = s / (2 CP); CP rank r holds chunks r and
2 CP - 1 - r, in that order (Megatron's load balance for causal attention: an early chunk, whose
queries see few keys, paired with a late one, which see many, so every rank does the same work).
Between blocks a rank holds [b, s/CP, h]: its two chunks, concatenated. Everything per token
(norms, linears, the experts) runs on them unchanged; what spans tokens is exchanged here:
  - attention: each rank's keys and values all-gathered over CP into the whole sequence, its own
    queries attending to them under the causal mask of their global positions (backward: the
    keys' and values' gradients reduce-scattered back to their owners);
  - the MoE router: the logits gathered over CP (`gather_context(..., replicated=True)`), so the
    routing is decided over the whole sequence, as one process decides it;
  - the loss: each rank's share, over the whole sequence's token count (megatron.model.gpt).
Dense gradients are then partial per CP rank and summed over DP x CP by the optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.parallel import comm
from megatron.parallel.topology import Group


def chunk_ids(rank: int, size: int) -> tuple[int, int]:
    """The two chunks (of 2 x `size`) CP rank `rank` holds, in its order."""
    return rank, 2 * size - 1 - rank


def check_length(seq_length: int, cp: int) -> None:
    if seq_length % (2 * cp):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x "
                         f"--context-parallel-size {cp}: each sequence is cut into 2 x CP chunks")


def split_sequence(t: torch.Tensor, cp: Group, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of a whole-sequence tensor (the sequence along `dim`), concatenated
    (a new tensor; no autograd needed: the data the loader gives)."""
    if cp.size == 1:
        return t
    s = t.shape[dim]
    check_length(s, cp.size)
    c = s // (2 * cp.size)
    return torch.cat([t.narrow(dim, i * c, c) for i in chunk_ids(cp.rank, cp.size)], dim=dim)


def positions(local_length: int, cp: Group, device=None) -> torch.Tensor:
    """The global positions of this rank's `local_length` tokens (its two chunks), in its
    order."""
    if cp.size == 1:
        return torch.arange(local_length, device=device)
    c = local_length // 2
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device)
                      for i in chunk_ids(cp.rank, cp.size)])


def gather_context(x: torch.Tensor, cp: Group, dim: int = 1,
                   replicated: bool = False) -> torch.Tensor:
    """Every CP rank's part of the sequence (along `dim`) -> the whole sequence in global order.
    Backward: reduce-scatter (each rank's consumer uses its own queries or tokens: partial
    gradients), or, `replicated`, this rank's part (the consumer computes the same on every CP
    rank, so each holds the same full gradient)."""
    if cp.size == 1:
        return x
    gather = comm.gather_to_replicated if replicated else comm.gather_to_split
    parts = gather(x.contiguous(), cp)  # [CP, ...x]
    c = x.shape[dim] // 2
    chunks = {}
    for r in range(cp.size):
        for half, i in enumerate(chunk_ids(r, cp.size)):
            chunks[i] = parts[r].narrow(dim, half * c, c)
    return torch.cat([chunks[i] for i in range(2 * cp.size)], dim=dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: Group, *,
                     dropout: float = 0.0, scale=None, enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q k^T) v under the causal mask, q [b, heads, s_local, d], k / v [b, groups,
    s_local, d]. Over CP: the keys and values gathered, then each of this rank's two query
    chunks attends to the keys up to its own end (chunk i: the first (i + 1) c keys, the mask
    causal at the bottom right), so no rank computes scores it would mask whole."""
    kw = dict(dropout_p=dropout, scale=scale, enable_gqa=enable_gqa)
    if cp.size == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    k, v = gather_context(k, cp, dim=2), gather_context(v, cp, dim=2)
    c = q.shape[2] // 2
    out = []
    for half, i in enumerate(chunk_ids(cp.rank, cp.size)):
        keys = (i + 1) * c
        mask = (torch.arange(keys, device=q.device)[None, :]
                <= i * c + torch.arange(c, device=q.device)[:, None])
        out.append(F.scaled_dot_product_attention(q[:, :, half * c:(half + 1) * c],
                                                  k[:, :, :keys], v[:, :, :keys],
                                                  attn_mask=mask, **kw))
    return torch.cat(out, dim=2)
