"""Activation checkpointing that replays exactly what the first forward did.

torch's non-reentrant checkpoint restores the default RNG streams for the recompute; on top of
that this restores our per-TP-rank dropout stream (rng.TPRandom), and, when given a CommStash
(communication-aware checkpointing), serves the region's collectives from the first forward's
outputs instead of communicating again.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from megatron.model.rng import TPRandom


class _RecomputeHere(torch.autograd.Function):
    """The region's last operation, with a saved tensor: the first thing the region's backward
    unpacks, so its recompute starts at once on every rank, before any other backward node of
    the region runs. (Left to itself, non-reentrant checkpointing recomputes when a node first
    needs a saved tensor; which node that is depends on the rank's data, e.g. its experts' rows,
    and a recompute that communicates at different moments on two ranks deadlocks them.)"""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x.new_empty(0))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # noqa: B018 (the unpack starts the recompute)
        return grad


def _recompute_here(out):
    if isinstance(out, tuple):
        return (_recompute_here(out[0]),) + out[1:]
    return _RecomputeHere.apply(out) if out.requires_grad else out


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
                return _recompute_here(fn(*inner))
            with stash.active(replay):
                return _recompute_here(fn(*inner))
        finally:
            if replay:
                rng.load_state_dict(outer)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
