"""The TED layout planner's model: per-GPU memory, per-step communication and step time of one
(TP, EP, DP) layout, computed from the same `Config` that pretrain_gpt_moe.py trains.

Three parts, each a statement about this code base rather than about transformers in general:

- parameters and optimizer state: every parameter the model creates (`param_table`, named as
  `model.named_parameters()` names them), packed into the optimizer's flat groups exactly as
  megatron/training/optimizer.py packs them (ZeRO-1 padding included);
- communication: every collective one training step issues (`comm_per_step`), calls and bytes per
  (kind, group), bytes counted as the send buffer (megatron/parallel/counter.py's convention). The
  tests check both against real CPU/gloo training steps, exactly;
- activations and the optimizer step's temporaries: what autograd keeps for backward in this code
  (attention as a flash kernel, no s x s matrix), plus the largest transient of the forward, the
  backward and the optimizer step; bench/planner_memory.py measures how close that comes on CPU.

Time is compute (FLOPs at an assumed efficiency of the peak) plus every collective by an
alpha-beta model, serialized: nothing here assumes communication hides behind compute.

Shapes: T tokens per micro-batch (micro batch x sequence), H hidden, F FFN, Fe the experts' FFN,
V the padded vocabulary, E experts (E_l = E / EP local), C capacity per expert (padded to a multiple
of TP), t = TP. "rows" = E * C: the expert input rows every rank computes (E_l experts x EP * C).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron.model.config import ModelConfig
from megatron.parallel.topology import Topology
from megatron.training.config import Config
from megatron.training.optimizer import _SCAN_CHUNK
from ted_patches.config import MoEConfig
from ted_patches.router import token_capacity

KINDS = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter")
GROUPS = ("tp", "dp", "ep", "edp", "world")
_FP32 = 4


# ---- parameters --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamEntry:
    """One parameter on one rank: its name in `model.named_parameters()`, its element count here,
    and the three properties the optimizer groups parameters by."""

    name: str
    numel: int
    expert: bool = False
    decay: bool = True
    tp_split: bool = False


def param_table(cfg: Config) -> list[ParamEntry]:
    """Every parameter this rank holds, in the model's order (megatron/model/gpt.py, transformer.py,
    ted_patches/moe_layer.py, experts.py, router.py)."""
    m, t = cfg.model, cfg.topology.tp
    H = m.hidden_size
    V = m.padded_vocab_size  # rows allocated; the padding ones are zero, masked out of the softmax
    out = [ParamEntry("embedding.weight", V // t * H, tp_split=True)]
    if m.position_embedding_type == "learned_absolute":
        out.append(ParamEntry("position_embedding.weight", m.max_position_embeddings * H))
    moe_layers = set(cfg.moe.layers) if cfg.moe is not None else set()
    for i in range(m.num_layers):
        p = f"layers.{i}."
        out += _norm(m, p + "input_norm")
        out += _linear(m, p + "attention.qkv", qkv_size(m) // t * H, qkv_size(m) // t, column=True)
        out += _linear(m, p + "attention.proj", H * (H // t), H, column=False)
        out += _norm(m, p + "post_attention_norm")
        if i in moe_layers:
            out += _moe(m, cfg.moe, experts_in(cfg, i), cfg.topology, p + "mlp")
        else:
            out += _mlp(m, p + "mlp", t)
    out += _norm(m, "final_norm")
    if m.untie_embeddings_and_output_weights:
        out.append(ParamEntry("output.weight", V // t * H, tp_split=True))
    return out


def query_groups(m: ModelConfig) -> int:
    """Key/value heads (grouped-query attention); one per head without it."""
    return getattr(m, "num_query_groups", None) or m.num_attention_heads


def qkv_size(m: ModelConfig) -> int:
    """Rows of the full QKV weight: per group, its queries, one key and one value."""
    g = query_groups(m)
    return g * (m.num_attention_heads // g + 2) * m.head_dim


def experts_in(cfg: Config, layer: int) -> int:
    """Experts of MoE layer `layer` (a pyramid gives each MoE layer its own count)."""
    moe = cfg.moe
    return moe.experts_in(layer) if hasattr(moe, "experts_in") else moe.num_experts


def _norm(m: ModelConfig, name: str) -> list[ParamEntry]:
    out = [ParamEntry(name + ".weight", m.hidden_size, decay=False)]
    if m.normalization == "LayerNorm":
        out.append(ParamEntry(name + ".bias", m.hidden_size, decay=False))
    return out


def _linear(m: ModelConfig, name: str, weight: int, bias: int, *, column: bool) -> list[ParamEntry]:
    """A megatron-core TP linear: the weight is split either way; a column-parallel bias is split,
    a row-parallel one (added after the reduction) replicated."""
    out = [ParamEntry(name + ".weight", weight, tp_split=True)]
    if m.add_bias_linear:
        out.append(ParamEntry(name + ".bias", bias, decay=False, tp_split=column))
    return out


def _mlp(m: ModelConfig, name: str, t: int) -> list[ParamEntry]:
    stride = 2 if m.swiglu else 1
    f, H = m.ffn_hidden_size // t, m.hidden_size
    return (_linear(m, name + ".fc1", stride * f * H, stride * f, column=True)
            + _linear(m, name + ".fc2", H * f, H, column=False))


def _moe(m: ModelConfig, moe: MoEConfig, experts: int, topo: Topology, name: str) -> list[ParamEntry]:
    H, stride = m.hidden_size, 2 if m.swiglu else 1
    e, f = experts // topo.ep, (moe.expert_ffn_hidden_size or m.ffn_hidden_size) // topo.tp
    out = [ParamEntry(name + ".router.weight", experts * H),
           ParamEntry(name + ".experts.w1", e * H * stride * f, expert=True, tp_split=True),
           ParamEntry(name + ".experts.w2", e * f * H, expert=True, tp_split=True)]
    if m.add_bias_linear:
        out += [ParamEntry(name + ".experts.b1", e * stride * f, expert=True, decay=False, tp_split=True),
                ParamEntry(name + ".experts.b2", e * H, expert=True, decay=False)]
    if moe.mlp_type == "residual":
        out += _mlp(m, name + ".dense", topo.tp)
        out += [ParamEntry(name + ".mix.weight", 2 * H), ParamEntry(name + ".mix.bias", 2, decay=False)]
    return out


def total_parameters(cfg: Config) -> int:
    """Parameters of the whole model (each counted once over the world), padded vocabulary rows
    included."""
    t, ep = cfg.topology.tp, cfg.topology.ep
    return sum(p.numel * (t if p.tp_split else 1) * (ep if p.expert else 1) for p in param_table(cfg))


@dataclass(frozen=True)
class FlatSpec:
    """One of the optimizer's flat buffers on this rank (megatron/training/optimizer.py FlatGroup)."""

    expert: bool
    decay: bool
    tp_split: bool
    numel: int  # parameters in it
    group: str  # dp | edp: where its gradients are reduced and, with ZeRO-1, its state sharded
    shards: int  # ZeRO-1: the group's size; else 1

    @property
    def padded(self) -> int:
        return -(-self.numel // self.shards) * self.shards

    @property
    def shard(self) -> int:
        return self.padded // self.shards


def flat_groups(cfg: Config) -> list[FlatSpec]:
    """The optimizer's flat groups, keyed (expert, decay, TP-split) in the order it builds them."""
    keyed: dict[tuple, int] = {}
    for p in param_table(cfg):
        key = (p.expert, p.decay, p.tp_split)
        keyed[key] = keyed.get(key, 0) + p.numel
    topo, zero = cfg.topology, cfg.optim.use_distributed_optimizer
    out = []
    for (expert, decay, tp_split), numel in keyed.items():
        group = "edp" if expert else "dp"
        size = topo.edp if expert else topo.dp
        out.append(FlatSpec(expert, decay, tp_split, numel, group, size if zero else 1))
    return out


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def param_bytes(cfg: Config) -> int:
    return _bytes(cfg.model.params_dtype)


def grad_bytes(cfg: Config) -> int:
    return _FP32 if cfg.optim.accumulate_grads_in_fp32 else param_bytes(cfg)


def optimizer_state_bytes(cfg: Config) -> int:
    """Adam moments (fp32) of this rank's shard, plus fp32 master weights unless the parameters are
    fp32 themselves (then they are their own master copy): Optimizer.state_bytes()."""
    per = 2 * _FP32 + (0 if cfg.model.params_dtype == torch.float32 else _FP32)
    return sum(per * fg.shard for fg in flat_groups(cfg))


# ---- shapes of one micro-batch --------------------------------------------------------------------
def with_padded_dispatch(cfg: Config) -> Config:
    """`cfg` with the padded (capacity-buffer) dispatch: the one the planner plans, and the one
    accelerators run in drop mode. The padding-free dispatch (MoEConfig.pad_free: the default on
    CPUs and in no-drop mode) sends only the kept tokens: its sizes depend on the routing."""
    if cfg.moe is None or getattr(cfg.moe, "pad_free", False) is False:
        return cfg
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, pad_free=False))


def pads(cfg: Config) -> bool:
    """Whether an accelerator run of `cfg` takes the padded dispatch (exactly what is planned)."""
    if cfg.moe is None:
        return True
    choice = getattr(cfg.moe, "pad_free", False)
    return choice is False or (choice is None and cfg.moe.drop_tokens)


def micro_shapes(cfg: Config, experts: int = 0) -> tuple[int, int]:
    """(T, C) of a layer with `experts` experts: tokens per micro-batch and the capacity per
    expert, padded to a multiple of TP. No-drop mode's capacity depends on the routing: the
    planner assumes the capacity factor's."""
    T = cfg.train.micro_batch_size * cfg.train.seq_length
    if cfg.moe is None or not experts:
        return T, 0
    moe, t = cfg.moe, cfg.topology.tp
    raw = token_capacity(T, experts, moe.topk, moe.capacity_factor, moe.min_capacity)
    return T, -(-raw // t) * t


def num_microbatches(cfg: Config) -> int:
    return cfg.train.num_microbatches(cfg.topology.dp)


# ---- communication ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    calls: int
    bytes: int


class _Tally:
    """Collectives by (kind, group); a group of size 1 issues nothing (as in comm.py and
    megatron-core), so it records nothing."""

    def __init__(self, topo: Topology):
        self.sizes = {"tp": topo.tp, "dp": topo.dp, "ep": topo.ep, "edp": topo.edp, "world": topo.world_size}
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def add(self, kind: str, group: str, nbytes: int, calls: int = 1, *, total: Optional[int] = None) -> None:
        """`calls` collectives of `nbytes` each (or of `total` bytes together)."""
        if self.sizes[group] > 1 and calls:
            self.calls[(kind, group)] += calls
            self.bytes[(kind, group)] += nbytes * calls if total is None else total

    def merge(self, other: "_Tally", times: int = 1) -> None:
        for key in other.calls:
            self.calls[key] += other.calls[key] * times
            self.bytes[key] += other.bytes[key] * times

    def result(self) -> dict[tuple[str, str], Traffic]:
        return {k: Traffic(self.calls[k], self.bytes[k]) for k in sorted(self.calls)}


def comm_per_step(cfg: Config) -> dict[tuple[str, str], Traffic]:
    """Every collective of one `train_step` on one rank (all ranks alike in drop mode): the
    micro-batches' forward, recompute and backward, the gradient reduction, the optimizer step
    and the loss average."""
    total = _Tally(cfg.topology)
    total.merge(_microbatch_comm(cfg), times=num_microbatches(cfg))
    total.merge(_optimizer_comm(cfg))
    total.add("all_reduce", "dp", 2 * 8)  # reduce_losses: [lm, aux] in float64
    return total.result()


def _layer_kinds(cfg: Config) -> list[str]:
    moe = set(cfg.moe.layers) if cfg.moe is not None else set()
    return ["moe" if i in moe else "dense" for i in range(cfg.model.num_layers)]


def _microbatch_comm(cfg: Config) -> _Tally:
    m = cfg.model
    T, _ = micro_shapes(cfg)
    act = T * m.hidden_size * param_bytes(cfg)  # one [T, H] activation
    tally = _Tally(cfg.topology)
    # megatron-core: the vocab-parallel embedding's reduction (forward); the output layer's input
    # gradient (backward); the cross-entropy's max, target logit and sum-exp over TP, in fp32.
    tally.add("all_reduce", "tp", act, 2)
    tally.add("all_reduce", "tp", T * _FP32, 3)
    chunks = cfg.recompute.full_chunks(m.num_layers)
    recomputed = {i for c in chunks for i in c}
    last_in_chunk = {c[-1] for c in chunks}
    cac = cfg.recompute.cac and cfg.moe is not None and any(i in cfg.moe.layers for i in recomputed)
    for i, kind in enumerate(_layer_kinds(cfg)):
        layer = _layer_comm(cfg, i, kind, act)
        for part in (layer.forward, layer.tail, layer.ours, layer.backward):
            tally.merge(part)
        if i in recomputed:
            # The recompute replays the layer's forward collectives: megatron-core's always, ours
            # unless CAC serves them from the stash. torch's checkpoint stops recomputing once the
            # last tensor backward needs exists: without dropout (whose mask is saved last), a
            # chunk ending in a dense MLP stops after fc2's matmul, before its all-reduce.
            tally.merge(layer.forward)
            if not (i in last_in_chunk and kind == "dense" and m.hidden_dropout == 0):
                tally.merge(layer.tail)
            if not cac:
                tally.merge(layer.ours)
    return tally


@dataclass
class _LayerComm:
    """One layer's collectives: `forward` (megatron-core's, but for `tail`: the dense fc2's
    all-reduce, the layer's last collective), `ours` (the forward ones through
    megatron.parallel.comm: what a CAC stash serves) and `backward`."""

    forward: _Tally
    tail: _Tally
    ours: _Tally
    backward: _Tally


def _layer_comm(cfg: Config, index: int, kind: str, act: int) -> _LayerComm:
    topo = cfg.topology
    layer = _LayerComm(_Tally(topo), _Tally(topo), _Tally(topo), _Tally(topo))
    # attention: QKV column-parallel (its input gradient all-reduced), projection row-parallel
    layer.backward.add("all_reduce", "tp", act)
    layer.forward.add("all_reduce", "tp", act)
    if kind == "dense":  # fc1 column-parallel (backward), fc2 row-parallel (forward)
        layer.backward.add("all_reduce", "tp", act)
        layer.tail.add("all_reduce", "tp", act)
    else:
        if cfg.moe.mlp_type == "residual":  # the dense MLP beside the experts
            layer.backward.add("all_reduce", "tp", act)
            layer.forward.add("all_reduce", "tp", act)
        _moe_comm(cfg, experts_in(cfg, index), layer.ours, layer.backward)
    return layer


def _moe_comm(cfg: Config, experts: int, fwd: _Tally, bwd: _Tally) -> None:
    """ted_patches/dispatcher.py's collectives (docs/architecture.md, "One MoE layer")."""
    topo, moe, e = cfg.topology, cfg.moe, param_bytes(cfg)
    t = topo.tp
    _, C = micro_shapes(cfg, experts)
    buffer = experts * C * cfg.model.hidden_size * e  # [E, C, H]: the whole capacity buffer
    mine = []  # this layer's forward collectives that go through comm.py
    if not moe.drop_tokens:  # the router: all-reduce MAX of the largest count (int64) over EP
        mine.append(("all_reduce", "ep", 8))
    if t > 1 and moe.dtd:
        # drop -> a2a -> gather_to_split -> experts -> reduce_scatter -> a2a -> gather_to_replicated
        mine += [("all_to_all", "ep", buffer // t), ("all_gather", "tp", buffer // t),
                 ("reduce_scatter", "tp", buffer), ("all_to_all", "ep", buffer // t), ("all_gather", "tp", buffer // t)]
        # backward: all-gather (drop), a2a, reduce-scatter (gather_to_split), all-gather
        # (reduce_scatter), a2a
        bwd.add("all_gather", "tp", buffer // t, 2)
        bwd.add("all_to_all", "ep", buffer // t, 2)
        bwd.add("reduce_scatter", "tp", buffer)
    else:
        # without DTD every TP rank sends the whole buffer: copy_to_split (backward: all-reduce)
        # and reduce_from_split (forward: all-reduce) over TP
        mine += [("all_to_all", "ep", buffer), ("all_reduce", "tp", buffer), ("all_to_all", "ep", buffer)]
        bwd.add("all_to_all", "ep", buffer, 2)
        bwd.add("all_reduce", "tp", buffer)
    if t > 1 and cfg.model.add_bias_linear:  # the fc2 bias gradient (Dispatcher.fc2_bias: copy_to_split)
        bwd.add("all_reduce", "tp", experts // topo.ep * cfg.model.hidden_size * e)
    for kind, group, nbytes in mine:
        fwd.add(kind, group, nbytes)


def _optimizer_comm(cfg: Config) -> _Tally:
    """Optimizer.reduce_gradients and Optimizer.step (no fp16 overflow assumed)."""
    tally = _Tally(cfg.topology)
    g, p = grad_bytes(cfg), param_bytes(cfg)
    for fg in flat_groups(cfg):
        if fg.shards > 1:
            tally.add("reduce_scatter", fg.group, fg.padded * g)
        else:
            tally.add("all_reduce", fg.group, fg.numel * g)
    if cfg.optim.fp16:
        tally.add("all_reduce", "world", _FP32)  # the overflow flag, float32
    tally.add("all_reduce", "world", 8)  # the squared grad norm, float64
    tile = cfg.optim.tile_size
    for fg in flat_groups(cfg):
        if fg.shards > 1:  # ZeRO-1: the updated shards back to every rank, tile by tile when tiled
            calls = 1 if tile <= 0 else -(-fg.shard // max(1, tile // fg.shards))
            tally.add("all_gather", fg.group, 0, calls, total=fg.shard * p)
    return tally


# ---- memory -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU. Activations: the highest point of one micro-batch's forward and backward
    (saved tensors plus the largest transient), above parameters, gradients and optimizer state;
    step_peak: the optimizer step's temporaries, above the same. Only one of the two is live at a
    time, so the peak is their maximum."""

    params: int
    grads: int
    optimizer: int
    activations: int
    step_peak: int
    reserved: int = 0  # the runtime's own (CUDA context, communicator buffers): the cluster's figure

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + max(self.activations, self.step_peak) + self.reserved

    def as_dict(self) -> dict[str, int]:
        return dict(params=self.params, grads=self.grads, optimizer=self.optimizer, activations=self.activations,
                    step_peak=self.step_peak, reserved=self.reserved, total=self.total)


def memory_per_gpu(cfg: Config, reserved: int = 0) -> Memory:
    p, g = param_bytes(cfg), grad_bytes(cfg)
    fgs = flat_groups(cfg)
    return Memory(params=sum(fg.padded for fg in fgs) * p, grads=sum(fg.padded for fg in fgs) * g,
                  optimizer=optimizer_state_bytes(cfg), activations=activation_peak(cfg),
                  step_peak=step_peak(cfg), reserved=reserved)


def step_peak(cfg: Config) -> int:
    """Optimizer._update and FlatGroup.gather_params, one flat group at a time: a tile's (or the
    whole shard's) fp32 upcast of half-precision gradients, Adam's two fp32 temporaries
    (v.sqrt(), then / bias correction), and ZeRO-1's gathered buffer (untiled: a copy of the shard).
    The reduce-scatter's output shard (before the step) and the norm's chunked scans are bounded
    by the same figures."""
    tile, p = cfg.optim.tile_size, param_bytes(cfg)
    upcast = 0 if grad_bytes(cfg) == _FP32 else _FP32
    scan = 0 if grad_bytes(cfg) == _FP32 else _SCAN_CHUNK * _FP32
    worst = scan
    for fg in flat_groups(cfg):
        n = fg.shard if tile <= 0 else min(tile, fg.shard)
        worst = max(worst, n * (upcast + 2 * _FP32))
        if fg.shards > 1:
            gathered = fg.shard * p if tile <= 0 else min(fg.padded, max(1, tile // fg.shards) * fg.shards) * p
            reduced = fg.shard * grad_bytes(cfg)
            worst = max(worst, gathered, reduced)
    return worst


@dataclass(frozen=True)
class _Block:
    """One part of the forward: what it keeps for backward, and its largest transient in the
    forward (unsaved intermediates) and in the backward (gradients alive at once)."""

    saved: int
    fwd_transient: int = 0
    bwd_transient: int = 0


def _act(cfg: Config) -> int:
    return param_bytes(cfg)


def _attention_block(cfg: Config, T: int) -> _Block:
    """Input norm, QKV, attention core, projection, residual, post-attention norm's input."""
    m, t, e = cfg.model, cfg.topology.tp, _act(cfg)
    H, hs, heads = m.hidden_size, m.hidden_size // t, m.num_attention_heads // t
    kv = query_groups(m) * m.head_dim // t  # one of k, v per token
    qkv = qkv_size(m) // t
    stats = (2 if m.normalization == "LayerNorm" else 1) * T * _FP32
    saved = T * H * e + stats  # the layer input, kept by the input norm
    saved += T * H * e  # the norm's output, kept by QKV
    # QKV's output, kept by the attention kernel through its q, k, v views (with grouped queries
    # q is gathered out of the groups: a copy)
    saved += T * qkv * e + (T * hs * e if m.num_attention_heads > query_groups(m) else 0)
    if m.position_embedding_type == "rope":  # rotated copies (and fp32 upcasts in half precision)
        saved += T * (hs + kv) * (2 * _FP32 if e == _FP32 else 2 * _FP32 + e)
    core = T * hs * e + T * heads * _FP32  # attention output and log-sum-exp
    if cfg.recompute.granularity != "selective":
        saved += core
    # the projection keeps the kernel's output folded back to [T, H/t]: a view, as flash kernels
    # lay their output out [b, s, heads, d]
    if m.hidden_dropout > 0:
        saved += T * H  # the dropout mask (bool)
    saved += T * H * e + stats  # the residual stream after attention, kept by the second norm
    # backward: the kernel's q, k, v gradients and their [T, QKV/t] concatenation, and QKV's
    # weight gradient before it is added into the flat buffer
    bwd = 2 * T * qkv * e + qkv * H * e
    return _Block(saved, fwd_transient=T * qkv * e, bwd_transient=bwd)


def _mlp_saved(rows: int, f: int, swiglu: bool, e: int) -> int:
    """fc1's output (kept by the activation), its activation output (kept by fc2); SwiGLU keeps
    [gate | up] and silu(gate) too."""
    return rows * f * e * (4 if swiglu else 2)


def _mlp_transient(rows: int, f: int, H: int, swiglu: bool, e: int, weights: int = 1) -> int:
    """The MLP backward's worst moment above its saved tensors (`weights` matrices per linear:
    the local experts), step by step as autograd frees what each step consumed: fc2 (the output
    gradient, the activation's gradient, fc2's weight gradient before the flat buffer takes it),
    the activation (its input's gradient; its output is freed), fc1 (the input's gradient and
    fc1's weight gradient; the activation's input and output are freed)."""
    stride = 2 if swiglu else 1
    fc2 = rows * (H + f) + weights * f * H
    act = rows * stride * f
    fc1 = rows * H + weights * stride * f * H - rows * f
    return max(fc2, act, fc1) * e


def _dense_mlp_block(cfg: Config, T: int) -> _Block:
    m, t, e = cfg.model, cfg.topology.tp, _act(cfg)
    f = m.ffn_hidden_size // t
    saved = T * m.hidden_size * e + _mlp_saved(T, f, m.swiglu, e)  # fc1 keeps its input
    if m.hidden_dropout > 0:
        saved += T * m.hidden_size
    return _Block(saved, fwd_transient=T * m.hidden_size * e,
                  bwd_transient=_mlp_transient(T, f, m.hidden_size, m.swiglu, e))


def _moe_block(cfg: Config, T: int, layer: int) -> _Block:
    m, moe, topo, e = cfg.model, cfg.moe, cfg.topology, _act(cfg)
    H, E = m.hidden_size, experts_in(cfg, layer)
    _, C = micro_shapes(cfg, E)
    rows = E * C
    fe = (moe.expert_ffn_hidden_size or m.ffn_hidden_size) // topo.tp
    # router: its fp32 input (the norm's output itself in fp32, a copy in half precision), the
    # probabilities [T, E] in fp32, and the logits too when the z-loss is on
    saved = T * H * _FP32 + (1 + (moe.z_loss_coeff != 0)) * T * E * _FP32
    saved += rows * H * e + _mlp_saved(rows, fe, m.swiglu, e)  # the experts' input rows, fc1 and act
    saved += moe.topk * T * (H * e + _FP32)  # combine: the row each assignment read, its gate weight
    if moe.mlp_type == "residual":
        saved += _dense_mlp_block(cfg, T).saved - (T * H * e if e == _FP32 else 0)
        saved += 2 * T * H * e  # the two mixed outputs, kept by the mixing products
    if m.hidden_dropout > 0:
        saved += T * H
    local = E // topo.ep
    # forward: the capacity buffer and the gathered rows alongside the experts' input; the fc2
    # output and its contiguous copy for the reduce-scatter. Backward: the experts' MLP.
    fwd = 2 * rows * H * e
    bwd = _mlp_transient(rows, fe, H, m.swiglu, e, weights=local)
    return _Block(saved, fwd_transient=fwd, bwd_transient=bwd)


def cac_stash_bytes(cfg: Config, layer: int) -> int:
    """What CAC keeps of MoE layer `layer` from the forward to the recompute: the outputs of its
    forward collectives (comm.CommStash)."""
    m, moe, t, e = cfg.model, cfg.moe, cfg.topology.tp, _act(cfg)
    E = experts_in(cfg, layer)
    _, C = micro_shapes(cfg, E)
    buffer = E * C * m.hidden_size * e
    if t > 1 and moe.dtd:  # two a2a outputs and the reduce-scatter's (1/t), two TP gathers (whole)
        return 3 * buffer // t + 2 * buffer
    if t > 1:  # two a2a outputs and the all-reduced expert output
        return 3 * buffer
    return 2 * buffer


def _head_block(cfg: Config, T: int) -> tuple[int, int, int]:
    """(saved, loss transient, backward transient) of the final norm, output layer and loss."""
    m, t, e = cfg.model, cfg.topology.tp, _act(cfg)
    H, V = m.hidden_size, m.padded_vocab_size // t
    saved = 2 * T * H * e + 2 * T * _FP32  # the last layer's output and the final norm's (and its stats)
    saved += T * V * _FP32  # the fp32 softmax the cross-entropy keeps
    # the logits beside their copy: the padding-masked clone (on the rank holding padded rows:
    # the worst rank is the one that counts) or, in half precision, the fp32 upcast
    copies = (m.padded_vocab_size > m.vocab_size) + (e != _FP32)
    loss = T * V * e * copies
    weight_grad = V * H * e
    bwd = T * H * e + (T * V * e if e != _FP32 else 0) + (weight_grad if m.untie_embeddings_and_output_weights else 0)
    return saved, loss, bwd


def _embedding_saved(T: int) -> int:
    return 3 * T * 8  # token ids (int64) kept by the two lookups, and the vocab-range mask


def activation_peak(cfg: Config) -> int:
    """The highest point of one micro-batch's forward + backward above the static memory."""
    return max(activation_candidates(cfg).values())


def activation_candidates(cfg: Config) -> dict[str, int]:
    """The moments one of which is the activation peak, by name, with their live bytes."""
    m = cfg.model
    T, _ = micro_shapes(cfg)
    e = _act(cfg)
    kinds = _layer_kinds(cfg)
    blocks = []
    for i, kind in enumerate(kinds):
        mlp = _moe_block(cfg, T, i) if kind == "moe" else _dense_mlp_block(cfg, T)
        attn = _attention_block(cfg, T)
        blocks.append(_Block(attn.saved + mlp.saved, max(attn.fwd_transient, mlp.fwd_transient),
                             max(attn.bwd_transient, mlp.bwd_transient)))
    head_saved, loss_transient, head_bwd = _head_block(cfg, T)
    # a tied embedding's gradient from the output layer waits for the lookup's, at the very end
    pending = 0 if m.untie_embeddings_and_output_weights else m.padded_vocab_size // cfg.topology.tp * m.hidden_size * e
    chunk_of = {i: tuple(c) for c in cfg.recompute.full_chunks(m.num_layers) for i in c}
    cac = cfg.recompute.cac and cfg.moe is not None and any(i in cfg.moe.layers for i in chunk_of)

    # What each layer holds from its forward to its backward: its saved tensors, or, in a
    # checkpointed chunk, the chunk's input (at its first layer) and the layer's CAC stash.
    kept = []
    for i, b in enumerate(blocks):
        if i not in chunk_of:
            kept.append(b.saved)
            continue
        stash = cac_stash_bytes(cfg, i) if cac and kinds[i] == "moe" else 0
        kept.append((T * m.hidden_size * e if chunk_of[i][0] == i else 0) + stash)
    base = _embedding_saved(T)
    candidates = {}
    held = base
    for i, b in enumerate(blocks):  # forward: what is held so far, plus this layer's working set
        candidates[f"forward {i}"] = held + b.saved + b.fwd_transient
        held += kept[i]
    candidates["loss"] = held + head_saved + loss_transient
    candidates["output backward"] = held + head_saved + head_bwd + pending
    # backward, from the last layer: what the layers below still hold, this layer's saved tensors
    # (a chunk's recompute materializes all of its layers' at once), its gradients
    for i in reversed(range(len(blocks))):
        if i in chunk_of:
            chunk = chunk_of[i]
            live = base + sum(kept[:chunk[0]]) + sum(kept[j] for j in chunk)
            live += sum(blocks[j].saved for j in chunk if j <= i)
        else:
            live = base + sum(kept[:i + 1])
        candidates[f"backward {i}"] = live + blocks[i].bwd_transient + pending
    return candidates


# ---- compute ------------------------------------------------------------------------------------
def flops_per_rank(cfg: Config) -> float:
    """FLOPs one rank computes in one step: forward x 3 (backward twice the forward), plus the
    recomputed forward. Experts count the capacity rows each rank computes, padding included."""
    m, topo = cfg.model, cfg.topology
    t = topo.tp
    T, _ = micro_shapes(cfg)
    H, s = m.hidden_size, cfg.train.seq_length
    gemm = 6 if m.swiglu else 4  # 2 FLOPs per multiply-add, 2 matrices (3 for SwiGLU)
    attn = T * (2 * H * qkv_size(m) + 2 * H * H + 4 * s * H) / t  # QKV, projection, scores + context
    dense = T * gemm * H * m.ffn_hidden_size / t
    fwd = []
    for i, kind in enumerate(_layer_kinds(cfg)):
        layer = attn
        if kind == "moe":
            moe, E = cfg.moe, experts_in(cfg, i)
            _, C = micro_shapes(cfg, E)
            fe = moe.expert_ffn_hidden_size or m.ffn_hidden_size
            layer += 2 * T * H * E + E * C * gemm * H * fe / t
            if moe.mlp_type == "residual":
                layer += dense
        else:
            layer += dense
        fwd.append(layer)
    head = 2 * T * H * m.padded_vocab_size / t
    recomputed = sum(fwd[i] for c in cfg.recompute.full_chunks(m.num_layers) for i in c)
    if cfg.recompute.granularity == "selective":
        recomputed = m.num_layers * T * 4 * s * H / t
    per_micro = 3 * (sum(fwd) + head) + recomputed
    return per_micro * num_microbatches(cfg)


# ---- the cluster and time -------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster. Bandwidths are per direction in bytes/s: `intra_bandwidth` one GPU's
    to its node peers, `inter_bandwidth` one node's network injection (all its NICs)."""

    name: str
    gpus: int
    gpus_per_node: int
    memory_bytes: int
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    peak_flops: float
    efficiency: float
    reserved_bytes: int = 0

    def __post_init__(self):
        for name in ("gpus", "gpus_per_node", "memory_bytes", "intra_bandwidth", "inter_bandwidth", "peak_flops"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1] (got {self.efficiency})")


GIB = 2**30
# Node presets. Sources: OLCF Summit User Guide (6 V100-SXM2-16GB per node, NVLink 2.0 at 50 GB/s
# per direction between GPUs of a socket, dual-rail EDR InfiniBand: 2 x 12.5 GB/s per node); NVIDIA
# V100 datasheet (125 TFLOP/s fp16 tensor cores); NVIDIA DGX A100 architecture whitepaper (8 A100
# 40GB, NVLink 3 via NVSwitch 300 GB/s per direction per GPU, 8 x 200 Gb/s HDR = 200 GB/s per node;
# A100 datasheet: 312 TFLOP/s dense bf16/fp16); NVIDIA DGX H100/H200 user guides (8 GPUs, NVLink 4
# 450 GB/s per direction per GPU, 8 x 400 Gb/s ConnectX-7 = 400 GB/s per node; H100 SXM datasheet:
# 989 TFLOP/s dense bf16; H200: 141 GB, same compute).
# Assumed, not sourced: latencies (NCCL's small-message latency is microseconds: 5 us per ring step
# within a node, 10 us across nodes), the compute efficiency (half of peak in the GEMMs: a typical
# Megatron figure for these sizes, the user's to change), and 1 GiB per GPU taken by the CUDA
# context, cuBLAS workspaces and NCCL buffers.
NODE_PRESETS = {
    "summit-v100-16gb": dict(gpus_per_node=6, memory_bytes=16 * GIB, intra_bandwidth=50e9, inter_bandwidth=25e9,
                             peak_flops=125e12),
    "a100-40gb": dict(gpus_per_node=8, memory_bytes=40 * GIB, intra_bandwidth=300e9, inter_bandwidth=200e9,
                      peak_flops=312e12),
    "h100-80gb": dict(gpus_per_node=8, memory_bytes=80 * GIB, intra_bandwidth=450e9, inter_bandwidth=400e9,
                      peak_flops=989e12),
    "h200-141gb": dict(gpus_per_node=8, memory_bytes=141 * 10**9, intra_bandwidth=450e9, inter_bandwidth=400e9,
                       peak_flops=989e12),
}
DEFAULT_ASSUMPTIONS = dict(intra_latency=5e-6, inter_latency=10e-6, efficiency=0.5, reserved_bytes=1 * GIB)


def cluster_preset(name: str, gpus: int, **overrides) -> Cluster:
    values = {**DEFAULT_ASSUMPTIONS, **NODE_PRESETS[name]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Cluster(name=name, gpus=gpus, **values)


@dataclass(frozen=True)
class Link:
    """How one kind of group communicates: its size, and its slowest link's bandwidth and latency
    as a ring (or the all-to-all's node injection)."""

    size: int
    intra_node: bool
    ring_bandwidth: float
    latency: float
    # all-to-all: of the group's members, those on one node with this rank (at least), and the
    # share of a node's network injection one rank gets when every rank sends at once
    peers_on_node: int
    a2a_inter_bandwidth: float


def group_links(topo: Topology, cluster: Cluster) -> dict[str, Link]:
    """Links of each group kind, from the rank tables: rank r lives on node r // gpus_per_node.
    A group inside one node runs at the intra-node figures. One spanning nodes runs its ring at
    the share of the node's injection left to it (the node carries one ring crossing per group of
    this kind with members on it); its all-to-all sends each off-node peer's share through the
    node's injection, shared by all the node's ranks."""
    tables = {"tp": topo.tp_groups(), "dp": topo.dp_groups(), "ep": topo.ep_groups(), "edp": topo.edp_groups(),
              "world": [list(range(topo.world_size))]}
    gpn = cluster.gpus_per_node
    out = {}
    for name, groups in tables.items():
        nodes_of = [{r // gpn for r in g} for g in groups]
        size = len(groups[0])
        if all(len(n) == 1 for n in nodes_of):
            out[name] = Link(size, True, cluster.intra_bandwidth, cluster.intra_latency, size, cluster.intra_bandwidth)
            continue
        crossing: Counter = Counter()
        for nodes in nodes_of:
            crossing.update(nodes)
        ring = min(cluster.intra_bandwidth, cluster.inter_bandwidth / max(crossing.values()))
        on_node = min(min(Counter(r // gpn for r in g).values()) for g in groups)
        ranks_per_node = min(gpn, topo.world_size)
        out[name] = Link(size, False, ring, cluster.inter_latency, on_node, cluster.inter_bandwidth / ranks_per_node)
    return out


def collective_seconds(kind: str, traffic: Traffic, link: Link) -> float:
    """Alpha-beta time of `traffic.calls` collectives sending `traffic.bytes` in all (send-buffer
    bytes): ring all-reduce 2(n-1)/n B, all-gather (n-1) S, reduce-scatter (n-1)/n B, each at the
    ring's bandwidth with 2(n-1) or (n-1) latency steps; all-to-all (n-1)/n B, the off-node part
    through the rank's share of the node's injection, concurrently with the on-node part."""
    n, B = link.size, traffic.bytes
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) * (traffic.calls * link.latency + B / n / link.ring_bandwidth)
    if kind == "all_gather":
        return (n - 1) * (traffic.calls * link.latency + B / link.ring_bandwidth)
    if kind == "reduce_scatter":
        return (n - 1) * (traffic.calls * link.latency + B / n / link.ring_bandwidth)
    if kind == "all_to_all":
        on_node = B * (link.peers_on_node - 1) / n / link.ring_bandwidth
        off_node = 0.0 if link.intra_node else B * (n - link.peers_on_node) / n / link.a2a_inter_bandwidth
        return (n - 1) * traffic.calls * link.latency + max(on_node, off_node)
    raise ValueError(f"unknown collective kind {kind!r}")


@dataclass(frozen=True)
class StepTime:
    compute: float
    comm: dict[str, float]  # "kind/group" -> seconds

    @property
    def total(self) -> float:
        return self.compute + sum(self.comm.values())


def step_time(cfg: Config, cluster: Cluster, comm: Optional[dict] = None) -> StepTime:
    comm = comm if comm is not None else comm_per_step(cfg)
    links = group_links(cfg.topology, cluster)
    compute = flops_per_rank(cfg) / (cluster.peak_flops * cluster.efficiency)
    return StepTime(compute, {f"{k}/{g}": collective_seconds(k, t, links[g]) for (k, g), t in comm.items()})


# ---- one layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutPlan:
    tp: int
    ep: int
    dp: int
    edp: int
    memory: Memory
    comm: dict[tuple[str, str], Traffic]
    time: StepTime
    fits: bool
    total_params: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self, recommended: bool) -> dict:
        return dict(
            tp=self.tp, ep=self.ep, dp=self.dp, edp=self.edp, fits=self.fits,
            memory_bytes=self.memory.as_dict(),
            comm_bytes={f"{k}/{g}": t.bytes for (k, g), t in self.comm.items()},
            comm_calls={f"{k}/{g}": t.calls for (k, g), t in self.comm.items()},
            step_seconds=self.time.total, compute_seconds=self.time.compute,
            comm_seconds={k: v for k, v in self.time.comm.items()},
            total_params=self.total_params, recommended=recommended,
        )


def plan_layout(cfg: Config, cluster: Cluster) -> LayoutPlan:
    topo = cfg.topology
    comm = comm_per_step(cfg)
    memory = memory_per_gpu(cfg, cluster.reserved_bytes)
    notes = []
    if cfg.moe is not None and not cfg.moe.drop_tokens:
        notes.append(f"no-drop mode: capacity assumed from --moe-expert-capacity-factor {cfg.moe.capacity_factor}")
    if cfg.moe is not None and getattr(cfg.moe, "check_tp_routing", 0):
        notes.append("--check-tp-routing: its every-N-th TP all-reduce of a routing checksum is not planned")
    if not pads(cfg):
        notes.append("padding-free dispatch: planned as the padded one (the kept tokens' sizes depend on the "
                     "routing; the padded sizes bound them)")
    notes = tuple(notes)
    return LayoutPlan(topo.tp, topo.ep, topo.dp, topo.edp, memory, comm, step_time(cfg, cluster, comm),
                      memory.total <= cluster.memory_bytes, total_parameters(cfg), notes)


def recommend(plans: list[LayoutPlan]) -> Optional[LayoutPlan]:
    """The fastest layout that fits (ties: less TP, then less EP)."""
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: (p.time.total, p.tp, p.ep)) if fitting else None


# ---- model presets --------------------------------------------------------------------------------
# GPT-3-style bases as Megatron-DeepSpeed's MoE example scripts (examples_deepspeed/MoE) define them:
# (layers, hidden, heads), sequence 2048, GPT-2's vocabulary (50257 ids: --vocab-size 50256 plus the
# end-of-document id, as the NullTokenizer counts). The paper's bases are 1.3B, 2.7B and 6.7B; each
# preset puts 16 experts in every other layer (--expert-interval 2).
BASES = {
    "125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16), "1.3b": (24, 2048, 16),
    "2.7b": (32, 2560, 32), "6.7b": (32, 4096, 32), "13b": (40, 5120, 40), "175b": (96, 12288, 96),
}
GPT2_VOCAB = 50257


def preset_flags(name: str, experts: int = 16) -> list[str]:
    """pretrain_gpt_moe.py flags of a preset base with `experts` experts every other layer."""
    layers, hidden, heads = BASES[name]
    return (f"--num-layers {layers} --hidden-size {hidden} --num-attention-heads {heads} --seq-length 2048 "
            f"--max-position-embeddings 2048 --num-experts {experts} --expert-interval 2 "
            f"--vocab-size {GPT2_VOCAB - 1}").split()
