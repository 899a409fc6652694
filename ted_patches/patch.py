"""The one explicit call that turns a GPT into a TED GPT-MoE."""

from __future__ import annotations

from megatron.model.gpt import GPTModel
from ted_patches.config import MoEConfig
from ted_patches.moe_layer import MoELayer


def apply_patches(model: GPTModel, cfg: MoEConfig, seed: int) -> GPTModel:
    """Replace the MLP of each layer in `cfg.layers` with a TED MoE layer, then redraw the
    parameters from `seed` (layout-independent, so every layout gets the same model)."""
    bad = [i for i in cfg.layers if not 0 <= i < len(model.layers)]
    if bad:
        raise ValueError(f"MoE layer indices {bad} outside the model's {len(model.layers)} layers "
                         "(check --expert-interval / --moe-layer-freq against --num-layers)")
    device = model.embedding.weight.device
    for i in cfg.layers:
        model.layers[i].mlp = MoELayer(model.cfg, cfg.for_layer(i), model.groups).to(device)
    model.initialize(seed)
    return model

