"""Memory on one GPU: parameters, gradients and optimizer state (megatron/plan/params.py), plus
the activations and the optimizer step's temporaries: what autograd keeps for backward in this
code (attention as a flash kernel, no s x s matrix), plus the largest transient of the forward,
the backward and the optimizer step; bench/planner_memory.py measures how close that comes on CPU.

Shapes as in megatron/plan/shapes.py."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.plan.params import (
    _FP32,
    experts_in,
    flat_groups,
    grad_bytes,
    optimizer_state_bytes,
    param_bytes,
    qkv_size,
    query_groups,
)
from megatron.plan.shapes import _layer_kinds, micro_shapes
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

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + max(self.activations, self.step_peak)
                + self.reserved)

    def as_dict(self) -> dict[str, int]:
        return dict(params=self.params, grads=self.grads, optimizer=self.optimizer,
                    activations=self.activations, step_peak=self.step_peak,
                    reserved=self.reserved, total=self.total)


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
    # the experts' input rows, fc1 and act
    saved += rows * H * e + _mlp_saved(rows, fe, m.swiglu, e)
    # combine: the row each assignment read, its gate weight
    saved += moe.topk * T * (H * e + _FP32)
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
    # the last layer's output and the final norm's (and its stats)
    saved = 2 * T * H * e + 2 * T * _FP32
    saved += T * V * _FP32  # the fp32 softmax the cross-entropy keeps
    # the logits beside their copy: the padding-masked clone (on the rank holding padded rows:
    # the worst rank is the one that counts) or, in half precision, the fp32 upcast
    copies = (m.padded_vocab_size > m.vocab_size) + (e != _FP32)
    loss = T * V * e * copies
    weight_grad = V * H * e
    bwd = (T * H * e + (T * V * e if e != _FP32 else 0)
           + (weight_grad if m.untie_embeddings_and_output_weights else 0))
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
    pending = (0 if m.untie_embeddings_and_output_weights
               else m.padded_vocab_size // cfg.topology.tp * m.hidden_size * e)
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
