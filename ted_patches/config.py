"""MoE configuration: pure data (no groups, no devices), validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron.parallel.fields import FieldError
from megatron.parallel.topology import Topology, check_layout

DROP_POLICIES = ("position", "probs", "choice")
GATE_NORMALIZATIONS = ("surviving", "topk", "none")
AUX_LOSS_TYPES = ("deepspeed", "aux_loss", "none")
MLP_TYPES = ("standard", "residual")
SCORE_FUNCTIONS = ("softmax",)  # ted_patches.gates: one gate per score function


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    layers: tuple[int, ...]  # 0-based indices of the transformer layers whose MLP is an MoE layer
    topk: int = 1
    capacity_factor: float = 1.0  # training
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    score_function: str = "softmax"  # the gate (ted_patches.gates)
    drop_tokens: bool = True  # False: capacity = the largest expert count over the EP group
    # position: DeepSpeed's order (k <= 2: first choices in token order, then second choices;
    # k >= 3: token order over all k choices); choice: first choices, then second, ... for every
    # k; probs: the most probable
    drop_policy: str = "position"
    # surviving: gates renormalized over the choices that survived dropping (DeepSpeed; top-1 keeps
    # the raw probability); topk: normalized over the k choices before dropping (Megatron-Core);
    # none: raw softmax probabilities
    gate_normalization: str = "surviving"
    # deepspeed: as DeepSpeed's gates: E * sum_e(mean prob_e * fraction of FIRST choices on e) for
    # k <= 2, the switch form for k >= 3; aux_loss: Megatron-Core's switch loss over all k choices
    # divided by k. All equal for k = 1.
    aux_loss_type: str = "deepspeed"
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    jitter_eps: float = 0.0  # multiplicative uniform noise on the router input in training
    dtd: bool = True  # duplicate token dropping (only acts when TP > 1)
    mlp_type: str = "standard"  # residual: a dense MLP beside the experts, mixed by a learned gate
    expert_ffn_hidden_size: Optional[int] = None  # default: the model's ffn_hidden_size
    # padding-free dispatch: only kept tokens are sent and computed (variable all-to-all splits
    # after one count exchange, grouped GEMMs over the real rows). None: on CPUs and in no-drop
    # mode; off on accelerators in drop mode (where the padded path needs no host synchronization
    # at all)
    pad_free: Optional[bool] = None
    # every N-th forward of each MoE layer, check the TP ranks route alike (0: never)
    check_tp_routing: int = 0
    # Pyramid MoE (Megatron-DeepSpeed's --num-experts 64 64 128 ...): one count per MoE layer, in
    # the order of `layers`; None: every MoE layer has `num_experts`.
    experts_per_layer: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        counts = self.experts_per_layer or (self.num_experts,)
        checks = [
            (self.experts_per_layer is None or len(self.experts_per_layer) == len(self.layers),
             f"{{experts_per_layer}} gives {len(counts)} counts for {len(self.layers)} MoE "
             "layers: give one count, or one per MoE layer"),
            (min(counts) >= 1, f"{{num_experts}} must be >= 1 (got {min(counts)})"),
            (1 <= self.topk <= min(counts),
             f"{{topk}} {self.topk} must be between 1 and {{num_experts}} {min(counts)}"),
            (self.capacity_factor > 0,
             f"{{capacity_factor}} must be > 0 (got {self.capacity_factor}); "
             "use {drop_tokens} for no capacity limit"),
            (self.eval_capacity_factor > 0,
             f"{{eval_capacity_factor}} must be > 0 (got {self.eval_capacity_factor})"),
            (self.min_capacity >= 0, f"{{min_capacity}} must be >= 0 (got {self.min_capacity})"),
            (self.drop_policy in DROP_POLICIES,
             f"{{drop_policy}} {self.drop_policy!r}: use one of {DROP_POLICIES}"),
            (self.gate_normalization in GATE_NORMALIZATIONS,
             f"{{gate_normalization}} {self.gate_normalization!r}: use one of "
             f"{GATE_NORMALIZATIONS}"),
            (self.aux_loss_type in AUX_LOSS_TYPES,
             f"{{aux_loss_type}} {self.aux_loss_type!r}: use one of {AUX_LOSS_TYPES}"),
            (self.score_function in SCORE_FUNCTIONS,
             f"{{score_function}} {self.score_function!r}: use one of {SCORE_FUNCTIONS}"),
            (self.mlp_type in MLP_TYPES, f"{{mlp_type}} {self.mlp_type!r}: use one of {MLP_TYPES}"),
            (self.jitter_eps >= 0, f"{{jitter_eps}} must be >= 0 (got {self.jitter_eps})"),
            (self.check_tp_routing >= 0,
             f"{{check_tp_routing}} must be >= 0 (got {self.check_tp_routing})"),
        ]
        for ok, message in checks:
            if not ok:
                raise FieldError(message, "MoEConfig")

    def tp_split_sizes(self) -> dict[str, int]:
        """Sizes split over TP, by {field} (the experts' FFN when it is set apart from the
        model's)."""
        ffn = self.expert_ffn_hidden_size
        return {} if ffn is None else {"{expert_ffn_hidden_size}": ffn}

    def experts_in(self, layer: int) -> int:
        """Experts of MoE layer `layer` (a transformer layer index in `layers`)."""
        if self.experts_per_layer is None:
            return self.num_experts
        return self.experts_per_layer[self.layers.index(layer)]

    def for_layer(self, layer: int) -> "MoEConfig":
        """This config with one layer's expert count (what one MoELayer is built from)."""
        return dataclasses.replace(self, num_experts=self.experts_in(layer), experts_per_layer=None)

    def ep_split_sizes(self) -> dict[str, int]:
        """Sizes split over EP, by {field}: each layer's expert count."""
        if self.experts_per_layer is None:
            return {"{num_experts}": self.num_experts}
        return {f"{{experts_per_layer}} (MoE layer {i + 1} of {len(self.layers)})": n
                for i, n in enumerate(self.experts_per_layer)}

    def check_layout(self, topology: Topology) -> None:
        """Raise a LayoutError unless the experts split evenly over this layout's EP size."""
        check_layout(topology.world_size, topology.tp, topology.ep,
                     tp_divides=self.tp_split_sizes(), ep_divides=self.ep_split_sizes())


def moe_layer_indices(num_layers: int, *, expert_interval: int | None = None,
                      layer_freq: int | None = None):
    """Megatron-DeepSpeed's --expert-interval N puts MoE in layers N, 2N, ... (1-based);
    Megatron-Core's --moe-layer-freq N in layers 0, N, 2N, ... (0-based)."""
    if expert_interval is not None:
        return tuple(i for i in range(num_layers) if (i + 1) % expert_interval == 0)
    return tuple(i for i in range(num_layers) if i % (layer_freq or 1) == 0)
