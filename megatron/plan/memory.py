"""Memory on one GPU: parameters, gradients and optimizer state (megatron/plan/params.py), plus
the activations and the optimizer step's temporaries: what autograd keeps for backward in this
code (attention as a flash kernel, no s x s matrix), plus the largest transient of the forward,
the backward and the optimizer step; bench/planner_memory.py measures how close that comes on CPU.

Sequence parallelism: between blocks each TP rank holds its part of the sequence, `P` = T / TP
tokens (`_held`): the norms' inputs and statistics, the dropout masks, the residual stream, the
TP linears' saved inputs (a gathering linear keeps only its part and gathers again in backward),
the last layer's output, a checkpointed chunk's input and the pipeline's hand-offs cost 1/TP;
attention, the MLPs' hidden activations, the router's scores and the MoE dispatch stay whole-
sequence. The gathers and reduce-scatters add whole-sequence transients (the gathered input, the
row-parallel output and its copy by rank). The experts compute `shapes.expert_rows` rows with
F split over their own TP group (ETP).

Context parallelism: every per-token tensor is of the rank's T / CP tokens; attention keeps the
keys and values gathered over CP (the whole sequence's) and its two chunks' output copy; the
router's scores are the whole sequence's; the experts compute each rank's own kept rows
(`shapes.own_capacity`).

Shapes as in megatron/plan/shapes.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.plan.params import (
    _FP32,
    sequence_parallel,
    experts_in,
    flat_groups,
    grad_bytes,
    optimizer_state_bytes,
    param_bytes,
    qkv_size,
    query_groups,
)
from megatron.plan import pipeline
from megatron.plan.cache import per_config
from megatron.plan.shapes import (
    _layer_kinds,
    context_parallel,
    expert_rows,
    local_tokens,
    micro_shapes,
    num_microbatches,
    own_capacity,
    slices,
)
from megatron.training.config import Config
from megatron.training.optimizer import _SCAN_CHUNK


# ---- memory --------------------------------------------------------------------------------------
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
    # the runtime's own (CUDA context, communicator buffers): the cluster's figure
    reserved: int = 0
    pp_rank: int = 0  # the pipeline rank these bytes are of

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + max(self.activations, self.step_peak)
                + self.reserved)

    def as_dict(self) -> dict[str, int]:
        return dict(params=self.params, grads=self.grads, optimizer=self.optimizer,
                    activations=self.activations, step_peak=self.step_peak,
                    reserved=self.reserved, total=self.total)


def memory_per_gpu(cfg: Config, reserved: int = 0, pp_rank: Optional[int] = None) -> Memory:
    """Pipeline rank `pp_rank`'s memory; None: the rank that needs the most (without a pipeline
    every rank alike)."""
    if pp_rank is None:
        return max((memory_per_gpu(cfg, reserved, r) for r in pipeline.pp_ranks(cfg)),
                   key=lambda mem: mem.total)
    p, g = param_bytes(cfg), grad_bytes(cfg)
    fgs = flat_groups(cfg, pp_rank)
    return Memory(params=sum(fg.padded for fg in fgs) * p, grads=sum(fg.padded for fg in fgs) * g,
                  optimizer=optimizer_state_bytes(cfg, pp_rank),
                  activations=activation_peak(cfg, pp_rank), step_peak=step_peak(cfg, pp_rank),
                  reserved=reserved, pp_rank=pp_rank)


def stage_memory(cfg: Config, reserved: int = 0) -> list[Memory]:
    """Every pipeline rank's memory, by rank."""
    return [memory_per_gpu(cfg, reserved, r) for r in pipeline.pp_ranks(cfg)]


def step_peak(cfg: Config, pp_rank: int = 0) -> int:
    """Optimizer._update and FlatGroup.gather_params, one flat group at a time: a tile's (or the
    whole shard's) fp32 upcast of half-precision gradients, Adam's two fp32 temporaries
    (v.sqrt(), then / bias correction), and ZeRO-1's gathered buffer (untiled: a copy of the shard).
    The reduce-scatter's output shard (before the step) and the norm's chunked scans are bounded
    by the same figures."""
    tile, p = cfg.optim.tile_size, param_bytes(cfg)
    upcast = 0 if grad_bytes(cfg) == _FP32 else _FP32
    scan = 0 if grad_bytes(cfg) == _FP32 else _SCAN_CHUNK * _FP32
    worst = scan
    for fg in flat_groups(cfg, pp_rank):
        n = fg.shard if tile <= 0 else min(tile, fg.shard)
        worst = max(worst, n * (upcast + 2 * _FP32))
        if fg.shards > 1:
            gathered = (fg.shard * p if tile <= 0
                        else min(fg.padded, max(1, tile // fg.shards) * fg.shards) * p)
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


def _held(cfg: Config, T: int) -> int:
    """Tokens of the hidden state this rank holds between blocks: T, or its part of the
    sequence T / TP under sequence parallelism."""
    return T // cfg.topology.tp if sequence_parallel(cfg) else T


def _attention_block(cfg: Config, T: int) -> _Block:
    """Input norm, QKV, attention core, projection, residual, post-attention norm's input."""
    m, t, e = cfg.model, cfg.topology.tp, _act(cfg)
    if getattr(m, "multi_latent_attention", False):
        return _mla_block(cfg, T)
    H, heads = m.hidden_size, m.num_attention_heads // t
    hs = heads * m.head_dim  # this rank's attention output width (H / t without --kv-channels)
    kv = query_groups(m) * m.head_dim // t  # one of k, v per token
    qkv = qkv_size(m) // t
    P, sp = _held(cfg, T), sequence_parallel(cfg)
    stats = (2 if m.normalization == "LayerNorm" else 1) * P * _FP32
    saved = P * H * e + stats  # the layer input, kept by the input norm
    saved += P * H * e  # the norm's output, kept by QKV (under SP its part, gathered again)
    # QKV's output, kept by the attention kernel through its q, k, v views (with grouped queries
    # q is gathered out of the groups: a copy)
    saved += T * qkv * e + (T * hs * e if m.num_attention_heads > query_groups(m) else 0)
    if m.position_embedding_type == "rope":  # rotated copies (and fp32 upcasts in half precision)
        saved += T * (hs + kv) * (2 * _FP32 if e == _FP32 else 2 * _FP32 + e)
    core = T * hs * e + T * heads * _FP32  # attention output and log-sum-exp
    if cfg.recompute.granularity != "selective":
        saved += core + _context_kept(cfg, T, (kv, kv), hs)
    # the projection keeps the kernel's output folded back to [T, H/t]: a view, as flash kernels
    # lay their output out [b, s, heads, d]
    if m.hidden_dropout > 0:
        saved += P * H  # the dropout mask (bool)
    saved += P * H * e + stats  # the residual stream after attention, kept by the second norm
    # backward: the kernel's q, k, v gradients and their [T, QKV/t] concatenation, and QKV's
    # weight gradient before it is added into the flat buffer
    bwd = 2 * T * qkv * e + qkv * H * e + _context_grads(cfg, T, (kv, kv))
    fwd = T * qkv * e + _context_grads(cfg, T, (kv, kv))
    if sp:  # the projection's output beside its copy by rank for the reduce-scatter; QKV's
        # backward: the gathered input, the input gradient, its copy by rank and the
        # reduce-scatter's output
        fwd = max(fwd, 2 * T * H * e)
        bwd = max(bwd, T * qkv * e + (3 * T + P) * H * e + qkv * H * e)
    return _Block(saved, fwd_transient=fwd, bwd_transient=bwd)


def _mla_block(cfg: Config, T: int) -> _Block:
    """megatron/model/mla.py's tensors kept for backward (an estimate of the same kind as the
    standard block's): the input and its norm, the latents and their norms, the latents'
    concatenation entering the heads' region, the up projections' outputs, rotated copies,
    the kernel's query and key, its output and log-sum-exp, the residual."""
    m, t, e = cfg.model, cfg.topology.tp, _act(cfg)
    H, heads = m.hidden_size, m.num_attention_heads // t
    q_dim, pe = m.qk_head_dim + m.qk_pos_emb_head_dim, m.qk_pos_emb_head_dim
    latents = (m.q_lora_rank or 0) + m.kv_lora_rank + pe
    z = (m.q_lora_rank or H) + m.kv_lora_rank + pe
    P = _held(cfg, T)
    stats = (2 if m.normalization == "LayerNorm" else 1) * P * _FP32
    saved = 2 * (P * H * e + stats)  # the layer input and the residual after attention
    # norm output (under SP gathered: the whole sequence, kept by the down projections),
    # latents, their concatenation
    saved += T * H * e + T * latents * e + T * z * e
    up = heads * (q_dim + m.qk_head_dim + m.v_head_dim)  # q and kv up projections' outputs
    saved += T * up * e + T * (heads + 1) * pe * 2 * _FP32  # rotated q and k rope dims (fp32)
    core = 2 * T * heads * q_dim * e + T * heads * m.v_head_dim * e + T * heads * _FP32
    if cfg.recompute.granularity != "selective":
        widths = (heads * q_dim, heads * m.v_head_dim)
        saved += core + _context_kept(cfg, T, widths, heads * m.v_head_dim)
    if m.hidden_dropout > 0:
        saved += P * H
    weights = (H * latents + (m.q_lora_rank or H) * heads * q_dim
               + m.kv_lora_rank * heads * (m.qk_head_dim + m.v_head_dim))
    widths = (heads * q_dim, heads * m.v_head_dim)
    return _Block(saved, fwd_transient=T * up * e + _context_grads(cfg, T, widths),
                  bwd_transient=2 * T * up * e + weights * e + _context_grads(cfg, T, widths))


def _context_kept(cfg: Config, T: int, widths: tuple[int, int], out: int) -> int:
    """Context parallelism (megatron/parallel/context.py), what attention keeps beyond one
    process's at T local tokens: the keys and values gathered over CP, the whole sequence's
    ([b, heads, s, width] each, `widths` per token: the two query chunks' kernels keep views of
    them), and the two chunks' outputs concatenated, a copy the projection keeps (`out` per
    token). The kernel materializes no scores (the flash kernel on CPUs and the memory-efficient
    one on GPUs take the chunk's mask)."""
    cp = context_parallel(cfg)
    if cp == 1:
        return 0
    return (cp * T * sum(widths) + T * out) * _act(cfg)


def _context_grads(cfg: Config, T: int, widths: tuple[int, int]) -> int:
    """Context parallelism: the largest moment of the gathers, forward (the parts beside their
    reordered concatenation) or backward (the gathered keys' and values' gradients beside their
    copy by rank for the reduce-scatter): twice the whole sequence's keys and values."""
    cp = context_parallel(cfg)
    return 0 if cp == 1 else 2 * cp * T * sum(widths) * _act(cfg)


def _mlp_saved(rows: int, f: int, swiglu: bool, e: int) -> int:
    """fc1's output (kept by the activation), its activation output (kept by fc2); SwiGLU keeps
    [gate | up] and silu(gate) too."""
    return rows * f * e * (4 if swiglu else 2)


def _mlp_transient(rows: int, f: int, H: int, swiglu: bool, e: int, weights: int = 1,
                   gather: bool = False) -> int:
    """The MLP backward's worst moment above its saved tensors (`weights` matrices per linear:
    the local experts), step by step as autograd frees what each step consumed: fc2 (the output
    gradient, the activation's gradient, fc2's weight gradient before the flat buffer takes it),
    the activation (its input's gradient; its output is freed), fc1 (the input's gradient and
    fc1's weight gradient; the activation's input and output are freed; `gather`: under sequence
    parallelism also the gathered input and the input gradient's copy by rank)."""
    stride = 2 if swiglu else 1
    fc2 = rows * (H + f) + weights * f * H
    act = rows * stride * f
    fc1 = rows * H + weights * stride * f * H - rows * f + (2 * rows * H if gather else 0)
    return max(fc2, act, fc1) * e


def _packed_transient(rows: int, f: int, H: int, swiglu: bool, e: int, weights: int) -> int:
    """The packed experts' backward (ted_patches/experts.py's _PackedMLP, the padding-free path
    on CPUs): both weight gradients of every local expert allocated at once, beside the output
    gradient, the activation's and fc1's output gradients, x^T's copy and the input gradient.
    GPUs' grouped GEMMs free as autograd goes (`_mlp_transient`): at most this there."""
    stride = 2 if swiglu else 1
    return (rows * (3 * H + f + stride * f) + weights * (stride + 1) * f * H) * e


def _dense_mlp_block(cfg: Config, T: int) -> _Block:
    m, t, e = cfg.model, cfg.topology.tp, _act(cfg)
    f, H = m.ffn_hidden_size // t, m.hidden_size
    P, sp = _held(cfg, T), sequence_parallel(cfg)
    saved = P * H * e + _mlp_saved(T, f, m.swiglu, e)  # fc1 keeps its input (SP: its part)
    if m.hidden_dropout > 0:
        saved += P * H
    # fc2's output (SP: and its copy by rank for the reduce-scatter)
    return _Block(saved, fwd_transient=(2 if sp else 1) * T * H * e,
                  bwd_transient=_mlp_transient(T, f, H, m.swiglu, e, gather=sp))


def _moe_block(cfg: Config, T: int, layer: int) -> _Block:
    m, moe, topo, e = cfg.model, cfg.moe, cfg.topology, _act(cfg)
    H, E = m.hidden_size, experts_in(cfg, layer)
    whole, C = micro_shapes(cfg, E)  # the router decides over the whole sequence (CP too)
    cp = context_parallel(cfg)
    if cp > 1:  # each rank's own kept tokens, padding-free
        C = own_capacity(cfg, E)
    rows = expert_rows(cfg, E, C)
    fe = (moe.expert_ffn_hidden_size or m.ffn_hidden_size) // topo.etp
    P, sp = _held(cfg, T), sequence_parallel(cfg)
    # router: its fp32 input (the norm's output itself in fp32, a copy in half precision; under
    # SP its part), the probabilities [T, E] in fp32 (under SP from the gathered logits), and
    # the logits too when the z-loss is on
    saved = P * H * _FP32 + (1 + (moe.z_loss_coeff != 0)) * whole * E * _FP32
    # the experts' input rows, fc1 and act
    saved += rows * H * e + _mlp_saved(rows, fe, m.swiglu, e)
    # combine: the row each assignment read, its gate weight
    saved += moe.topk * T * (H * e + _FP32)
    if moe.mlp_type == "residual":
        saved += _dense_mlp_block(cfg, T).saved - (P * H * e if e == _FP32 else 0)
        saved += 2 * P * H * e  # the two mixed outputs, kept by the mixing products
    if m.hidden_dropout > 0:
        saved += P * H
    local = E // topo.ep
    # forward: the capacity buffer [E, C, H] and the gathered rows alongside the experts' input
    # (under SP padded, also the whole sequence gathered for the dispatch); the fc2 output and
    # its contiguous copy for the reduce-scatter. Backward: the experts' MLP.
    fwd = E * C * H * e + rows * H * e + (T * H * e if sp and cp == 1 else 0)
    bwd = _mlp_transient(rows, fe, H, m.swiglu, e, weights=local)
    if cp > 1:  # padding-free: the packed experts' backward
        bwd = max(bwd, _packed_transient(rows, fe, H, m.swiglu, e, local))
    shared = getattr(moe, "shared_expert_intermediate_size", None)
    if shared:  # ted_patches/shared_expert.py: a dense MLP on all T tokens beside the experts
        fs = shared // topo.tp
        # fc1 keeps the layer input (the router's own in fp32, one more copy in half precision),
        # fc1's output and the activation's; gated: the MLP output and the sigmoid, kept by
        # their product (under SP: this rank's part)
        saved += (P * H * e if e != _FP32 else 0) + _mlp_saved(T, fs, m.swiglu, e)
        saved += (P * H * e + P * e) if moe.shared_expert_gate else 0
        bwd = max(bwd, _mlp_transient(T, fs, H, m.swiglu, e, gather=sp))
    return _Block(saved, fwd_transient=fwd, bwd_transient=bwd)


def cac_stash_bytes(cfg: Config, layer: int) -> int:
    """What CAC keeps of MoE layer `layer` from the forward to the recompute: the outputs of its
    forward collectives (comm.CommStash): the two all-to-alls', the experts' TP gather and
    reduce-scatter (or, every TP rank sending alike, the all-reduce), the TP gather of every
    rank's slice; under SP the gathered logits and the gathered sequence."""
    m, moe, topo, e = cfg.model, cfg.moe, cfg.topology, _act(cfg)
    E = experts_in(cfg, layer)
    T, C = micro_shapes(cfg, E)
    S, et = slices(cfg), topo.etp
    if context_parallel(cfg) > 1:
        return _own_stash_bytes(cfg, E)
    piece = E * C * m.hidden_size * e // S  # one slice of the capacity buffer
    out = 2 * piece
    if S == 1 and topo.tp > 1:  # reduce_from_split's all-reduced output
        out += piece
    elif et > 1:
        out += et * piece + piece
    if S > 1:
        out += S * piece
    if sequence_parallel(cfg):
        out += T * E * (8 if moe.router_dtype == "fp64" else _FP32) + T * m.hidden_size * e
    return out


def _own_stash_bytes(cfg: Config, E: int) -> int:
    """cac_stash_bytes under context parallelism: the padding-free dispatch of each rank's own
    tokens (the DTD slices' gather only where the TP ranks share their tokens), the logits
    gathered over CP (and TP under SP), the kept counts."""
    moe, topo, e = cfg.moe, cfg.topology, _act(cfg)
    T, _ = micro_shapes(cfg, E)
    S, et, sp = slices(cfg), topo.etp, sequence_parallel(cfg)
    piece = E * (own_capacity(cfg, E) // S) * cfg.model.hidden_size * e
    out = 2 * piece + E * 8 * topo.etp * topo.ep
    if S == 1 and topo.tp > 1:
        out += piece
    elif et > 1:
        out += et * piece + piece
    if S > 1 and not sp:
        out += S * piece
    logits = 8 if moe.router_dtype == "fp64" else _FP32
    return out + T * E * logits + (T // context_parallel(cfg) * E * logits if sp else 0)


def _layer_stash(cfg: Config, layer: int, kind: str, T: int) -> int:
    """What CAC keeps of one layer: an MoE layer's (cac_stash_bytes) and, under SP, multi-latent
    attention's gathered sequence (the one sequence gather a CAC stash keeps)."""
    out = cac_stash_bytes(cfg, layer) if kind == "moe" else 0
    if getattr(cfg.model, "multi_latent_attention", False) and sequence_parallel(cfg):
        out += T * cfg.model.hidden_size * _act(cfg)
    cp, m = context_parallel(cfg), cfg.model
    if cp > 1:  # the keys and values gathered over CP
        t = cfg.topology.tp
        if getattr(m, "multi_latent_attention", False):
            width = m.num_attention_heads // t * (m.qk_head_dim + m.qk_pos_emb_head_dim
                                                  + m.v_head_dim)
        else:
            width = 2 * query_groups(m) * m.head_dim // t
        out += cp * T * width * _act(cfg)
    return out


def _head_block(cfg: Config, T: int) -> tuple[int, int, int]:
    """(saved, loss transient, backward transient) of the final norm, output layer and loss."""
    m, t, e = cfg.model, cfg.topology.tp, _act(cfg)
    H, V = m.hidden_size, m.padded_vocab_size // t
    P = _held(cfg, T)
    # the last layer's output and the final norm's (and its stats); under SP their parts
    saved = 2 * P * H * e + 2 * P * _FP32
    saved += T * V * _FP32  # the fp32 softmax the cross-entropy keeps
    # the logits beside their copy: the padding-masked clone (on the rank holding padded rows:
    # the worst rank is the one that counts) or, in half precision, the fp32 upcast
    copies = (m.padded_vocab_size > m.vocab_size) + (e != _FP32)
    loss = T * V * e * copies
    weight_grad = V * H * e
    # the input gradient (under SP: beside the gathered input and the gradient's copy by rank,
    # and the reduce-scatter's output, this rank's part)
    grad_in = (3 * T + P) * H * e if sequence_parallel(cfg) else T * H * e
    bwd = (grad_in + (T * V * e if e != _FP32 else 0)
           + (weight_grad if m.untie_embeddings_and_output_weights else 0))
    return saved, loss, bwd


def _embedding_saved(T: int) -> int:
    return 3 * T * 8  # token ids (int64) kept by the two lookups, and the vocab-range mask


def activation_peak(cfg: Config, pp_rank: int = 0) -> int:
    """The highest point of the step's forwards and backwards above the static memory on pipeline
    rank `pp_rank`: one micro-batch's peak over the rank's layers, plus the activations the other
    micro-batches its schedule keeps in flight hold (megatron/plan/pipeline.py's table; with
    several chunks per rank, counted in its largest chunk's)."""
    k = pipeline.in_flight(cfg, pp_rank, num_microbatches(cfg))
    stages = pipeline.stages_of(cfg, pp_rank)
    if len(stages) == 1:
        return (k - 1) * _kept(cfg, pp_rank) + max(activation_candidates(cfg, pp_rank).values())
    kept = max(_kept(cfg, pp_rank, st) for st in stages)
    return (k - 1) * kept + max(max(_candidates(cfg, pp_rank, st).values()) for st in stages)


def activation_candidates(cfg: Config, pp_rank: int = 0) -> dict[str, int]:
    """The moments one of which is one micro-batch's activation peak on pipeline rank `pp_rank`
    (its first stage), by name, with their live bytes."""
    return _candidates(cfg, pp_rank, pipeline.stages_of(cfg, pp_rank)[0])


def _kept(cfg: Config, pp_rank: int, stage=None) -> int:
    """What one micro-batch holds on the rank (one stage of it) from its forward to its backward:
    every layer's kept tensors, the embedding's and the head's saved ones, and what the pipeline
    schedule itself keeps (the stage's output until its backward, the received position ids)."""
    return _walk(cfg, pp_rank, stage or pipeline.stages_of(cfg, pp_rank)[0])[1]


def _candidates(cfg: Config, pp_rank: int, stage) -> dict[str, int]:
    return dict(_walk(cfg, pp_rank, stage)[0])


@per_config
def _walk(cfg: Config, pp_rank: int, stage) -> tuple[dict[str, int], int]:
    """(the peak's candidate moments of one micro-batch through `stage`, the bytes it keeps from
    its forward to its backward)."""
    m = cfg.model
    T = local_tokens(cfg)  # this rank's tokens (under context parallelism its chunks)
    P = _held(cfg, T)  # the hidden state's tokens on this rank (its part under SP)
    e = _act(cfg)
    kinds = _layer_kinds(cfg)
    layers = list(stage.layers)
    blocks, alike = {}, {}  # layers of one kind (and expert count) are alike: one block each
    for i in layers:
        key = (kinds[i], experts_in(cfg, i) if kinds[i] == "moe" else 0)
        if key not in alike:
            mlp = _moe_block(cfg, T, i) if kinds[i] == "moe" else _dense_mlp_block(cfg, T)
            attn = _attention_block(cfg, T)
            alike[key] = _Block(attn.saved + mlp.saved,
                                max(attn.fwd_transient, mlp.fwd_transient),
                                max(attn.bwd_transient, mlp.bwd_transient))
        blocks[i] = alike[key]
    # a tied embedding's gradient from the output layer waits for the lookup's, at the very end
    # (only where one rank holds both: a last stage's copy takes its gradient at once)
    tied_here = (not m.untie_embeddings_and_output_weights and stage.last
                 and pipeline.holds_first(cfg, pp_rank))
    pending = m.padded_vocab_size // cfg.topology.tp * m.hidden_size * e if tied_here else 0
    chunk_of = {i: tuple(c) for c in pipeline.checkpoint_chunks(cfg, pp_rank) for i in c
                if i in blocks}
    cac = cfg.recompute.cac and cfg.moe is not None and any(i in cfg.moe.layers for i in chunk_of)

    # What each layer holds from its forward to its backward: its saved tensors, or, in a
    # checkpointed chunk, the chunk's input (at its first layer) and the layer's CAC stash.
    kept = {}
    for i, b in blocks.items():
        if i not in chunk_of:
            kept[i] = b.saved
            continue
        stash = _layer_stash(cfg, i, kinds[i], T) if cac else 0
        kept[i] = (P * m.hidden_size * e if chunk_of[i][0] == i else 0) + stash
    # the first stage: the token ids; a later one: the position ids it received (its input
    # hidden state is the first layer's saved input); a stage before the last: its output,
    # which the schedule keeps for the backward
    base = _embedding_saved(T) if stage.first else T * 8
    out = 0 if stage.last else P * m.hidden_size * e
    candidates = {}
    held = base
    for i in layers:  # forward: what is held so far, plus this layer's working set
        candidates[f"forward {i}"] = held + blocks[i].saved + blocks[i].fwd_transient
        held += kept[i]
    total = held + out
    if stage.last:
        head_saved, loss_transient, head_bwd = _head_block(cfg, T)
        candidates["loss"] = held + head_saved + loss_transient
        candidates["output backward"] = held + head_saved + head_bwd + pending
        total += head_saved
    # backward, from the last layer: what the layers below still hold, this layer's saved tensors
    # (a chunk's recompute materializes all of its layers' at once), its gradients; before the
    # last stage, the output and the gradient received for it
    incoming = 0 if stage.last else 2 * P * m.hidden_size * e
    for n in reversed(range(len(layers))):
        i = layers[n]
        below = sum(kept[j] for j in layers[:n])
        if i in chunk_of:
            chunk = chunk_of[i]
            live = base + below - sum(kept[j] for j in chunk if j < i)
            live += sum(kept[j] for j in chunk) + sum(blocks[j].saved for j in chunk if j <= i)
        else:
            live = base + below + kept[i]
        candidates[f"backward {i}"] = live + blocks[i].bwd_transient + pending + incoming
    return candidates, total
