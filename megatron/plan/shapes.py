"""Shapes of one micro-batch: tokens, capacity per expert, micro-batches per step, which layers
are MoE, and the dispatch the planner plans (the padded one).

Shapes: T tokens per micro-batch (micro batch x sequence), H hidden, F FFN, Fe the experts' FFN,
V the padded vocabulary, E experts (E_l = E / EP local), C capacity per expert (padded to a multiple
of TP), t = TP. "rows" = E * C: the expert input rows every rank computes (E_l experts x EP * C).
"""

from __future__ import annotations

import dataclasses

from megatron.training.config import Config
from ted_patches.router import token_capacity


# ---- shapes of one micro-batch -------------------------------------------------------------------
def with_padded_dispatch(cfg: Config) -> Config:
    """`cfg` with the padded (capacity-buffer) dispatch: the one the planner plans, and the one
    accelerators run in drop mode. The padding-free dispatch (MoEConfig.pad_free: the default on
    CPUs and in no-drop mode) sends only the kept tokens: its sizes depend on the routing."""
    if (cfg.moe is None or getattr(cfg.moe, "pad_free", False) is False
            or getattr(cfg.topology, "cp", 1) > 1):  # CP: always padding-free (own tokens)
        return cfg
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, pad_free=False))


def pads(cfg: Config) -> bool:
    """Whether an accelerator run of `cfg` takes the padded dispatch (exactly what is planned)."""
    if cfg.moe is None:
        return True
    if getattr(cfg.topology, "cp", 1) > 1:  # each rank's own tokens, padding-free
        return False
    choice = getattr(cfg.moe, "pad_free", False)
    return choice is False or (choice is None and cfg.moe.drop_tokens)


def micro_shapes(cfg: Config, experts: int = 0) -> tuple[int, int]:
    """(T, C) of a layer with `experts` experts: tokens per micro-batch and the capacity per
    expert, padded to a multiple of TP. No-drop mode's capacity depends on the routing: the
    planner assumes the capacity factor's."""
    T = cfg.train.micro_batch_size * cfg.train.seq_length
    if cfg.moe is None or not experts:
        return T, 0
    moe, t = cfg.moe, cfg.topology.tp
    raw = token_capacity(T, experts, moe.topk, moe.capacity_factor, moe.min_capacity)
    return T, -(-raw // t) * t


def context_parallel(cfg: Config) -> int:
    """CP: the ranks splitting each sequence (--context-parallel-size)."""
    return getattr(cfg.topology, "cp", 1)


def local_tokens(cfg: Config) -> int:
    """Tokens of one micro-batch this rank holds between blocks: T, or its two chunks T / CP
    under context parallelism (megatron/parallel/context.py)."""
    T, _ = micro_shapes(cfg)
    return T // context_parallel(cfg)


def own_capacity(cfg: Config, experts: int) -> int:
    """Rows per expert this rank dispatches of one micro-batch: the capacity C (the padded
    buffer), or, under context parallelism, where each rank sends only its own kept tokens
    (padding-free: ted_patches/moe_layer.py), its share of the expert's kept tokens with the
    routing balanced, min(C, T k / E) / CP (exact where no token drops and every expert keeps
    alike, e.g. top-k = E; an estimate otherwise). No-drop mode keeps them all: T k / E / CP."""
    T, C = micro_shapes(cfg, experts)
    cp = context_parallel(cfg)
    if cp == 1:
        return C
    kept = -(-T * cfg.moe.topk // experts)
    return (min(C, kept) if cfg.moe.drop_tokens else kept) // cp


def slices(cfg: Config) -> int:
    """S: the slices each expert's capacity is cut into over TP (DTD, or sequence parallelism
    where each TP rank sends its own part of the sequence; ted_patches/dispatcher.py); 1 where
    every TP rank sends the whole buffer."""
    moe, t = cfg.moe, cfg.topology.tp
    sp = bool(getattr(cfg.topology, "sp", False))
    return t if moe is not None and (moe.dtd or sp) and t > 1 else 1


def expert_rows(cfg: Config, experts: int, capacity: int) -> int:
    """Rows this rank's experts compute in one MoE layer: E_l experts x (ETP x EP x C / S) rows
    (their ETP peers' slices gathered), or, without slices at TP > 1, E_l x EP x C (every TP
    rank received the same rows). Under context parallelism `capacity` is `own_capacity`: each
    sender's own kept rows (under SP each TP rank's own tokens, 1 / TP of them: as the slices)."""
    S, topo = slices(cfg), cfg.topology
    if S == 1 and topo.tp > 1:
        return experts * capacity
    return experts * capacity * topo.etp // S


def num_microbatches(cfg: Config) -> int:
    return cfg.train.num_microbatches(cfg.topology.dp)

def _layer_kinds(cfg: Config) -> list[str]:
    moe = set(cfg.moe.layers) if cfg.moe is not None else set()
    return ["moe" if i in moe else "dense" for i in range(cfg.model.num_layers)]
