"""The training log: Megatron's iteration line averaged over --log-interval, evaluation lines,
TensorBoard scalars, and the model FLOPs they report."""

from __future__ import annotations

import math
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron.training.config import Config
from megatron.training import moe_stats
from megatron.training.forward_backward import StepMetrics
from megatron.training.monitor import memory_scalars


def flops_per_iteration(cfg: Config, megatron: bool = False) -> float:
    """Model FLOPs of one training iteration (forward x3 for backward, x4 with full recompute),
    counting the k active experts per token and no capacity padding. megatron=True: Megatron-LM's
    num_floating_point_operations (what --log-throughput reports): the causal half of the
    attention scores, no router, no recompute pass."""
    m, t = cfg.model, cfg.train
    h, s, f = m.hidden_size, t.seq_length, m.ffn_hidden_size
    mlp = (6 if m.swiglu else 4) * h * f
    # attention's projections (qkv and proj, or MLA's), scores + context, mlp
    proj, core = m.attention_flops(s)
    scores = core // 2 if megatron else core
    per_layer = [proj + scores + mlp for _ in range(m.num_layers)]
    if cfg.moe is not None:
        fe = cfg.moe.expert_ffn_hidden_size or f
        expert = (6 if m.swiglu else 4) * h * fe
        for i in cfg.moe.layers:
            router = 0 if megatron else 2 * h * cfg.moe.experts_in(i)
            per_layer[i] += router + (cfg.moe.topk * expert - mlp)
            if cfg.moe.mlp_type == "residual":
                per_layer[i] += mlp
            shared = cfg.moe.shared_expert_intermediate_size  # every token, beside the k experts
            if shared:
                gate = 2 * h if cfg.moe.shared_expert_gate and not megatron else 0
                per_layer[i] += (6 if m.swiglu else 4) * h * shared + gate
    per_token = sum(per_layer) + 2 * h * m.padded_vocab_size
    passes = 4 if cfg.recompute.granularity == "full" and not megatron else 3
    return passes * per_token * t.global_batch_size * s


# ---- logging ------------------------------------------------------------------------------------
class TrainLog:
    """Megatron's iteration line, averaged over --log-interval, and TensorBoard scalars; rank 0."""

    def __init__(self, cfg: Config, enabled: bool, timers=None, wandb=None):
        self.cfg, self.enabled = cfg, enabled
        self.timers, self.wandb = timers, wandb  # megatron.training.monitor's, or None
        self.writer = None
        if enabled and cfg.train.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.train.tensorboard_dir,
                                        max_queue=cfg.train.tensorboard.queue_size)
        self._reset()
        self.flops = flops_per_iteration(cfg)
        self.megatron_flops = flops_per_iteration(cfg, megatron=True)
        self.extra: dict = {}
        self.moe_layers = moe_stats.LayerLog()  # --moe-per-layer-logging (empty without)

    def _reset(self):
        self.sum_lm = self.sum_aux = self.sum_norm = self.sum_bubble = 0.0
        self.count = self.skipped = self.nans = 0
        self.t0 = time.time()

    def step(self, iteration: int, metrics: StepMetrics, lr: float, consumed: int,
             timers: dict, extra: dict | None = None) -> None:
        """`extra`: this iteration's params-norm / num-zeros (megatron.training.monitor)."""
        self.extra = extra or {}
        if metrics.skipped:
            self.skipped += 1
        elif not math.isfinite(metrics.lm_loss):
            self.nans += 1
        else:
            self.sum_lm += metrics.lm_loss
            self.sum_aux += metrics.aux_loss
            self.sum_norm += metrics.grad_norm
            self.sum_bubble += metrics.bubble or 0.0
            self.moe_layers.add(metrics.moe_layers)
            self.count += 1
        if ((self.writer is not None or self.wandb is not None) and not metrics.skipped
                and iteration % self.cfg.train.tensorboard.log_interval == 0):
            for name, value in self._scalars(metrics, lr, timers):
                self._write(name, value, iteration)
        if iteration % self.cfg.train.log_interval == 0 or iteration == self.cfg.train.train_iters:
            self._line(iteration, metrics, lr, consumed)

    def _scalars(self, metrics: StepMetrics, lr: float, timers: dict):
        """(tag, value) pairs for TensorBoard, as Megatron names them."""
        tb = self.cfg.train.tensorboard
        yield from (("lm-loss", metrics.lm_loss), ("moe-aux-loss", metrics.aux_loss),
                    ("grad-norm", metrics.grad_norm), ("learning-rate", lr),
                    ("loss-scale", metrics.loss_scale))
        if metrics.bubble is not None:
            yield "pipeline-bubble", metrics.bubble
        yield from moe_stats.scalars(metrics.moe_layers)
        if tb.batch_size:
            yield "batch-size", self.cfg.train.global_batch_size
        if tb.timers:
            yield from ((f"{name}-time", seconds * 1000.0) for name, seconds in timers.items())
        yield from self.extra.items()
        if tb.memory:
            yield from memory_scalars()
        if tb.timers and self.cfg.log.log_throughput:
            yield "throughput", self.throughput(timers["iteration"])

    def throughput(self, seconds_per_iteration: float) -> float:
        """Megatron-LM's: its model FLOPs per second per device, in TFLOP/s."""
        return (self.megatron_flops / max(seconds_per_iteration, 1e-12)
                / self.cfg.topology.world_size / 1e12)

    def _write(self, name: str, value: float, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, iteration)
        if self.wandb is not None:
            self.wandb.log({name: value}, step=iteration)

    def _line(self, iteration: int, metrics: StepMetrics, lr: float, consumed: int) -> None:
        t, n = self.cfg.train, max(self.count, 1)
        iters = self.count + self.skipped + self.nans
        per_iter = (time.time() - self.t0) / max(iters, 1)
        tokens_per_s = t.global_batch_size * t.seq_length / per_iter
        tflops = self.flops / per_iter / self.cfg.topology.world_size / 1e12
        eta = timedelta(seconds=int(per_iter * (t.train_iters - iteration)))
        throughput = ""  # Megatron-LM's fragment, where it puts it
        if self.cfg.log.log_throughput:
            throughput = f" throughput per GPU (TFLOP/s/GPU): {self.throughput(per_iter):.1f} |"
        losses = ""  # as Megatron: no loss values when every iteration of the interval was skipped
        if self.count:
            losses = f" lm loss: {self.sum_lm / n:.6E} |"
            if self.cfg.moe is not None:
                losses += f" moe aux loss: {self.sum_aux / n:.6E} |"
            losses += f" grad norm: {self.sum_norm / n:.3f} |"
            if "num-zeros" in self.extra:  # as Megatron: this iteration's
                losses += f" num zeros: {self.extra['num-zeros']:.1f} |"
            if "params-norm" in self.extra:
                losses += f" params norm: {self.extra['params-norm']:.3f} |"
            if self.cfg.stages is not None:  # this rank's (rank 0: the first stage)
                losses += f" pipeline bubble: {100 * self.sum_bubble / n:.1f}% |"
            losses += self.moe_layers.line()
        line = (
            f" iteration {iteration:8d}/{t.train_iters:8d} | consumed samples: {consumed:12d} |"
            f" elapsed time per iteration (ms): {per_iter * 1000:.1f} |{throughput}"
            f" learning rate: {lr:.6E} |"
            f" global batch size: {t.global_batch_size:5d} |{losses}"
            f" loss scale: {metrics.loss_scale:.1f} |"
            f" number of skipped iterations: {self.skipped:3d} |"
            f" number of nan iterations: {self.nans:3d} |"
            f" tokens per second: {tokens_per_s:.1f} | TFLOP/s per device: {tflops:.3f} |"
            f" ETA: {eta} |"
        )
        block = self.timers.block(iters) if self.timers is not None else None  # every rank
        if self.enabled:
            print(line, flush=True)
            if block:
                print(block, flush=True)
        self._reset()

    def evaluation(self, iteration: int, name: str, loss: float) -> None:
        if not self.enabled:
            return
        text = (f" {name} loss at iteration {iteration} | lm loss value: {loss:.6E} |"
                f" lm loss PPL: {math.exp(min(loss, 20)):.6E} |")
        print("-" * len(text), text, "-" * len(text), sep="\n", flush=True)
        self._write(f"lm-loss {name}", loss, iteration)
        if self.cfg.train.tensorboard.validation_ppl:
            self._write(f"lm-loss {name} ppl", math.exp(min(loss, 20)), iteration)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def peak_memory_bytes() -> int:
    """Peak CUDA allocation on a GPU; the process's peak resident set size on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def print_rank0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)
