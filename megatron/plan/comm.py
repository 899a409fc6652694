"""Communication: every collective one training step issues (`comm_per_step`), calls and bytes
per (kind, group), bytes counted as the send buffer (megatron/parallel/counter.py's convention).
The tests check both against real CPU/gloo training steps, exactly.

Shapes as in megatron/plan/shapes.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from megatron.parallel.topology import Topology
from megatron.plan import pipeline
from megatron.plan.params import _FP32, experts_in, flat_groups, grad_bytes, param_bytes
from megatron.plan.shapes import _layer_kinds, micro_shapes, num_microbatches
from megatron.training.config import Config

KINDS = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send", "recv")
GROUPS = ("tp", "dp", "ep", "edp", "world", "pp", "embedding")


# ---- communication -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    calls: int
    bytes: int


class _Tally:
    """Collectives by (kind, group); a group of size 1 issues nothing (as in
    megatron/parallel/comm.py and megatron-core), so it records nothing."""

    def __init__(self, topo: Topology):
        self.sizes = {"tp": topo.tp, "dp": topo.dp, "ep": topo.ep, "edp": topo.edp,
                      "world": topo.world_size, "pp": topo.pp,
                      "embedding": 2 if topo.pp > 1 else 1}
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def add(self, kind: str, group: str, nbytes: int, calls: int = 1, *,
            total: Optional[int] = None) -> None:
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


def comm_per_step(cfg: Config, pp_rank: int = 0) -> dict[tuple[str, str], Traffic]:
    """Every collective of one `train_step` on one rank of pipeline rank `pp_rank` (all ranks
    alike in drop mode without a pipeline): the micro-batches' forward, recompute and backward
    (with a pipeline: the P2P sends and receives between stages, each counted by its own side),
    the gradient reduction, the optimizer step and the loss average. torch's pipeline stages
    also exchange a few 4-byte handshakes in their first step only: not planned."""
    micro, rest = step_parts(cfg, pp_rank)
    total = _Tally(cfg.topology)
    total.merge(micro, times=num_microbatches(cfg))
    total.merge(rest)
    return total.result()


def step_parts(cfg: Config, pp_rank: int = 0) -> tuple["_Tally", "_Tally"]:
    """(one micro-batch's collectives, the rest of the step's): the part a pipeline schedule
    runs per micro-batch and the part after it."""
    rest = _optimizer_comm(cfg, pp_rank)
    rest.add("all_reduce", "dp", 2 * 8)  # reduce_losses: [lm, aux] in float64
    rest.add("all_reduce", "pp", 2 * 8)  # reduce_over_stages: the same, over the pipeline
    return _microbatch_comm(cfg, pp_rank), rest


def per_microbatch(cfg: Config, pp_rank: int = 0) -> dict[tuple[str, str], Traffic]:
    """One micro-batch's collectives and P2P transfers on pipeline rank `pp_rank`."""
    return step_parts(cfg, pp_rank)[0].result()


def _microbatch_comm(cfg: Config, pp_rank: int) -> _Tally:
    m = cfg.model
    T, _ = micro_shapes(cfg)
    act = T * m.hidden_size * param_bytes(cfg)  # one [T, H] activation
    tally = _Tally(cfg.topology)
    # megatron-core: the vocab-parallel embedding's reduction (forward); the output layer's input
    # gradient (backward); the cross-entropy's max, target logit and sum-exp over TP, in fp32.
    if pipeline.holds_first(cfg, pp_rank):
        tally.add("all_reduce", "tp", act)
    if pipeline.holds_last(cfg, pp_rank):
        tally.add("all_reduce", "tp", act)
        tally.add("all_reduce", "tp", T * _FP32, 3)
    # between stages on other ranks: forward the hidden state and the position ids (int64), back
    # the hidden state's gradient
    for st in pipeline.stages_of(cfg, pp_rank):
        if st.recv_prev:
            tally.add("recv", "pp", act)
            tally.add("recv", "pp", T * 8)
            tally.add("send", "pp", act)
        if st.send_next:
            tally.add("send", "pp", act)
            tally.add("send", "pp", T * 8)
            tally.add("recv", "pp", act)
    chunks = pipeline.checkpoint_chunks(cfg, pp_rank)
    recomputed = {i for c in chunks for i in c}
    last_in_chunk = {c[-1] for c in chunks}
    cac = cfg.recompute.cac and cfg.moe is not None and any(i in cfg.moe.layers for i in recomputed)
    kinds = _layer_kinds(cfg)
    for i in pipeline.rank_layers(cfg, pp_rank):
        kind = kinds[i]
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
    mine = []  # this layer's forward collectives that go through megatron/parallel/comm.py
    if not moe.drop_tokens:  # the router: all-reduce MAX of the largest count (int64) over EP
        mine.append(("all_reduce", "ep", 8))
    if t > 1 and moe.dtd:
        # drop -> a2a -> gather_to_split -> experts -> reduce_scatter -> a2a -> gather_to_replicated
        mine += [("all_to_all", "ep", buffer // t), ("all_gather", "tp", buffer // t),
                 ("reduce_scatter", "tp", buffer), ("all_to_all", "ep", buffer // t),
                 ("all_gather", "tp", buffer // t)]
        # backward: all-gather (drop), a2a, reduce-scatter (gather_to_split), all-gather
        # (reduce_scatter), a2a
        bwd.add("all_gather", "tp", buffer // t, 2)
        bwd.add("all_to_all", "ep", buffer // t, 2)
        bwd.add("reduce_scatter", "tp", buffer)
    else:
        # without DTD every TP rank sends the whole buffer: copy_to_split (backward: all-reduce)
        # and reduce_from_split (forward: all-reduce) over TP
        mine += [("all_to_all", "ep", buffer), ("all_reduce", "tp", buffer),
                 ("all_to_all", "ep", buffer)]
        bwd.add("all_to_all", "ep", buffer, 2)
        bwd.add("all_reduce", "tp", buffer)
    # the fc2 bias gradient (Dispatcher.fc2_bias: copy_to_split)
    if t > 1 and cfg.model.add_bias_linear:
        bwd.add("all_reduce", "tp", experts // topo.ep * cfg.model.hidden_size * e)
    for kind, group, nbytes in mine:
        fwd.add(kind, group, nbytes)


def _optimizer_comm(cfg: Config, pp_rank: int = 0) -> _Tally:
    """Optimizer.reduce_gradients and Optimizer.step (no fp16 overflow assumed)."""
    tally = _Tally(cfg.topology)
    g, p = grad_bytes(cfg), param_bytes(cfg)
    m = cfg.model
    if pipeline.embedding_all_reduce(cfg, pp_rank):  # the tied embedding's two copies: one sum
        tally.add("all_reduce", "embedding", m.padded_vocab_size // cfg.topology.tp
                  * m.hidden_size * g)
    fgs = flat_groups(cfg, pp_rank)
    for fg in fgs:
        if fg.shards > 1:
            tally.add("reduce_scatter", fg.group, fg.padded * g)
        else:
            tally.add("all_reduce", fg.group, fg.numel * g)
    if cfg.optim.fp16:
        tally.add("all_reduce", "world", _FP32)  # the overflow flag, float32
    tally.add("all_reduce", "world", 8)  # the squared grad norm, float64
    tile = cfg.optim.tile_size
    for fg in fgs:
        if fg.shards > 1:  # ZeRO-1: the updated shards back to every rank, tile by tile when tiled
            calls = 1 if tile <= 0 else -(-fg.shard // max(1, tile // fg.shards))
            tally.add("all_gather", fg.group, 0, calls, total=fg.shard * p)
    return tally
