"""The one place a GPT-MoE is built: training, generation, the benchmarks and the tests call it.

Dense or MoE is decided per layer at construction (an MoE layer in each of `moe.layers`, the
dense MLP elsewhere), every parameter is drawn once from the seed, independently of the layout,
and Megatron's recompute settings (with CAC on recomputed MoE chunks) are applied.
"""

from __future__ import annotations

from typing import Optional

from megatron.model.config import ModelConfig, RecomputeConfig
from megatron.model.gpt import GPTModel
from megatron.parallel.stages import StagePlan
from megatron.parallel.topology import TEDGroups
from ted_patches.cac import apply_recompute
from ted_patches.config import MoEConfig
from ted_patches.moe_layer import MoELayer


def build_model(model: ModelConfig, moe: Optional[MoEConfig], groups: TEDGroups, *, seed: int,
                device="cpu", recompute: Optional[RecomputeConfig] = None,
                stages: Optional[StagePlan] = None) -> GPTModel:
    """The GPT(-MoE) of these configs on this rank, in `model.params_dtype`, on `device`; with a
    pipeline (`stages`), the layers and ends of this rank's stages only."""
    if moe is not None:
        bad = [i for i in moe.layers if not 0 <= i < model.num_layers]
        if bad:
            raise ValueError(f"MoE layer indices {bad} outside the model's {model.num_layers} "
                             "layers (check expert_interval / moe_layer_freq / "
                             "first_k_dense_replace against num_layers)")

    def mlp(i: int):
        if moe is None or i not in moe.layers:
            return None
        return MoELayer(model, moe.for_layer(i), groups, layer=i)

    where = {}
    if stages is not None and stages.pp > 1:
        rank = groups.coords.pp
        where = dict(layers=stages.layers_of(rank), pre_process=stages.holds_first(rank),
                     post_process=stages.holds_last(rank))
    gpt = GPTModel(model, groups, seed=seed, device=device, mlp=mlp, **where)
    gpt.moe_config = moe  # the whole model's MoE layers, also those of other pipeline stages
    apply_recompute(gpt, recompute or RecomputeConfig())
    return gpt.to(dtype=model.params_dtype)
