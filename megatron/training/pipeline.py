"""Pipeline parallelism: this rank's stages of the GPT run by torch.distributed.pipelining.

Each stage is a `StageChunk` over the rank's one GPTModel (megatron.parallel.stages says which
layers it runs); torch's schedules (1F1B, interleaved 1F1B, GPipe, ZBV zero bubble, DualPipeV)
send activations between stages over the PP group, while TP all-reduces, the MoE all-to-alls and
DTD run inside each stage as without a pipeline. What crosses a stage boundary: the hidden state
and the position ids (every stage computes its own RoPE). What does not: the MoE aux and z
losses. Each stage adds their gradient to its own backward (`AddAuxGrad`, Megatron's
MoEAuxLossAutoScaler), so the loss the whole model minimizes is the one process's, lm + aux,
averaged over the step's micro-batches. The bubble each rank measures is the share of the step it
spent in neither a forward nor a backward of its stages (waiting on its neighbours; the zero-
bubble schedules' separate weight passes are not timed, so theirs reads high).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.distributed import pipelining

from megatron.parallel import comm
from megatron.parallel.stages import StagePlan
from megatron.parallel.topology import TEDGroups

SINGLE = {"1f1b": pipelining.Schedule1F1B, "gpipe": pipelining.ScheduleGPipe}
MULTI = {"interleaved": pipelining.ScheduleInterleaved1F1B,
         "zbv": pipelining.ScheduleZBVZeroBubble, "dualpipev": pipelining.ScheduleDualPipeV}


class AddAuxGrad(torch.autograd.Function):
    """x -> x; backward: x's gradient, and d(aux)/d(aux) = 1 into the aux loss (which the caller
    scaled as the LM loss is scaled). A clone, not x itself: the zero-bubble schedules detach the
    stage output in place, which a view of the input would forbid."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.save_for_backward(aux)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class StageChunk(torch.nn.Module):
    """One pipeline stage: its layers of the rank's GPTModel, with the embedding on the first
    stage and the final norm and output layer on the last. Inputs: (tokens, position_ids) on the
    first stage, (hidden, position_ids) elsewhere; outputs: (hidden, position_ids), or the
    vocab-split logits on the last stage."""

    def __init__(self, gpt, stage: int, plan: StagePlan):
        super().__init__()
        object.__setattr__(self, "gpt", gpt)  # not a submodule: parameters() are the stage's own
        self.first, self.last = stage == 0, stage == plan.num_stages - 1
        layers = plan.stage_layers(stage)
        self.start, self.end = layers.start, layers.stop
        own = [gpt.layers[i] for i in layers]
        if self.first:
            own += [gpt.embedding, gpt.position_embedding]
        if self.last:
            own += [gpt.final_norm, gpt.output, gpt.embedding]
        self.own = torch.nn.ModuleList(dict.fromkeys(m for m in own if m is not None))
        self.aux_scale = 0.0  # per step: the factor the LM loss is scaled by
        self.aux: list[list] = []  # per forward (micro-batch order): the MoE layers' aux outputs
        self.busy = 0.0  # seconds this step in this stage's forwards and backwards

    def forward(self, first, position_ids):
        gpt, start = self.gpt, time.perf_counter()
        x = gpt.embed(first, position_ids) if self.first else first
        training = torch.is_grad_enabled()
        if training and x.requires_grad:  # the backward of this micro-batch ends here
            x.register_hook(self._backward_ends)
        x, aux = gpt.run_layers(x, gpt.rope(position_ids), self.start, self.end)
        if aux and training:
            x = AddAuxGrad.apply(x, sum(a.loss for a in aux) * self.aux_scale)
        self.aux.append(aux)
        out = gpt.head(x) if self.last else x
        if training:  # and starts here
            out.register_hook(self._backward_starts)
        self.busy += time.perf_counter() - start
        return out if self.last else (out, position_ids)

    def _backward_starts(self, _grad) -> None:
        self._began = time.perf_counter()

    def _backward_ends(self, _grad) -> None:
        self.busy += time.perf_counter() - self._began


class _Shapes:
    """What crosses each stage boundary, as meta tensors: the schedules then need no forward to
    learn the shapes (which would run an extra micro-batch, collectives and all)."""

    def __init__(self, gpt, micro_batch_size: int, seq_length: int):
        cfg = gpt.cfg
        # this rank's part of each sequence: s / CP under context parallelism, and the hidden
        # state s / (CP x TP) under sequence parallelism too
        self.bs = (micro_batch_size, seq_length // gpt.groups.cp.size)
        tp = gpt.groups.tp.size if gpt.groups.sequence_parallel else 1
        self.hidden_bs = (micro_batch_size, self.bs[1] // tp)
        self.dtype, self.hidden = cfg.params_dtype, cfg.hidden_size
        self.vocab = cfg.padded_vocab_size // gpt.groups.tp.size

    def _float(self, *shape, bs=None):
        return torch.empty(*(bs or self.bs), *shape, dtype=self.dtype, device="meta",
                           requires_grad=True)

    def _hidden(self):
        return self._float(self.hidden, bs=self.hidden_bs)

    def _ids(self):
        return torch.empty(*self.bs, dtype=torch.int64, device="meta")

    def inputs(self, chunk: StageChunk) -> tuple:
        return (self._ids() if chunk.first else self._hidden(), self._ids())

    def outputs(self, chunk: StageChunk) -> tuple:
        return (self._float(self.vocab),) if chunk.last else (self._hidden(), self._ids())


class Pipeline:
    """This rank's stages and the schedule over them, for a fixed number of micro-batches."""

    def __init__(self, gpt, plan: StagePlan, groups: TEDGroups, num_microbatches: int,
                 micro_batch_size: int, seq_length: int, device):
        self.gpt, self.plan, self.groups, self.n = gpt, plan, groups, num_microbatches
        rank = groups.coords.pp
        self.chunks = [StageChunk(gpt, s, plan) for s in plan.stages_of(rank)]
        shapes = self.shapes = _Shapes(gpt, micro_batch_size, seq_length)
        self.stages = [pipelining.PipelineStage(c, s, plan.num_stages, device, group=groups.pp.pg,
                                                input_args=shapes.inputs(c),
                                                output_args=shapes.outputs(c))
                       for c, s in zip(self.chunks, plan.stages_of(rank))]
        self.lm: list[torch.Tensor] = []  # the last stage's LM loss per micro-batch
        self.loss_scale = 1.0
        if plan.schedule in SINGLE:
            self.schedule = SINGLE[plan.schedule](self.stages[0], num_microbatches, self._loss,
                                                  scale_grads=False)
        else:
            self.schedule = MULTI[plan.schedule](self.stages, num_microbatches, self._loss,
                                                 scale_grads=False)

    def _loss(self, logits, target):
        lm = self.gpt.lm_loss(logits, target[:, 0], target[:, 1])
        self.lm.append(lm.detach())
        return lm * self.loss_scale

    def run(self, microbatches: list[dict], loss_scale: float, train: bool):
        """Every micro-batch through the pipeline (forward and backward when `train`): returns
        (this rank's LM loss sum, aux loss sum, {MoE layer: tokens per expert}); the LM sum is
        the last stage's (0 elsewhere)."""
        n = len(microbatches)
        if n != self.n:
            raise ValueError(f"the pipeline was built for {self.n} micro-batches, got {n}")
        self.lm = []
        self.loss_scale = loss_scale / n
        for c in self.chunks:
            c.aux, c.aux_scale, c.busy = [], loss_scale / n, 0.0
        started = time.perf_counter()
        args, kwargs = (), {}
        if any(c.first for c in self.chunks):
            args = tuple(torch.cat([mb[k] for mb in microbatches])
                         for k in ("tokens", "position_ids"))
        if any(c.last for c in self.chunks):
            kwargs["target"] = torch.cat([_target(mb) for mb in microbatches])
        if train:
            self.schedule.step(*args, **kwargs)
        elif self.plan.schedule in ("zbv", "dualpipev"):
            with torch.no_grad():
                self._forward_only(microbatches)
        else:
            with torch.no_grad():
                self.schedule.eval(*args, **kwargs)
        wall = time.perf_counter() - started
        # the share of the step this rank spent waiting on its neighbours
        self.bubble = max(0.0, 1.0 - sum(c.busy for c in self.chunks) / wall) if wall else 0.0
        return self._sums(args[0].device if args else microbatches[0]["tokens"].device)

    def _forward_only(self, microbatches: list[dict]) -> None:
        """Evaluation under the V-shaped schedules (torch's ZBV and DualPipeV run backward actions
        in eval too, and fail): every micro-batch through the stages in order, each rank running
        the stages it holds, the hidden state sent to the next stage's rank over the PP group
        (kept where that rank holds it too); the LM losses from the last stage, as `_loss`."""
        plan, pp = self.plan, self.groups.pp
        me = self.groups.coords.pp
        owner = {s: r for r in range(pp.size) for s in plan.stages_of(r)}
        chunks = dict(zip(plan.stages_of(me), self.chunks))
        last = plan.num_stages - 1
        for mb in microbatches:
            carry = None  # the hidden state when this rank ran the previous stage itself
            for s in range(plan.num_stages):
                if owner[s] != me:
                    carry = None
                    continue
                if s == 0:
                    out = chunks[s](mb["tokens"], mb["position_ids"])
                else:
                    if carry is None:
                        carry = torch.empty(self.shapes.hidden_bs + (self.shapes.hidden,),
                                            dtype=self.shapes.dtype,
                                            device=mb["tokens"].device)
                        dist.recv(carry, src=pp.ranks[owner[s - 1]], group=pp.pg)
                    out = chunks[s](carry, mb["position_ids"])
                if s == last:
                    self._loss(out, _target(mb))
                    continue
                carry = out[0]
                if owner[s + 1] != me:
                    dist.send(carry.contiguous(), dst=pp.ranks[owner[s + 1]], group=pp.pg)

    def _sums(self, device):
        lm = torch.stack(self.lm).double().sum() if self.lm else torch.zeros((), device=device,
                                                                             dtype=torch.float64)
        aux = torch.zeros((), dtype=torch.float64, device=device)
        counts = {}
        for c in self.chunks:
            for per_micro in c.aux:
                for a in per_micro:
                    aux += a.loss.detach().double()
                    counts[a.layer] = a.counts_E + counts[a.layer] if a.layer in counts \
                        else a.counts_E
        return lm, aux, counts


def _target(mb: dict) -> torch.Tensor:
    """What the last stage's loss reads of a micro-batch: labels and loss mask, [b, 2, s]."""
    return torch.stack([mb["labels"], mb["loss_mask"].long()], 1)


def reduce_over_stages(values: torch.Tensor, groups: TEDGroups) -> torch.Tensor:
    """Each stage's share of a step's sums (the LM loss lives on the last stage, each stage's MoE
    layers' aux losses on it) added up over the pipeline: the whole model's, on every stage."""
    if groups.pp is not None and groups.pp.size > 1:
        comm.all_reduce_(values, groups.pp)
    return values
