"""Activation checkpointing that replays exactly what the first forward did.

torch's non-reentrant checkpoint restores the default RNG streams for the recompute; on top of
that this restores our per-TP-rank dropout stream (rng.TPRandom), and, when given a CommStash
(communication-aware checkpointing), serves the region's collectives from the first forward's
outputs instead of communicating again.
"""

from __future__ import annotations

import torch.utils.checkpoint

from megatron.model.rng import TPRandom


def checkpoint(fn, *args, rng: TPRandom, stash=None):
    """`fn(*args)` under non-reentrant checkpointing. `stash`: an object whose `active(replay)`
    context serves the region's collectives (megatron.parallel.comm.CommStash), or None."""
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
