"""Communication: every collective one training step issues (`comm_per_step`), calls and bytes
per (kind, group), bytes counted as the send buffer (megatron/parallel/counter.py's convention).
The tests check both against real CPU/gloo training steps, exactly.

Shapes as in megatron/plan/shapes.py. Groups as megatron/parallel/topology.py builds them: tp,
dp, ep (the experts' grid's), edp (the experts' grid's), etp (the experts' TP group: its own
process group even where it holds the TP group's ranks), etp_ep (the experts' TP x EP block: the
padded no-drop capacity's all-reduce), world, pp, embedding, cp (context parallelism's),
dp_cp (DP x CP: the dense gradients' reduction, megatron-core's group of its own also at CP 1).

Sequence parallelism (t = TP, each TP rank holding [b, s/t, h] between blocks): a column-parallel
linear all-gathers the sequence (forward, and again in backward for its weight gradient) and
reduce-scatters its input gradient; a row-parallel one reduce-scatters its output (backward: an
all-gather); those gathers run again in a recompute even with CAC (megatron.parallel.comm's
`unstashed`). The MoE layer gathers the router's logits and, padded, the whole sequence (CAC
keeps both), and its DTD slices' last gather sums the ranks' partial gradients in backward.

Context parallelism (megatron/parallel/context.py): each rank's T / CP tokens between blocks;
per attention layer the keys and values all-gathered over CP (kept by CAC, replayed by a plain or
selective recompute), their gradients reduce-scattered; per MoE layer the router's logits gathered
over CP and each rank's own kept tokens dispatched padding-free; the loss's token count and the
LM loss's share summed over CP; the dense gradients reduced over DP x CP."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from megatron.parallel.topology import Topology
from megatron.plan import pipeline
from megatron.plan.cache import per_config
from megatron.plan.params import (
    _FP32,
    experts_in,
    flat_groups,
    grad_bytes,
    param_bytes,
    query_groups,
    sequence_parallel,
)
from megatron.plan.shapes import (
    _layer_kinds,
    context_parallel,
    local_tokens,
    micro_shapes,
    num_microbatches,
    own_capacity,
    slices,
)
from megatron.training.config import Config

KINDS = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send", "recv")
GROUPS = ("tp", "dp", "ep", "edp", "etp", "etp_ep", "world", "pp", "embedding", "cp", "dp_cp")


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
                      "etp": topo.etp, "etp_ep": topo.etp * topo.ep,
                      "world": topo.world_size, "pp": topo.pp,
                      "embedding": 2 if topo.pp > 1 else 1, "cp": topo.cp,
                      "dp_cp": topo.dp * topo.cp}
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


@per_config
def step_parts(cfg: Config, pp_rank: int = 0) -> tuple["_Tally", "_Tally"]:
    """(one micro-batch's collectives, the rest of the step's): the part a pipeline schedule
    runs per micro-batch and the part after it (cached per frozen Config: callers only read
    them)."""
    rest = _optimizer_comm(cfg, pp_rank)
    rest.add("all_reduce", "cp", 8)  # reduce_losses: the LM loss's shares summed over CP
    rest.add("all_reduce", "dp", 2 * 8)  # reduce_losses: [lm, aux] in float64
    rest.add("all_reduce", "pp", 2 * 8)  # reduce_over_stages: the same, over the pipeline
    return _microbatch_comm(cfg, pp_rank), rest


def per_microbatch(cfg: Config, pp_rank: int = 0) -> dict[tuple[str, str], Traffic]:
    """One micro-batch's collectives and P2P transfers on pipeline rank `pp_rank`."""
    return step_parts(cfg, pp_rank)[0].result()


def _microbatch_comm(cfg: Config, pp_rank: int) -> _Tally:
    m, t = cfg.model, cfg.topology.tp
    T = local_tokens(cfg)  # this rank's tokens: under context parallelism its chunks, T / CP
    act = T * m.hidden_size * param_bytes(cfg)  # one [T, H] activation
    sp = sequence_parallel(cfg)
    part = act // t if sp else act  # the hidden state between blocks: [b, s/t, h] under SP
    tally = _Tally(cfg.topology)
    # megatron-core: the vocab-parallel embedding's reduction (forward; under SP then this rank's
    # part: backward, an all-gather); the output layer's input gradient (backward; under SP our
    # gathering linear); the cross-entropy's max, target logit and sum-exp over TP, in fp32.
    if pipeline.holds_first(cfg, pp_rank):
        tally.add("all_reduce", "tp", act)
        if sp:
            tally.add("all_gather", "tp", part)
    if pipeline.holds_last(cfg, pp_rank):
        head = _LayerComm(_Tally(cfg.topology), _Tally(cfg.topology), _Tally(cfg.topology))
        _column(head, sp, act, part)
        tally.merge(head.forward)
        tally.merge(head.backward)
        tally.add("all_reduce", "tp", T * _FP32, 3)
        tally.add("all_reduce", "cp", _FP32)  # lm_loss: the whole sequence's token count
    # between stages on other ranks: forward the hidden state and the position ids (int64), back
    # the hidden state's gradient
    for st in pipeline.stages_of(cfg, pp_rank):
        if st.recv_prev:
            tally.add("recv", "pp", part)
            tally.add("recv", "pp", T * 8)
            tally.add("send", "pp", part)
        if st.send_next:
            tally.add("send", "pp", part)
            tally.add("send", "pp", T * 8)
            tally.add("recv", "pp", part)
    chunks = pipeline.checkpoint_chunks(cfg, pp_rank)
    recomputed = {i for c in chunks for i in c}
    cac = cfg.recompute.cac and cfg.moe is not None and any(i in cfg.moe.layers for i in recomputed)
    kinds = _layer_kinds(cfg)
    alike: dict = {}  # layers of one kind (and expert count) issue the same collectives
    for i in pipeline.rank_layers(cfg, pp_rank):
        key = (kinds[i], experts_in(cfg, i) if kinds[i] == "moe" else 0)
        if key not in alike:
            alike[key] = _layer_comm(cfg, i, kinds[i], act, part)
        layer = alike[key]
        for piece in (layer.forward, layer.ours, layer.backward):
            tally.merge(piece)
        if i in recomputed:
            # The recompute replays the whole region's forward (megatron/model/recompute.py
            # starts it with the region's last operation, so it runs to the end): megatron-core's
            # collectives and the sequence-parallel gathers always, ours unless CAC serves them
            # from the stash.
            tally.merge(layer.forward)
            if not cac:
                tally.merge(layer.ours)
    return tally


@dataclass
class _LayerComm:
    """One layer's collectives: `forward` (megatron-core's, and the sequence-parallel linears'
    gathers and reduce-scatters: what every recompute issues again), `ours` (the other forward
    ones through megatron.parallel.comm: what a CAC stash serves) and `backward`."""

    forward: _Tally
    ours: _Tally
    backward: _Tally


def _column(layer: _LayerComm, sp: bool, act: int, part: int, grad: Optional[int] = None) -> None:
    """A column-parallel linear on [T, H]: its input gradient all-reduced in backward (`grad`
    bytes, default [T, H]); under SP (transformer.py's _GatherLinear) the sequence all-gathered
    forward and again backward, the input gradient reduce-scattered."""
    if not sp:
        layer.backward.add("all_reduce", "tp", act if grad is None else grad)
        return
    layer.forward.add("all_gather", "tp", part)
    layer.backward.add("all_gather", "tp", part)
    layer.backward.add("reduce_scatter", "tp", act)


def _row(layer: _LayerComm, sp: bool, act: int, part: int) -> None:
    """A row-parallel linear's [T, H] output: all-reduced, or under SP reduce-scattered
    (backward: an all-gather)."""
    if not sp:
        layer.forward.add("all_reduce", "tp", act)
        return
    layer.forward.add("reduce_scatter", "tp", act)
    layer.backward.add("all_gather", "tp", part)


def _mlp(layer: _LayerComm, sp: bool, act: int, part: int) -> None:
    _column(layer, sp, act, part)
    _row(layer, sp, act, part)


def _layer_comm(cfg: Config, index: int, kind: str, act: int, part: int) -> _LayerComm:
    topo, m = cfg.topology, cfg.model
    sp = sequence_parallel(cfg)
    layer = _LayerComm(_Tally(topo), _Tally(topo), _Tally(topo))
    if m.multi_latent_attention:
        # MLA: under SP the whole sequence gathered for the replicated down projections (kept
        # by CAC); the latents into the heads' region (copy_to_split: backward all-reduce)
        z = (m.q_lora_rank or m.hidden_size) + m.kv_lora_rank + m.qk_pos_emb_head_dim
        if sp:
            layer.ours.add("all_gather", "tp", part)
        layer.backward.add("all_reduce", "tp", act // m.hidden_size * z)
    else:  # QKV column-parallel
        _column(layer, sp, act, part)
    _context_attention(cfg, layer, act)
    if m.qk_layernorm and not m.multi_latent_attention:
        # per-head q/k norms: each weight's (and bias') partial gradient summed over TP
        norms = 4 if m.normalization == "LayerNorm" else 2
        layer.backward.add("all_reduce", "tp", m.head_dim * param_bytes(cfg), norms)
    _row(layer, sp, act, part)  # the projection
    if kind == "dense":
        _mlp(layer, sp, act, part)
        return layer
    moe = cfg.moe
    if moe.mlp_type == "residual":  # the dense MLP beside the experts
        _mlp(layer, sp, act, part)
    if getattr(moe, "shared_expert_intermediate_size", None):  # a dense MLP beside them too
        _mlp(layer, sp, act, part)
    if context_parallel(cfg) > 1:
        _moe_comm_own(cfg, experts_in(cfg, index), layer.ours, layer.backward)
    else:
        _moe_comm(cfg, experts_in(cfg, index), layer.ours, layer.backward)
    return layer


def _context_attention(cfg: Config, layer: _LayerComm, act: int) -> None:
    """Context parallelism (megatron/parallel/context.py): the keys and values all-gathered over
    CP (this rank's [b, groups / TP, s / CP, d] each; CAC keeps them, a plain recompute gathers
    again; selective recompute checkpoints the attention core alone, without a stash, so its
    recompute gathers them again whatever CAC says); backward: their gradients reduce-scattered."""
    m, cp = cfg.model, context_parallel(cfg)
    if cp == 1:
        return
    tokens, t = act // m.hidden_size, cfg.topology.tp  # act's bytes per hidden unit: T e
    if m.multi_latent_attention:
        widths = (m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim)
        heads = m.num_attention_heads // t
    else:
        widths = (m.head_dim, m.head_dim)
        heads = query_groups(m) // t
    for w in widths:
        nbytes = tokens * heads * w
        layer.ours.add("all_gather", "cp", nbytes)
        layer.backward.add("reduce_scatter", "cp", cp * nbytes)
        if cfg.recompute.granularity == "selective":  # the core's recompute, in backward
            layer.backward.add("all_gather", "cp", nbytes)


def _moe_comm(cfg: Config, experts: int, fwd: _Tally, bwd: _Tally) -> None:
    """ted_patches/router.py's and dispatcher.py's collectives, padded (docs/architecture.md,
    "One MoE layer"), with the experts' own grid: DTD or SP slices over TP (S of them), the
    all-to-all over the experts' EP group, the gather / reduce-scatter around the experts over
    their TP group (ETP), or, without slices, every TP rank's identical buffer (`replicated`)."""
    topo, moe, e = cfg.topology, cfg.moe, param_bytes(cfg)
    t, et, sp = topo.tp, topo.etp, sequence_parallel(cfg)
    T, C = micro_shapes(cfg, experts)
    H = cfg.model.hidden_size
    S = t if (moe.dtd or sp) and t > 1 else 1
    replicated = S == 1 and t > 1
    piece = experts * C * H * e // S  # [E, C/S, H]: one slice of the capacity buffer
    if sp:  # the router's logits [T, E] and, padded, the layer's input, the whole sequence
        fwd.add("all_gather", "tp", T // t * experts * _ROUTER_BYTES[moe.router_dtype])
        fwd.add("all_gather", "tp", T // t * H * e)
    if not moe.drop_tokens:  # the router: all-reduce MAX of the largest count (int64)
        fwd.add("all_reduce", "etp_ep", 8)
    if S > 1:  # the DTD drop: keep my slice (backward: all-gather)
        bwd.add("all_gather", "tp", piece)
    fwd.add("all_to_all", "ep", piece, 2)  # there and back
    bwd.add("all_to_all", "ep", piece, 2)
    if replicated:  # copy_to_split (backward: all-reduce), reduce_from_split (forward)
        bwd.add("all_reduce", "etp", piece)
        fwd.add("all_reduce", "etp", piece)
    else:  # gather_to_split (backward: reduce-scatter), reduce_scatter (backward: all-gather)
        fwd.add("all_gather", "etp", piece)
        bwd.add("reduce_scatter", "etp", et * piece)
        fwd.add("reduce_scatter", "etp", et * piece)
        bwd.add("all_gather", "etp", piece)
    if S > 1:  # every TP rank's slice back: SP sums the ranks' partial gradients (reduce-scatter)
        fwd.add("all_gather", "tp", piece)
        if sp:
            bwd.add("reduce_scatter", "tp", S * piece)
    # the fc2 bias gradient (Dispatcher.fc2_bias: copy_to_split over the experts' TP group)
    if cfg.model.add_bias_linear:
        bwd.add("all_reduce", "etp", experts // topo.ep * H * e)


def _moe_comm_own(cfg: Config, experts: int, fwd: _Tally, bwd: _Tally) -> None:
    """Context parallelism: the router's logits gathered over CP (under SP first over TP), so the
    routing is the whole sequence's; each rank then sends its own kept tokens padding-free
    (ted_patches/moe_layer.py; dispatcher.py's dispatch_packed, with the packed layout
    accelerators run), `shapes.own_capacity` rows per expert: the padded dispatch's collectives
    with that in place of C, after a count exchange over the experts' TP x EP block; under SP
    each TP rank's own tokens go whole (no DTD slices to drop or gather)."""
    topo, moe, e = cfg.topology, cfg.moe, param_bytes(cfg)
    t, et, sp, cp = topo.tp, topo.etp, sequence_parallel(cfg), context_parallel(cfg)
    T, _ = micro_shapes(cfg, experts)
    H = cfg.model.hidden_size
    S = slices(cfg)  # each sender's rows are 1 / S of its CP rank's kept ones
    cut = S > 1 and not sp  # DTD slices of the TP ranks' shared tokens
    replicated = S == 1 and t > 1
    piece = experts * (own_capacity(cfg, experts) // S) * H * e  # one sender's rows
    rb = _ROUTER_BYTES[moe.router_dtype]
    if sp:
        fwd.add("all_gather", "tp", T // (cp * t) * experts * rb)
    fwd.add("all_gather", "cp", T // cp * experts * rb)
    fwd.add("all_gather", "etp_ep", experts * 8)  # the kept counts (int64)
    if cut:  # the DTD drop: keep my slice (backward: all-gather)
        bwd.add("all_gather", "tp", piece)
    fwd.add("all_to_all", "ep", piece, 2)
    bwd.add("all_to_all", "ep", piece, 2)
    if replicated:
        bwd.add("all_reduce", "etp", piece)
        fwd.add("all_reduce", "etp", piece)
    else:
        fwd.add("all_gather", "etp", piece)
        bwd.add("reduce_scatter", "etp", et * piece)
        fwd.add("reduce_scatter", "etp", et * piece)
        bwd.add("all_gather", "etp", piece)
    if cut:  # every TP rank's slice back (backward: this rank's own)
        fwd.add("all_gather", "tp", piece)
    if cfg.model.add_bias_linear:
        bwd.add("all_reduce", "etp", experts // topo.ep * H * e)


_ROUTER_BYTES = {"fp32": 4, "fp64": 8}


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
        if fg.tp_sum:  # sequence parallelism: the partial gradients summed over TP first
            tally.add("all_reduce", "tp", fg.padded * g)
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
