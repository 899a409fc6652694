"""Parameters and optimizer state of one rank: every parameter the model creates (`param_table`,
named as `model.named_parameters()` names them), packed into the optimizer's flat groups exactly as
megatron/training/optimizer.py packs them (ZeRO-1 padding included), and the bytes of parameters,
gradients and optimizer state that follow."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron.model.config import ModelConfig
from megatron.parallel.topology import Topology
from megatron.plan import pipeline
from megatron.plan.cache import per_config
from megatron.training.config import Config
from ted_patches.config import MoEConfig

_FP32 = 4


# ---- parameters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamEntry:
    """One parameter on one rank: its name in `model.named_parameters()`, its element count here,
    and the three properties the optimizer groups parameters by."""

    name: str
    numel: int
    expert: bool = False
    decay: bool = True
    tp_split: bool = False
    copy: bool = False  # the tied embedding's copy on the last pipeline stage
    # sequence parallelism: replicated over TP but used on this rank's part of the sequence only
    # (norms, row-parallel biases, the router, ...): its gradient is summed over TP first
    partial: bool = False


def param_table(cfg: Config, pp_rank: int = 0) -> list[ParamEntry]:
    """Every parameter pipeline rank `pp_rank` holds (without a pipeline: all), in the model's
    order (megatron/model/gpt.py, transformer.py, ted_patches/moe_layer.py, experts.py,
    router.py)."""
    return list(_param_table(cfg, pp_rank))


# A search plans hundreds of layouts, each asking for its tables several times: each is built
# once per Config (megatron/plan/cache.py).
@per_config
def _param_table(cfg: Config, pp_rank: int) -> tuple[ParamEntry, ...]:
    first, last = pipeline.holds_first(cfg, pp_rank), pipeline.holds_last(cfg, pp_rank)
    return tuple(_table(cfg, pipeline.rank_layers(cfg, pp_rank), first, last,
                        copy=pipeline.embedding_copy(cfg, pp_rank)))


def sequence_parallel(cfg: Config) -> bool:
    """Whether the run splits the sequence over TP (--sequence-parallel at TP > 1)."""
    topo = cfg.topology
    return bool(getattr(topo, "sp", False)) and topo.tp > 1


def _table(cfg: Config, layers, first: bool, last: bool, copy: bool = False) -> list[ParamEntry]:
    m, t, sp = cfg.model, cfg.topology.tp, sequence_parallel(cfg)
    H = m.hidden_size
    V = m.padded_vocab_size  # rows allocated; the padding ones are zero, masked out of the softmax
    tied = not m.untie_embeddings_and_output_weights
    out = []
    if first or (last and tied):  # the last stage's copy of a tied embedding: its own flat group
        out.append(ParamEntry("embedding.weight", V // t * H, tp_split=True, copy=copy))
    if m.position_embedding_type == "learned_absolute" and first:
        out.append(ParamEntry("position_embedding.weight", m.max_position_embeddings * H))
    moe_layers = set(cfg.moe.layers) if cfg.moe is not None else set()
    for i in layers:
        p = f"layers.{i}."
        out += _norm(m, p + "input_norm", partial=sp)
        out += _attention(m, p + "attention", t, sp)
        out += _norm(m, p + "post_attention_norm", partial=sp)
        if i in moe_layers:
            out += _moe(m, cfg.moe, experts_in(cfg, i), cfg.topology, p + "mlp", sp)
        else:
            out += _mlp(m, p + "mlp", t, sp)
    if last:
        out += _norm(m, "final_norm", partial=sp)
        if not tied:
            out.append(ParamEntry("output.weight", V // t * H, tp_split=True))
    return out


def query_groups(m: ModelConfig) -> int:
    """Key/value heads (grouped-query attention); one per head without it."""
    return getattr(m, "num_query_groups", None) or m.num_attention_heads


def qkv_size(m: ModelConfig) -> int:
    """Rows of the full QKV weight: per group, its queries, one key and one value."""
    g = query_groups(m)
    return g * (m.num_attention_heads // g + 2) * m.head_dim


def _attention(m: ModelConfig, name: str, t: int, sp: bool = False) -> list[ParamEntry]:
    """megatron/model/transformer.py's SelfAttention (QKV, per-head q/k norms, projection), or
    megatron/model/mla.py's MLASelfAttention (replicated down projections and latent norms, the
    heads' up projections split over TP, the projection)."""
    H, heads = m.hidden_size, m.num_attention_heads
    if not getattr(m, "multi_latent_attention", False):
        out = _linear(m, name + ".qkv", qkv_size(m) // t * H, qkv_size(m) // t, column=True)
        if getattr(m, "qk_layernorm", False):
            out += _norm(m, name + ".q_norm", m.head_dim) + _norm(m, name + ".k_norm", m.head_dim)
        return out + _linear(m, name + ".proj", H * (heads * m.head_dim // t), H, column=False,
                             partial=sp)
    q_dim = m.qk_head_dim + m.qk_pos_emb_head_dim
    out = []
    if m.q_lora_rank:
        out.append(ParamEntry(name + ".q_down.weight", m.q_lora_rank * H))
        if m.qk_layernorm:
            out += _norm(m, name + ".q_norm", m.q_lora_rank)
    out.append(ParamEntry(name + ".kv_down.weight", (m.kv_lora_rank + m.qk_pos_emb_head_dim) * H))
    if m.qk_layernorm:
        out += _norm(m, name + ".kv_norm", m.kv_lora_rank)
    out.append(ParamEntry(name + ".q_up.weight", heads // t * q_dim * (m.q_lora_rank or H),
                          tp_split=True))
    out.append(ParamEntry(name + ".kv_up.weight",
                          heads // t * (m.qk_head_dim + m.v_head_dim) * m.kv_lora_rank,
                          tp_split=True))
    return out + _linear(m, name + ".proj", H * (heads * m.v_head_dim // t), H, column=False,
                         partial=sp)


def experts_in(cfg: Config, layer: int) -> int:
    """Experts of MoE layer `layer` (a pyramid gives each MoE layer its own count)."""
    moe = cfg.moe
    return moe.experts_in(layer) if hasattr(moe, "experts_in") else moe.num_experts


def _norm(m: ModelConfig, name: str, size: int | None = None, *,
          partial: bool = False) -> list[ParamEntry]:
    size = size or m.hidden_size
    out = [ParamEntry(name + ".weight", size, decay=False, partial=partial)]
    if m.normalization == "LayerNorm":
        out.append(ParamEntry(name + ".bias", size, decay=False, partial=partial))
    return out


def _linear(m: ModelConfig, name: str, weight: int, bias: int, *, column: bool,
            partial: bool = False) -> list[ParamEntry]:
    """A megatron-core TP linear: the weight is split either way; a column-parallel bias is split,
    a row-parallel one (added after the reduction) replicated, and under sequence parallelism
    (`partial`) added to this rank's part of the sequence only."""
    out = [ParamEntry(name + ".weight", weight, tp_split=True)]
    if m.add_bias_linear:
        out.append(ParamEntry(name + ".bias", bias, decay=False, tp_split=column,
                              partial=partial and not column))
    return out


def _mlp(m: ModelConfig, name: str, t: int, sp: bool = False) -> list[ParamEntry]:
    stride = 2 if m.swiglu else 1
    f, H = m.ffn_hidden_size // t, m.hidden_size
    return (_linear(m, name + ".fc1", stride * f * H, stride * f, column=True)
            + _linear(m, name + ".fc2", H * f, H, column=False, partial=sp))


def _moe(m: ModelConfig, moe: MoEConfig, experts: int, topo: Topology, name: str,
         sp: bool = False) -> list[ParamEntry]:
    """The router, the experts (split over the experts' own TP group, ETP), the residual MoE's
    dense MLP and mix, the shared expert; `sp`: sequence parallelism."""
    H, stride = m.hidden_size, 2 if m.swiglu else 1
    e, f = experts // topo.ep, (moe.expert_ffn_hidden_size or m.ffn_hidden_size) // topo.etp
    out = [ParamEntry(name + ".router.weight", experts * H, partial=sp),
           ParamEntry(name + ".experts.w1", e * H * stride * f, expert=True, tp_split=True),
           ParamEntry(name + ".experts.w2", e * f * H, expert=True, tp_split=True)]
    if m.add_bias_linear:
        out += [ParamEntry(name + ".experts.b1", e * stride * f, expert=True, decay=False,
                           tp_split=True),
                ParamEntry(name + ".experts.b2", e * H, expert=True, decay=False)]
    if moe.mlp_type == "residual":
        out += _mlp(m, name + ".dense", topo.tp, sp)
        out += [ParamEntry(name + ".mix.weight", 2 * H, partial=sp),
                ParamEntry(name + ".mix.bias", 2, decay=False, partial=sp)]
    shared = getattr(moe, "shared_expert_intermediate_size", None)
    if shared:  # ted_patches/shared_expert.py: a dense MLP split over TP, and its gate
        out += _mlp(dataclasses.replace(m, ffn_hidden_size=shared), name + ".shared_expert",
                    topo.tp, sp)
        if moe.shared_expert_gate:
            out.append(ParamEntry(name + ".shared_expert.gate.weight", H, partial=sp))
    return out


@per_config
def total_parameters(cfg: Config) -> int:
    """Parameters of the whole model (each counted once over the world: every pipeline stage, no
    copies), padded vocabulary rows included. The same for every layout of one model split over
    the same (TP, EP, ETP), whatever the DP, CP, PP and SP: a search computes it once for them."""
    topo = cfg.topology
    key = (cfg.model, cfg.moe, topo.tp, topo.ep, topo.etp)
    if key not in _TOTALS:
        if len(_TOTALS) >= 1024:
            _TOTALS.clear()
        t, ep, etp = key[2:]
        _TOTALS[key] = sum(
            p.numel * ((etp if p.expert else t) if p.tp_split else 1) * (ep if p.expert else 1)
            for p in _table(cfg, range(cfg.model.num_layers), True, True))
    return _TOTALS[key]


_TOTALS: dict = {}


@dataclass(frozen=True)
class FlatSpec:
    """One of the optimizer's flat buffers on this rank (megatron/training/optimizer.py
    FlatGroup)."""

    expert: bool
    decay: bool
    tp_split: bool
    numel: int  # parameters in it
    # dp_cp | edp: where its gradients are reduced and, with ZeRO-1, its state sharded
    group: str
    shards: int  # ZeRO-1: the group's size; else 1
    copy: bool = False  # the tied embedding's last-stage copy (kept apart, as the optimizer does)
    # sequence parallelism: partial gradients, all-reduced over TP before the group's reduction
    tp_sum: bool = False

    @property
    def padded(self) -> int:
        return -(-self.numel // self.shards) * self.shards

    @property
    def shard(self) -> int:
        return self.padded // self.shards


def flat_groups(cfg: Config, pp_rank: int = 0) -> list[FlatSpec]:
    """The optimizer's flat groups on pipeline rank `pp_rank`, keyed (expert, decay, TP-split,
    pipeline copy, partial over TP) in the order it builds them. Expert groups reduce over the
    expert grid's expert-DP (world / PP / (ETP x EP))."""
    return list(_flat_groups(cfg, pp_rank))


@per_config
def _flat_groups(cfg: Config, pp_rank: int) -> tuple[FlatSpec, ...]:
    keyed: dict[tuple, int] = {}
    for p in _param_table(cfg, pp_rank):
        key = (p.expert, p.decay, p.tp_split, p.copy, p.partial)
        keyed[key] = keyed.get(key, 0) + p.numel
    topo, zero = cfg.topology, cfg.optim.use_distributed_optimizer
    out = []
    for (expert, decay, tp_split, copy, partial), numel in keyed.items():
        # dense: DP x CP (megatron-core's data-parallel group with context parallelism, its own
        # process group also at CP 1: the context-parallel ranks' partial gradients summed)
        group = "edp" if expert else "dp_cp"
        size = topo.edp if expert else topo.dp * getattr(topo, "cp", 1)
        out.append(FlatSpec(expert, decay, tp_split, numel, group, size if zero else 1, copy,
                            tp_sum=partial))
    return tuple(out)


def _bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize


def param_bytes(cfg: Config) -> int:
    return _bytes(cfg.model.params_dtype)


def grad_bytes(cfg: Config) -> int:
    return _FP32 if cfg.optim.accumulate_grads_in_fp32 else param_bytes(cfg)


def optimizer_state_bytes(cfg: Config, pp_rank: int = 0) -> int:
    """Adam moments (fp32) of this rank's shard, plus fp32 master weights unless the parameters are
    fp32 themselves (then they are their own master copy): Optimizer.state_bytes(). The tied
    embedding's last-stage copy has its own (updated alike from the same summed gradient)."""
    per = 2 * _FP32 + (0 if cfg.model.params_dtype == torch.float32 else _FP32)
    return sum(per * fg.shard for fg in flat_groups(cfg, pp_rank))
