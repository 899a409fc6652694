"""MoE configuration: pure data (no groups, no devices), validated when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.parallel.topology import Topology, check_layout

DROP_POLICIES = ("position", "probs")
GATE_NORMALIZATIONS = ("surviving", "topk", "none")
AUX_LOSS_TYPES = ("deepspeed", "aux_loss", "none")
MLP_TYPES = ("standard", "residual")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    layers: tuple[int, ...]  # 0-based indices of the transformer layers whose MLP is an MoE layer
    topk: int = 1
    capacity_factor: float = 1.0  # training
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True  # False: capacity = the largest expert count over the EP group
    drop_policy: str = "position"  # position: first choices in token order, then second choices
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

    def __post_init__(self):
        checks = [
            (self.num_experts >= 1, f"--num-experts must be >= 1 (got {self.num_experts})"),
            (1 <= self.topk <= self.num_experts,
             f"--moe-router-topk {self.topk} must be between 1 and --num-experts {self.num_experts}"),
            (self.capacity_factor > 0,
             f"--moe-expert-capacity-factor must be > 0 (got {self.capacity_factor}); "
             "use --disable-moe-token-dropping for no capacity limit"),
            (self.eval_capacity_factor > 0,
             f"--moe-eval-capacity-factor must be > 0 (got {self.eval_capacity_factor})"),
            (self.min_capacity >= 0, f"--moe-min-capacity must be >= 0 (got {self.min_capacity})"),
            (self.drop_policy in DROP_POLICIES,
             f"--moe-token-drop-policy {self.drop_policy!r}: use one of {DROP_POLICIES}"),
            (self.gate_normalization in GATE_NORMALIZATIONS,
             f"--moe-gate-normalization {self.gate_normalization!r}: use one of {GATE_NORMALIZATIONS}"),
            (self.aux_loss_type in AUX_LOSS_TYPES,
             f"--moe-router-load-balancing-type {self.aux_loss_type!r}: use one of {AUX_LOSS_TYPES}"),
            (self.mlp_type in MLP_TYPES, f"--mlp-type {self.mlp_type!r}: use one of {MLP_TYPES}"),
            (self.jitter_eps >= 0, f"--moe-input-jitter-eps must be >= 0 (got {self.jitter_eps})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def tp_split_sizes(self) -> dict[str, int]:
        """Sizes split over TP, by flag (the experts' FFN when it is set apart from the model's)."""
        ffn = self.expert_ffn_hidden_size
        return {} if ffn is None else {"--moe-ffn-hidden-size": ffn}

    def check_layout(self, topology: Topology) -> None:
        """Raise a LayoutError unless the experts split evenly over this layout's EP size."""
        check_layout(topology.world_size, topology.tp, topology.ep, tp_divides=self.tp_split_sizes(),
                     ep_divides={"--num-experts": self.num_experts})


def moe_layer_indices(num_layers: int, *, expert_interval: int | None = None, layer_freq: int | None = None):
    """Megatron-DeepSpeed's --expert-interval N puts MoE in layers N, 2N, ... (1-based);
    Megatron-Core's --moe-layer-freq N in layers 0, N, 2N, ... (0-based)."""
    if expert_interval is not None:
        return tuple(i for i in range(num_layers) if (i + 1) % expert_interval == 0)
    return tuple(i for i in range(num_layers) if i % (layer_freq or 1) == 0)
