"""Time of one step: compute (FLOPs at an assumed efficiency of the peak) plus every collective
by an alpha-beta model over the cluster's links, serialized: nothing here assumes communication
hides behind compute. With a pipeline, P2P sends to the neighbouring stages' ranks (over the link
between them) and the schedule's bubble (megatron/plan/pipeline.py) are added. The cluster
presets (and their sources) live here.

Shapes as in megatron/plan/shapes.py."""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from megatron.parallel.topology import Topology
from megatron.plan import pipeline
from megatron.plan.comm import Traffic, comm_per_step, step_parts
from megatron.plan.params import experts_in, sequence_parallel
from megatron.plan.shapes import (
    _layer_kinds,
    context_parallel,
    expert_rows,
    local_tokens,
    micro_shapes,
    num_microbatches,
    own_capacity,
)
from megatron.training.config import Config


# ---- compute -------------------------------------------------------------------------------------
def replicated_attention_flops(m) -> int:
    """Forward FLOPs per token every TP rank computes in full: multi-latent attention's down
    projections (megatron/model/mla.py); none in standard attention."""
    if not getattr(m, "multi_latent_attention", False):
        return 0
    return 2 * m.hidden_size * ((m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_pos_emb_head_dim)


def flops_per_rank(cfg: Config, pp_rank: int = 0) -> float:
    """FLOPs one rank of pipeline rank `pp_rank` computes in one step (its layers, and the output
    layer on the last stage): forward x 3 (backward twice the forward), plus the recomputed
    forward. Experts count the capacity rows each rank computes, padding included. Under context
    parallelism a rank computes its T / CP tokens (their queries against the keys Megatron
    counts, all s of them) and its experts the rows of each rank's own kept tokens."""
    m, topo = cfg.model, cfg.topology
    t = topo.tp
    T = local_tokens(cfg)
    H, s = m.hidden_size, cfg.train.seq_length
    gemm = 6 if m.swiglu else 4  # 2 FLOPs per multiply-add, 2 matrices (3 for SwiGLU)
    # projections (MLA's down projections replicated on the TP ranks), scores + context
    proj, core = m.attention_flops(s)
    replicated = replicated_attention_flops(m)
    attn = T * ((proj - replicated + core) / t + replicated)
    dense = T * gemm * H * m.ffn_hidden_size / t
    fwd = {}
    kinds = _layer_kinds(cfg)
    layers = pipeline.rank_layers(cfg, pp_rank)
    for i in layers:
        kind, layer = kinds[i], attn
        if kind == "moe":
            moe, E = cfg.moe, experts_in(cfg, i)
            _, C = micro_shapes(cfg, E)
            if context_parallel(cfg) > 1:
                C = own_capacity(cfg, E)
            fe = moe.expert_ffn_hidden_size or m.ffn_hidden_size
            # the router on this rank's tokens (its part of the sequence under SP); the experts
            # on their rows, F split over the experts' TP group
            router = 2 * T * H * E / (t if sequence_parallel(cfg) else 1)
            layer += router + expert_rows(cfg, E, C) * gemm * H * fe / topo.etp
            if moe.mlp_type == "residual":
                layer += dense
            shared = getattr(moe, "shared_expert_intermediate_size", None)
            if shared:  # ted_patches/shared_expert.py: a dense MLP of width `shared`
                layer += T * gemm * H * shared / t
        else:
            layer += dense
        fwd[i] = layer
    head = 2 * T * H * m.padded_vocab_size / t if pipeline.holds_last(cfg, pp_rank) else 0
    recomputed = sum(fwd[i] for c in pipeline.checkpoint_chunks(cfg, pp_rank) for i in c)
    if cfg.recompute.granularity == "selective":
        recomputed = len(layers) * T * core / t
    per_micro = 3 * (sum(fwd.values()) + head) + recomputed
    return per_micro * num_microbatches(cfg)


# ---- the cluster and time ------------------------------------------------------------------------
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
        for name in ("gpus", "gpus_per_node", "memory_bytes", "intra_bandwidth", "inter_bandwidth",
                     "peak_flops"):
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
    "summit-v100-16gb": dict(gpus_per_node=6, memory_bytes=16 * GIB, intra_bandwidth=50e9,
                             inter_bandwidth=25e9, peak_flops=125e12),
    "a100-40gb": dict(gpus_per_node=8, memory_bytes=40 * GIB, intra_bandwidth=300e9,
                      inter_bandwidth=200e9, peak_flops=312e12),
    "h100-80gb": dict(gpus_per_node=8, memory_bytes=80 * GIB, intra_bandwidth=450e9,
                      inter_bandwidth=400e9, peak_flops=989e12),
    "h200-141gb": dict(gpus_per_node=8, memory_bytes=141 * 10**9, intra_bandwidth=450e9,
                       inter_bandwidth=400e9, peak_flops=989e12),
}
DEFAULT_ASSUMPTIONS = dict(intra_latency=5e-6, inter_latency=10e-6, efficiency=0.5,
                           reserved_bytes=1 * GIB)


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


_TABLES = {"tp": Topology.tp_groups, "dp": Topology.dp_groups, "ep": Topology.ep_groups,
           "edp": Topology.edp_groups, "etp": Topology.etp_groups,
           "etp_ep": Topology.etp_ep_groups, "world": lambda topo: [list(range(topo.world_size))],
           "pp": Topology.pp_groups, "embedding": Topology.embedding_groups,
           "cp": Topology.cp_groups, "dp_cp": Topology.dp_cp_groups}


def group_links(topo: Topology, cluster: Cluster) -> dict[str, Link]:
    return {name: _link(topo, cluster, name) for name in _TABLES}


class _Links(dict):
    """group_links, each built when first asked for (a step uses a few of the kinds)."""

    def __init__(self, topo: Topology, cluster: Cluster):
        super().__init__()
        self.topo, self.cluster = topo, cluster

    def __missing__(self, name: str) -> Link:
        self[name] = link = _link(self.topo, self.cluster, name)
        return link


@functools.lru_cache(maxsize=8192)  # per layout and group kind of a search; all frozen
def _link(topo: Topology, cluster: Cluster, name: str) -> Link:
    """The link of one group kind, from its rank table: rank r lives on node r // gpus_per_node.
    A group inside one node runs at the intra-node figures. One spanning nodes runs its ring at
    the share of the node's injection left to it (the node carries one ring crossing per group of
    this kind with members on it); its all-to-all sends each off-node peer's share through the
    node's injection, shared by all the node's ranks."""
    groups = _TABLES[name](topo)
    gpn = cluster.gpus_per_node
    nodes_of = [{r // gpn for r in g} for g in groups]
    size = len(groups[0])
    if all(len(n) == 1 for n in nodes_of):
        return Link(size, True, cluster.intra_bandwidth, cluster.intra_latency, size,
                    cluster.intra_bandwidth)
    crossing: Counter = Counter()
    for nodes in nodes_of:
        crossing.update(nodes)
    ring = min(cluster.intra_bandwidth, cluster.inter_bandwidth / max(crossing.values()))
    on_node = min(min(Counter(r // gpn for r in g).values()) for g in groups)
    ranks_per_node = min(gpn, topo.world_size)
    return Link(size, False, ring, cluster.inter_latency, on_node,
                cluster.inter_bandwidth / ranks_per_node)


def p2p_link(cfg: Config, cluster: Cluster, pp_rank: int) -> Link:
    """The link pipeline rank `pp_rank`'s stages send their neighbours over (the PP group's ranks
    sit TP x DP apart in megatron-core's order, so PP usually crosses nodes): the intra-node
    figures when every neighbour of this rank lives on its node; otherwise the node's injection
    shared by those of its ranks that send off the node at the same time (every rank of a node
    sends its stage boundary at once), at most one GPU's intra-node bandwidth."""
    topo, gpn = cfg.topology, cluster.gpus_per_node

    owner = {i: q for q in pipeline.pp_ranks(cfg) for i in pipeline.stage_indices(cfg, q)}
    neighbours = []  # per pipeline rank: the pipeline ranks its stages exchange with
    for q in pipeline.pp_ranks(cfg):
        near = set()
        for st in pipeline.stages_of(cfg, q):
            near |= {owner[st.index - 1]} if st.recv_prev else set()
            near |= {owner[st.index + 1]} if st.send_next else set()
        neighbours.append(near)

    def off_node(rank: int) -> bool:
        c = topo.coords(rank)
        return any(topo.rank(tp=c.tp, dp=c.dp, pp=q, cp=c.cp) // gpn != rank // gpn
                   for q in neighbours[c.pp])

    me = topo.rank(pp=pp_rank)
    if not off_node(me):
        return Link(2, True, cluster.intra_bandwidth, cluster.intra_latency, 2,
                    cluster.intra_bandwidth)
    node = me // gpn
    crossing = sum(off_node(r) for r in range(node * gpn, min((node + 1) * gpn, topo.world_size)))
    bandwidth = min(cluster.intra_bandwidth, cluster.inter_bandwidth / max(1, crossing))
    return Link(2, False, bandwidth, cluster.inter_latency, 1, bandwidth)


def collective_seconds(kind: str, traffic: Traffic, link: Link) -> float:
    """Alpha-beta time of `traffic.calls` collectives sending `traffic.bytes` in all (send-buffer
    bytes): ring all-reduce 2(n-1)/n B, all-gather (n-1) S, reduce-scatter (n-1)/n B, each at the
    ring's bandwidth with 2(n-1) or (n-1) latency steps; all-to-all (n-1)/n B, the off-node part
    through the rank's share of the node's injection, concurrently with the on-node part."""
    n, B = link.size, traffic.bytes
    if n <= 1:
        return 0.0
    if kind == "send":  # P2P: one message at a time over the link to the neighbour
        return traffic.calls * link.latency + B / link.ring_bandwidth
    if kind == "recv":  # the neighbour's send, timed on its side (counted once)
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) * (traffic.calls * link.latency + B / n / link.ring_bandwidth)
    if kind == "all_gather":
        return (n - 1) * (traffic.calls * link.latency + B / link.ring_bandwidth)
    if kind == "reduce_scatter":
        return (n - 1) * (traffic.calls * link.latency + B / n / link.ring_bandwidth)
    if kind == "all_to_all":
        on_node = B * (link.peers_on_node - 1) / n / link.ring_bandwidth
        off_node = (0.0 if link.intra_node
                    else B * (n - link.peers_on_node) / n / link.a2a_inter_bandwidth)
        return (n - 1) * traffic.calls * link.latency + max(on_node, off_node)
    raise ValueError(f"unknown collective kind {kind!r}")


@dataclass(frozen=True)
class StepTime:
    compute: float
    comm: dict[str, float]  # "kind/group" -> seconds
    # pipeline: seconds this rank waits, the schedule's bubble (megatron/plan/pipeline.py) plus
    # the wait for a slower stage
    bubble: float = 0.0
    pp_rank: int = 0  # the pipeline rank timed

    @property
    def total(self) -> float:
        return self.compute + sum(self.comm.values()) + self.bubble


def step_time(cfg: Config, cluster: Cluster, comm: Optional[dict] = None,
              pp_rank: Optional[int] = None) -> StepTime:
    """One step on pipeline rank `pp_rank` (None: the rank that finishes last; without a pipeline
    every rank alike). Serialized: compute, then every collective; `comm` replaces the planned
    collectives (without a pipeline only). With a pipeline the ranks run their micro-batches
    (compute, the collectives inside a stage, the P2P sends) at the pace of the slowest, whose
    busy time B stretches by the bubble f: B f / (1 - f); then each its gradient reduction and
    optimizer step."""
    links = _Links(cfg.topology, cluster)
    speed = cluster.peak_flops * cluster.efficiency
    P = pipeline.pp_size(cfg)
    if P == 1:
        comm = comm if comm is not None else comm_per_step(cfg)
        return StepTime(flops_per_rank(cfg) / speed,
                        {f"{k}/{g}": collective_seconds(k, t, links[g])
                         for (k, g), t in comm.items()})
    m = num_microbatches(cfg)
    ranks = []
    for r in pipeline.pp_ranks(cfg):
        mine = _Links(cfg.topology, cluster)
        mine["pp"] = p2p_link(cfg, cluster, r)
        micro, _ = step_parts(cfg, r)
        busy = flops_per_rank(cfg, r) / speed + m * sum(
            collective_seconds(k, t, mine[g]) for (k, g), t in micro.result().items())
        seconds = {f"{k}/{g}": collective_seconds(k, t, mine[g])
                   for (k, g), t in comm_per_step(cfg, r).items()}
        ranks.append((busy, StepTime(flops_per_rank(cfg, r) / speed, seconds, 0.0, r)))
    slowest = max(busy for busy, _ in ranks)
    f = pipeline.bubble_fraction(cfg, m)
    bubble = slowest * f / (1 - f)
    timed = [dataclasses.replace(t, bubble=slowest - busy + bubble) for busy, t in ranks]
    if pp_rank is not None:
        return timed[pp_rank]
    return max(timed, key=lambda t: (t.total, -t.pp_rank))
