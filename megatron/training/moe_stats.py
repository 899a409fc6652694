"""Per-MoE-layer statistics (Megatron-Core's --moe-per-layer-logging): for each MoE layer, the
step's aux loss and z loss (unweighted, averaged over every micro-batch of every DP rank), the
fraction of its token assignments dropped by the capacity, and the max / min expert load (the
tokens routed to the busiest / idlest expert over the mean, so 1.00 is perfectly balanced;
before dropping), summed over the step on every DP rank.

`StepLayerStats` sums a rank's micro-batches (device tensors, no host synchronization; only
when the flag is on); `reduce` packs every MoE layer of the model into one float64 tensor (zeros
for the layers another pipeline stage holds) and all-reduces it over DP, then over the pipeline,
once per step, so every rank holds every layer's statistics; `LayerLog` averages the reduced
values over --log-interval for the log line and hands TensorBoard one scalar per layer and
statistic.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.parallel import comm
from megatron.parallel.topology import TEDGroups

# name in the log line / TensorBoard tag, for each statistic
STATS = ("aux loss", "z loss", "dropped", "load max", "load min")


def per_layer_logging(model: torch.nn.Module) -> bool:
    """Whether the model's MoE layers ask for per-layer statistics (MoEConfig.per_layer_logging,
    which ted_patches.build keeps on the model: the same answer on every pipeline stage,
    including one that holds no MoE layer)."""
    moe = getattr(model, "moe_config", None)
    return moe is not None and moe.per_layer_logging


def moe_layer_experts(model: torch.nn.Module) -> dict[int, int]:
    """{MoE layer: its expert count} of the whole model (every pipeline stage's)."""
    moe = model.moe_config
    return {i: moe.experts_in(i) for i in moe.layers}


class StepLayerStats:
    """One rank's sums over a step's micro-batches, per MoE layer: [aux, z, kept, assignments,
    micro-batches] and the assignments per expert."""

    def __init__(self):
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    def add(self, aux_list) -> None:
        for a in aux_list:
            row = torch.stack([a.aux_loss.double(), a.z_loss.double(), a.kept_count.double(),
                               torch.tensor(float(a.num_assignments), dtype=torch.float64,
                                            device=a.aux_loss.device),
                               torch.ones((), dtype=torch.float64, device=a.aux_loss.device)])
            self.sums[a.layer] = self.sums.get(a.layer, 0) + row
            self.counts[a.layer] = self.counts.get(a.layer, 0) + a.counts_E.double()

    def reduce(self, groups: TEDGroups, experts: dict[int, int],
               device) -> dict[int, dict[str, float]]:
        """Every rank (one all-reduce over DP, one over the pipeline): {layer: {statistic: value}}
        of the whole step, for every MoE layer of `experts` ({layer: expert count}, the whole
        model's)."""
        layers = sorted(experts)
        if not layers:
            return {}
        packed = torch.cat([torch.cat([self.sums[i], self.counts[i]]) if i in self.sums
                            else torch.zeros(5 + experts[i], dtype=torch.float64, device=device)
                            for i in layers])
        comm.all_reduce_(packed, groups.dp)
        if groups.pp is not None and groups.pp.size > 1:
            comm.all_reduce_(packed, groups.pp)
        out, start = {}, 0
        for i in layers:
            row = packed[start:start + 5].tolist()
            counts = packed[start + 5:start + 5 + experts[i]]
            start += 5 + counts.numel()
            mean = counts.mean().clamp(min=1e-30)
            out[i] = {"aux loss": row[0] / row[4], "z loss": row[1] / row[4],
                      "dropped": 1.0 - row[2] / row[3], "load max": (counts.max() / mean).item(),
                      "load min": (counts.min() / mean).item()}
        return out


class LayerLog:
    """The reduced per-layer statistics averaged over the log interval (rank 0's log)."""

    def __init__(self):
        self.sums: dict[int, dict[str, float]] = {}
        self.steps = 0

    def add(self, layers: dict[int, dict[str, float]]) -> None:
        if not layers:
            return
        self.steps += 1
        for i, values in layers.items():
            mine = self.sums.setdefault(i, dict.fromkeys(STATS, 0.0))
            for k in STATS:
                mine[k] += values[k]

    def line(self) -> str:
        """' moe layer 1: aux loss 1.02E+00 z loss ... |' per layer, then reset."""
        out = ""
        for i in sorted(self.sums):
            v = {k: s / self.steps for k, s in self.sums[i].items()}
            out += (f" moe layer {i}: aux loss {v['aux loss']:.4E} z loss {v['z loss']:.4E}"
                    f" dropped {100 * v['dropped']:.2f}% load max {v['load max']:.2f}"
                    f" min {v['load min']:.2f} |")
        self.sums, self.steps = {}, 0
        return out


def scalars(layers: Optional[dict[int, dict[str, float]]]):
    """(TensorBoard tag, value) of one step, Megatron-Core's "moe/<name>_layer_<i>" tags."""
    for i, values in sorted((layers or {}).items()):
        for k in STATS:
            yield f"moe/{k.replace(' ', '_')}_layer_{i}", values[k]
