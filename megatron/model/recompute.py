"""Activation checkpointing that replays exactly what the first forward did.

torch's non-reentrant checkpoint restores the default RNG streams for the recompute; on top of
that this restores our per-TP-rank dropout stream (rng.TPRandom), and, when given a CommStash
(communication-aware checkpointing), serves the region's collectives from the first forward's
outputs instead of communicating again.
"""

from __future__ import annotations

from typing import Optional

import torch.utils.checkpoint

from megatron.model.rng import TPRandom
from ted_patches.comm import CommStash


def checkpoint(fn, *args, rng: TPRandom, stash: Optional[CommStash] = None):
    start_state = rng.state_dict()
    calls = [0]

    def run(*inner):
        replay = calls[0] > 0
        calls[0] += 1
        outer = rng.state_dict() if replay else None
        if replay:
            rng.load_state_dict(start_state)
        try:
            if stash is None:
                return fn(*inner)
            with stash.active(replay):
                return fn(*inner)
        finally:
            if replay:
                rng.load_state_dict(outer)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
