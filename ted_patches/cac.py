"""Communication-aware activation checkpointing (CAC) and the recompute set-up.

Plain activation checkpointing recomputes a layer's forward in backward, so each MoE layer
runs its all-to-alls three times per step (forward, recompute, backward: 6 instead of 4).
CAC keeps the outputs of the MoE layer's collectives (all-to-alls, TP gathers, reduce-scatter)
from the forward and serves them to the recompute (megatron.parallel.comm.CommStash), which then
communicates nothing: back to 4 all-to-alls, for the memory of those kept buffers. The
numbers are unchanged: the recompute receives exactly what the forward received.

Replay is by position, so the stash keeps (kind, group, shape, dtype) with every output and
checks them on replay: a recompute that diverges from its forward (another collective, group or
shape at some position, e.g. a padding-free all-to-all whose split sizes changed, or one
collective too many) raises CommStashMismatch instead of being served a wrong tensor. The
padding-free dispatch's count exchange is one of the replayed collectives, so its recompute
reuses the forward's counts and sizes.
"""

from __future__ import annotations

from megatron.model.config import RecomputeConfig
from megatron.model.gpt import GPTModel
from megatron.parallel.comm import CommStash
from ted_patches.moe_layer import MoELayer


def apply_recompute(model: GPTModel, cfg: RecomputeConfig) -> GPTModel:
    """Set Megatron's recompute granularity/method on the model; CAC whenever a recomputed
    chunk holds an MoE layer, unless turned off."""
    model.checkpoint_chunks = cfg.full_chunks(len(model.layers))
    recomputed = {i for chunk in model.checkpoint_chunks for i in chunk}
    cac = cfg.cac and any(isinstance(getattr(model.layers[i], "mlp", None), MoELayer)
                          for i in recomputed)
    model.checkpoint_stash = CommStash if cac else None
    for layer in model.layers:
        if hasattr(layer, "attention"):  # not a layer another pipeline stage holds
            layer.attention.recompute_core = cfg.granularity == "selective"
    return model
