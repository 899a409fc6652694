"""Time of one step: compute (FLOPs at an assumed efficiency of the peak) plus every collective
by an alpha-beta model over the cluster's links, serialized: nothing here assumes communication
hides behind compute. The cluster presets (and their sources) live here.

Shapes as in megatron/plan/shapes.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from megatron.parallel.topology import Topology
from megatron.plan.comm import Traffic, comm_per_step
from megatron.plan.params import experts_in, qkv_size
from megatron.plan.shapes import _layer_kinds, micro_shapes, num_microbatches
from megatron.training.config import Config


# ---- compute -------------------------------------------------------------------------------------
def flops_per_rank(cfg: Config) -> float:
    """FLOPs one rank computes in one step: forward x 3 (backward twice the forward), plus the
    recomputed forward. Experts count the capacity rows each rank computes, padding included."""
    m, topo = cfg.model, cfg.topology
    t = topo.tp
    T, _ = micro_shapes(cfg)
    H, s = m.hidden_size, cfg.train.seq_length
    gemm = 6 if m.swiglu else 4  # 2 FLOPs per multiply-add, 2 matrices (3 for SwiGLU)
    # QKV, projection, scores + context
    attn = T * (2 * H * qkv_size(m) + 2 * H * H + 4 * s * H) / t
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


def group_links(topo: Topology, cluster: Cluster) -> dict[str, Link]:
    """Links of each group kind, from the rank tables: rank r lives on node r // gpus_per_node.
    A group inside one node runs at the intra-node figures. One spanning nodes runs its ring at
    the share of the node's injection left to it (the node carries one ring crossing per group of
    this kind with members on it); its all-to-all sends each off-node peer's share through the
    node's injection, shared by all the node's ranks."""
    tables = {"tp": topo.tp_groups(), "dp": topo.dp_groups(), "ep": topo.ep_groups(),
              "edp": topo.edp_groups(), "world": [list(range(topo.world_size))]}
    gpn = cluster.gpus_per_node
    out = {}
    for name, groups in tables.items():
        nodes_of = [{r // gpn for r in g} for g in groups]
        size = len(groups[0])
        if all(len(n) == 1 for n in nodes_of):
            out[name] = Link(size, True, cluster.intra_bandwidth, cluster.intra_latency, size,
                             cluster.intra_bandwidth)
            continue
        crossing: Counter = Counter()
        for nodes in nodes_of:
            crossing.update(nodes)
        ring = min(cluster.intra_bandwidth, cluster.inter_bandwidth / max(crossing.values()))
        on_node = min(min(Counter(r // gpn for r in g).values()) for g in groups)
        ranks_per_node = min(gpn, topo.world_size)
        out[name] = Link(size, False, ring, cluster.inter_latency, on_node,
                         cluster.inter_bandwidth / ranks_per_node)
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
        off_node = (0.0 if link.intra_node
                    else B * (n - link.peers_on_node) / n / link.a2a_inter_bandwidth)
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
    return StepTime(compute, {f"{k}/{g}": collective_seconds(k, t, links[g])
                              for (k, g), t in comm.items()})
