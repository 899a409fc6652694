"""This rank's experts as batched GEMMs, each expert split over the experts' TP group (ETP, = TP
unless --expert-tensor-parallel-size says otherwise) like Megatron's MLP.

Shapes: E_l local experts, N tokens per expert (capacity slots from every EP and TP peer),
H hidden, F ffn per TP rank (2F for SwiGLU's [gate | up]).

    w1_EHF  [E_l, H, F]   column-parallel (split on F)    b1_EF [E_l, F]  split on F
    w2_EFH  [E_l, F, H]   row-parallel (split on F)       b2_EH [E_l, H]  replicated over TP

Weights are stored [in, out] so both GEMMs are plain x @ W batched products: on these CPUs
that ran fwd+bwd in 77-81 ms against 81-85 ms for nn.Linear's [out, in] layout through a
transposed view, and 80-102 ms for a loop of nn.Linear (E=8, C=512, H=256, F=1024, fp32).
`forward` returns fc2's output BEFORE its TP reduction (the dispatcher fuses that reduction with
the DTD drop into one reduce-scatter), the fc2 bias added inside fc2's GEMM as the layer passes
it (`fc2_bias`: the bias on TP rank 0, zero elsewhere, so the reduction counts it once).

`forward_packed` is the padding-free form: the real rows of every local expert packed
[sum of counts, H] (expert-major) and their counts. Two backends, equal to each other and to the
padded batch within fp32 rounding: "grouped_mm" (torch.nn.functional.grouped_mm, one grouped
GEMM per linear over the real rows; biases added per row) and "loop" (_PackedMLP: one GEMM per
expert and linear written into preallocated rows, biases fused into the GEMMs, a hand-written
backward). Default: loop on CPUs (measured here at 2 threads: its GEMMs 74.8 ms against 78.0 ms
for the padded bmm path on the same 4096 rows; grouped_mm no faster), grouped_mm
elsewhere. `fc2_bias` works as in `forward`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from megatron.model.config import ModelConfig
from megatron.model.params import set_spec
from megatron.model.transformer import activation, output_std
from megatron.parallel.topology import TEDGroups


class GroupedExperts(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, num_local_experts: int, ffn_hidden_size: int,
                 groups: TEDGroups):
        super().__init__()
        self.cfg = cfg
        tp = groups.etp.size
        stride = 2 if cfg.swiglu else 1
        f, h, e = ffn_hidden_size // tp, cfg.hidden_size, num_local_experts
        expert = dict(expert=True)
        self.w1 = set_spec(torch.nn.Parameter(torch.empty(e, h, stride * f)), init="normal",
                           std=cfg.init_method_std, tp_dim=2, tp_stride=stride, **expert)
        self.w2 = set_spec(torch.nn.Parameter(torch.empty(e, f, h)), init="normal",
                           std=output_std(cfg), tp_dim=1, **expert)
        self.b1 = self.b2 = None
        if cfg.add_bias_linear:
            self.b1 = set_spec(torch.nn.Parameter(torch.empty(e, stride * f)), init="zeros",
                               tp_dim=1, tp_stride=stride, **expert)
            self.b2 = set_spec(torch.nn.Parameter(torch.empty(e, h)), init="zeros", **expert)

    def forward(self, x_ENH: torch.Tensor, fc2_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_ENH: N rows per local expert. Returns fc2's output [E_l, N, H] before its TP
        reduction, with `fc2_bias` [E_l, H] (if given) added inside the GEMM (baddbmm: no pass of
        its own; its gradient a contiguous sum)."""
        e, n = x_ENH.shape[:2]
        chunk = _experts_per_chunk(x_ENH.device, e, n * self.w1.shape[-1])
        if chunk == e:
            return self._mlp(x_ENH, self.w1, self.b1, self.w2, fc2_bias)
        # split, not slicing: split's backward concatenates the chunks' weight gradients, where a
        # slice's would fill a zero tensor of the whole weight per chunk and add them up
        none = [None] * -(-e // chunk)
        b1 = self.b1.split(chunk) if self.b1 is not None else none
        b2 = fc2_bias.split(chunk) if fc2_bias is not None else none
        parts = map(self._mlp, x_ENH.split(chunk), self.w1.split(chunk), b1, self.w2.split(chunk),
                    b2)
        return torch.cat(list(parts))

    def forward_packed(self, x_MH: torch.Tensor, counts: list[int],
                       fc2_bias: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
        """x_MH: every local expert's real rows, expert-major; counts: rows per local expert.
        Returns fc2's output [M, H] before its TP reduction, with `fc2_bias` [E_l, H] (if given)
        added inside the GEMM."""
        backend = backend or self.packed_backend or ("loop" if x_MH.device.type == "cpu"
                                                     else "grouped_mm")
        if backend == "loop":
            return _PackedMLP.apply(x_MH, self.w1, self.b1, self.w2, fc2_bias, tuple(counts),
                                    self.cfg)
        if backend != "grouped_mm":
            raise ValueError(f"unknown packed expert backend {backend!r}: use 'loop' or "
                             "'grouped_mm'")
        offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=x_MH.device)
        eid = None
        if self.b1 is not None or fc2_bias is not None:
            eid = torch.repeat_interleave(torch.arange(len(counts), device=x_MH.device),
                                          torch.tensor(counts, device=x_MH.device),
                                          output_size=x_MH.shape[0])
        h = F.grouped_mm(x_MH, self.w1, offs=offs)
        if self.b1 is not None:
            h = h + self.b1.index_select(0, eid)
        y = F.grouped_mm(_ContiguousGrad.apply(activation(self.cfg, h)), self.w2, offs=offs)
        if fc2_bias is not None:
            y = y + fc2_bias.index_select(0, eid)
        return _ContiguousGrad.apply(y)

    packed_backend: Optional[str] = None  # None: by device (see forward_packed)

    def _mlp(self, x_ENH, w1_EHF, b1_EF, w2_EFH, b2_EH=None) -> torch.Tensor:
        h_ENF = _bmm(x_ENH, w1_EHF, b1_EF)
        return _bmm(activation(self.cfg, h_ENF), w2_EFH, b2_EH)


class _PackedMLP(torch.autograd.Function):
    """fc1 -> activation -> fc2 of every local expert over its packed rows, one GEMM per expert and
    linear, each written straight into its rows of one preallocated output (forward and backward:
    no concatenation of per-expert results or weight gradients, no per-expert autograd nodes).
    Biases are fused into their GEMMs (addmm); the weight gradient of fc1 multiplies one
    contiguous copy of x^T (MKL's GEMM with a transposed-view A, as autograd's would use, ran the
    eight [256, 512] x [512, 1024] products in 15.2 ms against 12.1 ms here, 2 threads)."""

    @staticmethod
    def forward(ctx, x_MH, w1, b1, w2, b2, counts, cfg):
        segs = [(e, o, n)
                for e, (o, n) in enumerate(zip(np.cumsum((0,) + counts[:-1]).tolist(), counts))
                if n > 0]
        h = x_MH.new_empty(x_MH.shape[0], w1.shape[-1])
        y = x_MH.new_empty(x_MH.shape[0], w2.shape[-1])
        # exact GELU (activation()'s other case), one expert at a time: each [rows, F] slice is
        # activated while the GEMM has just left it in cache
        if not cfg.swiglu:
            a = torch.empty_like(h)
        for e, o, n in segs:
            if b1 is None:
                torch.mm(x_MH[o:o + n], w1[e], out=h[o:o + n])
            else:
                torch.addmm(b1[e], x_MH[o:o + n], w1[e], out=h[o:o + n])
            if not cfg.swiglu:
                torch.ops.aten.gelu.out(h[o:o + n], out=a[o:o + n])
                _fc2(a[o:o + n], w2[e], None if b2 is None else b2[e], y[o:o + n])
        if cfg.swiglu:
            a = activation(cfg, h)
            for e, o, n in segs:
                _fc2(a[o:o + n], w2[e], None if b2 is None else b2[e], y[o:o + n])
        # h and a through save_for_backward (not ctx attributes): under activation checkpointing
        # they are dropped after the forward and recomputed, like every other saved tensor
        ctx.save_for_backward(x_MH, w1, w2, h, a)
        ctx.segs, ctx.has_bias, ctx.swiglu = segs, (b1 is not None, b2 is not None), cfg.swiglu
        return y

    @staticmethod
    def backward(ctx, gy_MH):
        x, w1, w2, h, a_ = ctx.saved_tensors
        gy = gy_MH.contiguous()
        ga = torch.empty_like(a_)
        # every expert's block is written below
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gb1 = w1.new_empty(w1.shape[0], w1.shape[-1]) if ctx.has_bias[0] else None
        gb2 = w2.new_empty(w2.shape[0], w2.shape[-1]) if ctx.has_bias[1] else None
        used = {e for e, _, _ in ctx.segs}
        for e in range(w1.shape[0]):
            if e not in used:  # an expert without rows: zero gradients
                for g in (gw1, gw2, gb1, gb2):
                    if g is not None:
                        g[e].zero_()
        gelu = not ctx.swiglu
        gh = torch.empty_like(a_) if gelu else None
        for e, o, n in ctx.segs:
            torch.mm(gy[o:o + n], w2[e].t(), out=ga[o:o + n])
            torch.mm(a_[o:o + n].t(), gy[o:o + n], out=gw2[e])
            if gb2 is not None:
                torch.sum(gy[o:o + n], dim=0, out=gb2[e])
            if gelu:  # while this expert's slice of the activation gradient is in cache
                torch.ops.aten.gelu_backward.grad_input(ga[o:o + n], h[o:o + n],
                                                        grad_input=gh[o:o + n])
        if not gelu:
            gh = _swiglu_backward(h, ga)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        xT = x.t().contiguous()
        for e, o, n in ctx.segs:
            torch.mm(xT[:, o:o + n], gh[o:o + n], out=gw1[e])
            if gb1 is not None:
                torch.sum(gh[o:o + n], dim=0, out=gb1[e])
            if gx is not None:
                torch.mm(gh[o:o + n], w1[e].t(), out=gx[o:o + n])
        return gx, gw1, gb1, gw2, gb2, None, None


def _swiglu_backward(h: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    """The gradient of [gate | up] for a = silu(gate) * up, given a's gradient (by hand: a
    nested autograd call inside a backward is a graph task of its own, and under activation
    checkpointing each one recomputes the whole region again)."""
    gate, up = h.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    g_gate = ga * up * sig * (1 + gate * (1 - sig))
    return torch.cat([g_gate, ga * (gate * sig)], dim=-1)


def _bmm(x, w, b):
    return torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)


def _fc2(a, w, b, out):
    return torch.mm(a, w, out=out) if b is None else torch.addmm(b, a, w, out=out)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward rejects
    non-contiguous incoming gradients ("Invalid strides/sizes", e.g. straight from a .sum())."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# On CPUs the activation between the two GEMMs is memory-bound: computing a few experts at a time
# keeps each chunk's [n, F] activation (and, in backward, its gradient) in the last-level cache.
# Measured here, one thread, 4 experts x 1024 tokens x F=1024: 151-157 ms in chunks of 2 against
# 162-168 ms as one batch; with 2 threads, 8 x 512: one batch 87 ms, chunks of 4 89 ms (chunks
# also cost a concatenation of the weight gradients). Accelerators run one batched GEMM.
_CPU_ACTIVATION_BUDGET = 2**21  # elements of [chunk, n, F] per thread (8 MiB in fp32)


def _experts_per_chunk(device: torch.device, experts: int, activation_per_expert: int) -> int:
    if device.type != "cpu":
        return experts
    budget = _CPU_ACTIVATION_BUDGET * torch.get_num_threads()
    return max(1, min(experts, budget // max(activation_per_expert, 1)))

