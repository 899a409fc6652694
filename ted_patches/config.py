"""MoE configuration: pure data (no groups, no devices), validated when built."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron.parallel.fields import FieldError
from megatron.parallel.topology import Topology, check_layout

DROP_POLICIES = ("position", "probs", "choice")
GATE_NORMALIZATIONS = ("surviving", "topk", "none")
AUX_LOSS_TYPES = ("deepspeed", "aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn",
                  "none")
MLP_TYPES = ("standard", "residual")
SCORE_FUNCTIONS = ("softmax", "sigmoid")  # ted_patches.gates: one gate per score function
ROUTER_DTYPES = ("fp32", "fp64")


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
    # divided by k. All equal for k = 1. seq_aux_loss: Megatron-Core's per-sequence switch loss,
    # averaged over the sequences (DeepSeek-V2/V3); global_aux_loss: the loads of the step's
    # micro-batches so far over the data-parallel group (ted_patches/gates/common.py);
    # sinkhorn: Megatron-Core's S-BASE selection (no loss); none. Megatron-Core's losses count
    # a plain top-k of the scores (ted_patches/gates)
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
    # Shared experts (Megatron-Core's --moe-shared-expert-*; ted_patches.shared_expert): a dense
    # MLP of this width beside the routed experts in every MoE layer (None: none), optionally
    # scaled by sigmoid(x . w_gate) (Qwen2-MoE's shared_expert_gate). `shared_expert_overlap` is
    # accepted: our collectives are synchronous, so it computes the same as without
    shared_expert_intermediate_size: Optional[int] = None
    shared_expert_gate: bool = False
    shared_expert_overlap: bool = False
    # start from a dense checkpoint (--load): every expert a copy of the dense MLP, the router
    # from the seed (megatron/checkpoint/upcycle.py)
    use_upcycling: bool = False
    # each MoE layer's aux / z loss, dropped fraction and expert loads in the log and TensorBoard
    per_layer_logging: bool = False
    # -- router variants (Megatron-Core's --moe-router-* flags; ted_patches/gates) --
    pre_softmax: bool = False  # softmax gate: weights = probabilities over all E, not renormalized
    topk_scaling_factor: Optional[float] = None  # gate weights x this (after normalization)
    router_dtype: str = "fp32"  # logits, scores, selection and gate weights in fp32 or fp64
    # aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection
    # only, moved by bias_update_rate x sign(mean load - load) after each optimizer step
    enable_expert_bias: bool = False
    bias_update_rate: float = 1e-3
    # group-limited routing: experts in router_num_groups equal groups (e.g. the EP ranks); each
    # token picks router_group_topk groups, then its top-k experts inside them
    router_num_groups: Optional[int] = None
    router_group_topk: Optional[int] = None

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
            (self.shared_expert_intermediate_size is None
             or self.shared_expert_intermediate_size >= 1,
             f"{{shared_expert_intermediate_size}} must be >= 1 (got "
             f"{self.shared_expert_intermediate_size}); leave it out for no shared expert"),
            (self.shared_expert_intermediate_size is not None or not self.shared_expert_gate,
             "{shared_expert_gate} needs {shared_expert_intermediate_size} (the shared expert "
             "it gates)"),
        ] + self._router_checks(counts)
        for ok, message in checks:
            if not ok:
                raise FieldError(message, "MoEConfig")

    def _router_checks(self, counts) -> list:
        """The router variants' checks (ted_patches/gates), as Megatron-Core's TransformerConfig
        makes them, each naming the field to change."""
        G, g, k = self.router_num_groups, self.router_group_topk, self.topk
        sinkhorn = self.aux_loss_type == "sinkhorn"
        checks = [
            (self.router_dtype in ROUTER_DTYPES,
             f"{{router_dtype}} {self.router_dtype!r}: use one of {ROUTER_DTYPES}"),
            (self.topk_scaling_factor is None or self.topk_scaling_factor > 0,
             f"{{topk_scaling_factor}} must be > 0 (got {self.topk_scaling_factor})"),
            (not (self.pre_softmax and self.gate_normalization == "topk"),
             "{pre_softmax} keeps the softmax probabilities over all experts, "
             "{gate_normalization} 'topk' renormalizes them over the top-k: use one"),
            (not self.enable_expert_bias or self.score_function == "sigmoid",
             "{enable_expert_bias} needs {score_function} sigmoid (Megatron-Core: the "
             "aux-loss-free bias is for sigmoid scores)"),
            (self.bias_update_rate >= 0,
             f"{{bias_update_rate}} must be >= 0 (got {self.bias_update_rate})"),
            ((G is None) == (g is None),
             "{router_num_groups} and {router_group_topk} go together: give both or neither"),
            (not sinkhorn or self.score_function == "softmax",
             "{aux_loss_type} 'sinkhorn' picks its own activation (sigmoid for top-1, softmax "
             "otherwise): leave {score_function} at softmax"),
            (not sinkhorn or not (self.enable_expert_bias or G or self.topk_scaling_factor),
             "{aux_loss_type} 'sinkhorn' selects by its balanced assignment alone: drop "
             "{enable_expert_bias}, {router_num_groups} and {topk_scaling_factor}"),
        ]
        if G is not None and g is not None:
            checks += [
                (G >= 1 and all(n % G == 0 for n in counts),
                 f"{{router_num_groups}} {G} must divide {{num_experts}} {counts}"),
                # g > k scores every group 0 (its top k // g = 0 experts): Megatron-Core accepts
                # it, and it is well defined only when every group is kept (no limit)
                (1 <= g <= G and (g <= k or g == G),
                 f"{{router_group_topk}} {g} must be between 1 and min({{router_num_groups}} "
                 f"{G}, {{topk}} {k}), or equal {{router_num_groups}} (no limit) (each group is "
                 "scored by its top topk/group_topk experts)"),
                (all(g * (n // max(G, 1)) >= k for n in counts),
                 f"{{router_group_topk}} {g} groups of {{num_experts}}/{{router_num_groups}} "
                 f"experts hold fewer than {{topk}} {k} experts"),
            ]
        return checks

    def tp_split_sizes(self) -> dict[str, int]:
        """Sizes split over TP, by {field}: the shared expert's (like the dense MLP)."""
        shared = self.shared_expert_intermediate_size
        return {} if shared is None else {"{shared_expert_intermediate_size}": shared}

    def etp_split_sizes(self) -> dict[str, int]:
        """Sizes split over the experts' TP group, by {field}: the experts' FFN when it is set
        apart from the model's (otherwise the model's FFN, which its own config names)."""
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
        check_layout(topology.world_size, topology.tp, topology.ep, pp=topology.pp,
                     etp=topology.etp, tp_divides=self.tp_split_sizes(),
                     ep_divides=self.ep_split_sizes(),
                     etp_divides=self.etp_split_sizes())


def moe_layer_indices(num_layers: int, *, expert_interval: int | None = None,
                      layer_freq: int | tuple[int, ...] | None = None, first_k_dense: int = 0):
    """Megatron-DeepSpeed's --expert-interval N puts MoE in layers N, 2N, ... (1-based);
    Megatron-Core's --moe-layer-freq N in layers 0, N, 2N, ... (0-based), or its list form, one
    1 (MoE) or 0 (dense) per layer (`parse_layer_freq`); then the first `first_k_dense` layers
    are dense (DeepSeek's first_k_dense_replace)."""
    if isinstance(layer_freq, (tuple, list)):
        if len(layer_freq) != num_layers:
            raise FieldError(f"{{moe_layer_freq}} gives {len(layer_freq)} layers, {{num_layers}} "
                             f"is {num_layers}: give one 0 or 1 per layer", "MoEConfig")
        layers = tuple(i for i, moe in enumerate(layer_freq) if moe)
    elif expert_interval is not None:
        layers = tuple(i for i in range(num_layers) if (i + 1) % expert_interval == 0)
    else:
        layers = tuple(i for i in range(num_layers) if i % (layer_freq or 1) == 0)
    if not 0 <= first_k_dense <= num_layers:
        raise FieldError(f"{{first_k_dense_replace}} must be in [0, {{num_layers}} {num_layers}] "
                         f"(got {first_k_dense})", "MoEConfig")
    return tuple(i for i in layers if i >= first_k_dense)


def parse_layer_freq(text: str) -> int | tuple[int, ...]:
    """Megatron-LM's --moe-layer-freq value: an integer N, or a Python list expression of 0s and
    1s built from [...] lists, + and * (e.g. "([0]*1+[1]*3)*2" -> 0,1,1,1,0,1,1,1), evaluated
    without eval(). Raises ValueError naming what is wrong."""
    text = text.strip().strip("'\"").strip()
    if "[" not in text:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is neither an integer nor a list pattern such as "
                             "\"([0]*1+[1]*3)*2\"") from None
        if value < 1:
            raise ValueError(f"must be >= 1 (got {value})")
        return value
    try:
        value = _pattern(ast.parse(text, mode="eval").body)
    except SyntaxError:
        value = None
    if not isinstance(value, list):
        raise ValueError(f"{text!r} is not a list pattern: use [0/1 ...] lists joined by + and "
                         "repeated by *, e.g. \"([0]*1+[1]*3)*2\"")
    if any(v not in (0, 1) for v in value):
        raise ValueError(f"{text!r} holds {sorted(set(value) - {0, 1})}: each layer is 0 (dense) "
                         "or 1 (MoE)")
    return tuple(value)


def _pattern(node):
    """A list or int of the pattern's syntax tree: int literals, [...] of them, +, *, ( ); None
    for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        items = [_pattern(e) for e in node.elts]
        return items if all(type(i) is int for i in items) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        a, b = _pattern(node.left), _pattern(node.right)
        if a is None or b is None:
            return None
        if isinstance(node.op, ast.Add):
            return a + b if type(a) is type(b) else None
        if isinstance(a, list) and isinstance(b, list):
            return None
        n = b if isinstance(a, list) else a
        return a * b if 0 <= n <= 100_000 else None
    return None
