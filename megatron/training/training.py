"""Pretraining: model and optimizer set-up, the train loop with accumulation, evaluation and
Megatron-format logging."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron.model import GPTModel
from megatron.training.arguments import Config
from megatron.training.checkpointing import Checkpointer, Resumed, config_dict, read_checkpoint_meta
from megatron.training import schedule
from megatron.training.exits import ExitControl
from megatron.training.data import build_train_valid_test_datasets, collate
from megatron.training.optimizer import NonFiniteError, Optimizer
from megatron.parallel import comm
from megatron.parallel.topology import TEDGroups


# ---- one step -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepMetrics:
    lm_loss: float  # mean over the step's micro-batches on all DP ranks
    aux_loss: float  # MoE auxiliary losses (weighted), same averaging
    grad_norm: float
    skipped: bool
    loss_scale: float
    timers: dict = field(default_factory=dict)  # seconds (host clock): forward-backward, optimizer


def forward_backward(model, microbatches: list[dict], loss_scale: float, before_last=None) -> torch.Tensor:
    """Accumulate gradients of the mean loss over `microbatches`; returns [lm, aux] loss sums.
    `before_last()` runs before the last micro-batch (the optimizer's overlapped reduction)."""
    n = len(microbatches)
    sums = torch.zeros(2, dtype=torch.float64, device=microbatches[0]["tokens"].device)
    for i, mb in enumerate(microbatches):
        if before_last is not None and i == n - 1:
            before_last()
        out = model(**mb)
        (out.loss * (loss_scale / n)).backward()
        sums += torch.stack([out.lm_loss.detach(), out.aux_loss.detach()]).double()
    return sums


def train_step(model, optimizer: Optimizer, microbatches: list[dict], groups: TEDGroups) -> StepMetrics:
    start = time.perf_counter()
    optimizer.zero_grad()
    sums = forward_backward(model, microbatches, optimizer.scaler.scale, optimizer.before_last_backward)
    optimizer.reduce_gradients()
    losses = reduce_losses(sums / len(microbatches), groups)
    if optimizer.cfg.check_for_nan and not optimizer.cfg.fp16 and not all(map(math.isfinite, losses)):
        raise NonFiniteError(f"the lm loss is {losses[0]} (moe aux loss {losses[1]})")
    middle = time.perf_counter()
    result = optimizer.step()
    timers = {"forward-backward": middle - start, "optimizer": time.perf_counter() - middle}
    return StepMetrics(losses[0], losses[1], result.grad_norm, result.skipped, result.loss_scale, timers)


def reduce_losses(values: torch.Tensor, groups: TEDGroups) -> list[float]:
    """Mean over the DP group (every DP rank ran the same number of micro-batches)."""
    comm.all_reduce_(values, groups.dp)
    return (values / groups.dp.size).tolist()


# ---- set-up -------------------------------------------------------------------------------------
def build_model(cfg: Config, groups: TEDGroups, device) -> GPTModel:
    """The GPT (with TED MoE layers and activation checkpointing when configured), initialized
    from the seed independently of the layout, in the training dtype."""
    from ted_patches.cac import apply_recompute
    from ted_patches.patch import apply_patches

    model = GPTModel(cfg.model, groups, seed=cfg.train.seed, device=device, init=cfg.moe is None)
    if cfg.moe is not None:
        apply_patches(model, cfg.moe, seed=cfg.train.seed)
    apply_recompute(model, cfg.recompute)
    return model.to(dtype=cfg.model.params_dtype)


def build_scheduler(optimizer: Optimizer, cfg: Config):
    o = cfg.optim
    return schedule.build_scheduler(optimizer, cfg.train.schedule, o.lr, o.min_lr, o.weight_decay)


class MicroBatchSampler(torch.utils.data.Sampler):
    """This DP rank's micro-batches (lists of sample indices) of `steps` global batches from sample
    `first_sample`: of each block of micro x DP samples DP rank r takes the r-th micro-batch
    (Megatron's sampler), so every micro-batch holds the same samples whatever the DP size;
    accumulation walks the blocks in order."""

    def __init__(self, first_sample: int, steps: int, cfg: Config, groups: TEDGroups):
        self.first, self.steps, self.t = first_sample, steps, cfg.train
        self.dp, self.rank = groups.dp.size, groups.dp.rank

    def __len__(self) -> int:
        return self.steps * self.t.num_microbatches(self.dp)

    def __iter__(self):
        t = self.t
        for step in range(self.steps):
            base = self.first + step * t.global_batch_size
            for i in range(t.num_microbatches(self.dp)):
                start = base + (i * self.dp + self.rank) * t.micro_batch_size
                yield list(range(start, start + t.micro_batch_size))


def batches(dataset, first_sample: int, steps: int, cfg: Config, groups: TEDGroups, device):
    """Iterate this rank's steps as lists of micro-batches, read by --num-workers loader processes."""
    sampler = MicroBatchSampler(first_sample, steps, cfg, groups)
    workers = cfg.data.num_workers
    # A generator of its own: a loader draws its workers' base seed from it, and drawing from the
    # default one would shift dropout and jitter (a resumed run would then differ).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         prefetch_factor=2 if workers else None, generator=torch.Generator())
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    items = iter(loader)
    for _ in range(steps):
        yield [{k: batch[k].to(device) for k in keys}
               for batch in (next(items) for _ in range(cfg.train.num_microbatches(groups.dp.size)))]


@torch.no_grad()
def evaluate(model, dataset, first_step: int, cfg: Config, groups: TEDGroups, device) -> float:
    """Mean LM loss over --eval-iters global batches of `dataset`, from batch `first_step`."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    t = cfg.train
    for mbs in batches(dataset, first_step * t.global_batch_size, t.eval_iters, cfg, groups, device):
        for mb in mbs:
            total[0] += model(**mb).lm_loss.double()
        total[1] += len(mbs)
    model.train()
    comm.all_reduce_(total, groups.dp)
    return (total[0] / total[1]).item()


def flops_per_iteration(cfg: Config) -> float:
    """Model FLOPs of one training iteration (forward x3 for backward, x4 with full recompute),
    counting the k active experts per token and no capacity padding."""
    m, t = cfg.model, cfg.train
    h, s, f = m.hidden_size, t.seq_length, m.ffn_hidden_size
    mlp = (6 if m.swiglu else 4) * h * f
    qkv = 2 * h * (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim
    per_layer = [qkv + 2 * h * h + 4 * s * h + mlp for _ in range(m.num_layers)]  # qkv, proj, scores+context, mlp
    if cfg.moe is not None:
        fe = cfg.moe.expert_ffn_hidden_size or f
        expert = (6 if m.swiglu else 4) * h * fe
        for i in cfg.moe.layers:
            per_layer[i] += 2 * h * cfg.moe.experts_in(i) + (cfg.moe.topk * expert - mlp)
            if cfg.moe.mlp_type == "residual":
                per_layer[i] += mlp
    per_token = sum(per_layer) + 2 * h * m.padded_vocab_size
    passes = 4 if cfg.recompute.granularity == "full" else 3
    return passes * per_token * t.global_batch_size * s


# ---- logging ------------------------------------------------------------------------------------
class TrainLog:
    """Megatron's iteration line, averaged over --log-interval, and TensorBoard scalars; rank 0."""

    def __init__(self, cfg: Config, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.writer = None
        if enabled and cfg.train.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.train.tensorboard_dir, max_queue=cfg.train.tensorboard.queue_size)
        self._reset()
        self.flops = flops_per_iteration(cfg)

    def _reset(self):
        self.sum_lm = self.sum_aux = self.sum_norm = 0.0
        self.count = self.skipped = self.nans = 0
        self.t0 = time.time()

    def step(self, iteration: int, metrics: StepMetrics, lr: float, consumed: int, timers: dict) -> None:
        if metrics.skipped:
            self.skipped += 1
        elif not math.isfinite(metrics.lm_loss):
            self.nans += 1
        else:
            self.sum_lm += metrics.lm_loss
            self.sum_aux += metrics.aux_loss
            self.sum_norm += metrics.grad_norm
            self.count += 1
        if self.writer is not None and not metrics.skipped and iteration % self.cfg.train.tensorboard.log_interval == 0:
            for name, value in self._scalars(metrics, lr, timers):
                self.writer.add_scalar(name, value, iteration)
        if iteration % self.cfg.train.log_interval == 0 or iteration == self.cfg.train.train_iters:
            self._line(iteration, metrics, lr, consumed)

    def _scalars(self, metrics: StepMetrics, lr: float, timers: dict):
        """(tag, value) pairs for TensorBoard, as Megatron names them."""
        tb = self.cfg.train.tensorboard
        yield from (("lm-loss", metrics.lm_loss), ("moe-aux-loss", metrics.aux_loss), ("grad-norm", metrics.grad_norm),
                    ("learning-rate", lr), ("loss-scale", metrics.loss_scale))
        if tb.batch_size:
            yield "batch-size", self.cfg.train.global_batch_size
        if tb.timers:
            yield from ((f"{name}-time", seconds * 1000.0) for name, seconds in timers.items())
        if tb.memory:
            yield "mem-max-allocated-bytes", peak_memory_bytes()

    def _line(self, iteration: int, metrics: StepMetrics, lr: float, consumed: int) -> None:
        t, n = self.cfg.train, max(self.count, 1)
        iters = self.count + self.skipped + self.nans
        per_iter = (time.time() - self.t0) / max(iters, 1)
        tokens_per_s = t.global_batch_size * t.seq_length / per_iter
        tflops = self.flops / per_iter / self.cfg.topology.world_size / 1e12
        eta = timedelta(seconds=int(per_iter * (t.train_iters - iteration)))
        losses = ""  # as Megatron: no loss values when every iteration of the interval was skipped
        if self.count:
            losses = f" lm loss: {self.sum_lm / n:.6E} |"
            if self.cfg.moe is not None:
                losses += f" moe aux loss: {self.sum_aux / n:.6E} |"
            losses += f" grad norm: {self.sum_norm / n:.3f} |"
        line = (
            f" iteration {iteration:8d}/{t.train_iters:8d} | consumed samples: {consumed:12d} |"
            f" elapsed time per iteration (ms): {per_iter * 1000:.1f} | learning rate: {lr:.6E} |"
            f" global batch size: {t.global_batch_size:5d} |{losses} loss scale: {metrics.loss_scale:.1f} |"
            f" number of skipped iterations: {self.skipped:3d} | number of nan iterations: {self.nans:3d} |"
            f" tokens per second: {tokens_per_s:.1f} | TFLOP/s per device: {tflops:.3f} | ETA: {eta} |"
        )
        if self.enabled:
            print(line, flush=True)
        self._reset()

    def evaluation(self, iteration: int, name: str, loss: float) -> None:
        if not self.enabled:
            return
        text = f" {name} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {math.exp(min(loss, 20)):.6E} |"
        print("-" * len(text), text, "-" * len(text), sep="\n", flush=True)
        if self.writer is not None:
            self.writer.add_scalar(f"lm-loss {name}", loss, iteration)
            if self.cfg.train.tensorboard.validation_ppl:
                self.writer.add_scalar(f"lm-loss {name} ppl", math.exp(min(loss, 20)), iteration)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def peak_memory_bytes() -> int:
    """Peak CUDA allocation on a GPU; the process's peak resident set size on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def print_rank0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ---- the loop -----------------------------------------------------------------------------------
def _save(checkpointer, iteration: int, consumed: int, run: dict, model, optimizer, scheduler) -> None:
    start = time.time()
    checkpointer.save(iteration, {**run, "consumed_samples": consumed}, model, optimizer, scheduler)
    mode = "started (async)" if checkpointer.cfg.async_save else "saved"
    print_rank0(f"> checkpoint {mode} at iteration {iteration} in {checkpointer.cfg.save} "
                f"({time.time() - start:.2f} s)")



def run_description(cfg: Config) -> dict:
    """What a checkpoint records of the run, besides its state (JSON-able)."""
    return {"model": config_dict(cfg.model), "moe": config_dict(cfg.moe) if cfg.moe else None,
            "tokenizer": _tokenizer_record(cfg.data), "global_batch_size": cfg.train.global_batch_size,
            "data": {"data_path": cfg.data.data_path, "split": cfg.data.split, "mock": cfg.data.mock}}


def _tokenizer_record(data) -> dict:
    def absolute(path):
        return None if path is None else os.path.abspath(path)

    return {"tokenizer_type": data.tokenizer_type, "tokenizer_model": absolute(data.tokenizer_model),
            "vocab_file": absolute(data.vocab_file), "merge_file": absolute(data.merge_file),
            "vocab_size": data.vocab_size}


def warn_on_changes(saved: dict, now: dict, log) -> None:
    """Resuming with another global batch size or data blend is allowed, with one warning each."""
    if saved.get("global_batch_size") != now["global_batch_size"]:
        log(f"WARNING: the checkpoint was trained with --global-batch-size {saved.get('global_batch_size')}, "
            f"now {now['global_batch_size']}: training continues from its consumed samples")
    if saved.get("data") != now["data"]:
        log(f"WARNING: the checkpoint was trained on {saved.get('data')}, now on {now['data']}")


def pretrain(cfg: Config, tokenizer, groups: TEDGroups, device) -> dict:
    """Train for --train-iters (resuming from --load), evaluating every --eval-interval and saving
    every --save-interval and at the end; returns the loss history of the iterations run here."""
    t, ck = cfg.train, cfg.checkpoint
    for notice in cfg.notices:
        print_rank0(f"> notice: {notice}")
    model = build_model(cfg, groups, device)
    optimizer = Optimizer(model, groups, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg)
    checkpointer = Checkpointer(ck, groups)
    run = run_description(cfg)
    resumed = Resumed()
    if ck.load:
        resumed = checkpointer.load(model, optimizer, scheduler, print_rank0)
        if resumed.iteration:
            warn_on_changes(read_checkpoint_meta(ck.load), run, print_rank0)
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        data_path=cfg.data.data_path, split=cfg.data.split, mock=cfg.data.mock, seq_length=t.seq_length,
        seed=t.seed, tokenizer=tokenizer, num_samples=t.num_samples(), cache_dir=cfg.data.cache_dir,
        eod_mask_loss=cfg.data.eod_mask_loss,
    )
    print_rank0(f"> {cfg.topology.describe()}; {sum(p.numel() for p in model.parameters()):,} parameters on rank 0; "
                f"{t.num_microbatches(groups.dp.size)} micro-batches of {t.micro_batch_size} per step and DP rank")
    log = TrainLog(cfg, enabled=groups.world.rank == 0)
    history = {"lm_loss": [], "valid": [], "test": None}
    eval_round = resumed.iteration // t.eval_interval  # validation batches already used
    consumed = resumed.consumed_samples
    exits = ExitControl(cfg.exit, groups, device)
    try:  # the signal goes back to its previous handler however training ends (a raise included)
        train_batches = batches(train_ds, consumed, t.train_iters - resumed.iteration, cfg, groups, device)
        for iteration in range(resumed.iteration + 1, t.train_iters + 1):
            started = time.perf_counter()
            try:
                metrics = train_step(model, optimizer, next(train_batches), groups)
            except NonFiniteError as e:
                last = checkpointer.latest or "none (no checkpoint was saved or loaded)"
                raise NonFiniteError(f"iteration {iteration}: {e}; training stopped before the update (the last "
                                     f"good checkpoint: {last}; --no-check-for-nan-in-loss-and-grad trains on "
                                     "regardless)") from None
            consumed += t.global_batch_size
            lr = optimizer.param_groups[0]["lr"]
            if not metrics.skipped:  # as Megatron: a skipped fp16 step does not advance the schedule
                scheduler.step(t.schedule.per_iteration)
            history["lm_loss"].append(metrics.lm_loss)
            log.step(iteration, metrics, lr, consumed, {**metrics.timers, "iteration": time.perf_counter() - started})
            if valid_ds is not None and t.eval_iters and iteration % t.eval_interval == 0:
                loss = evaluate(model, valid_ds, eval_round * t.eval_iters, cfg, groups, device)
                eval_round += 1
                history["valid"].append((iteration, loss))
                log.evaluation(iteration, "validation", loss)
            stop = exits.reason(iteration)
            interval = ck.save_interval and iteration % ck.save_interval == 0
            if ck.save and (interval or stop or iteration == t.train_iters):
                _save(checkpointer, iteration, consumed, run, model, optimizer, scheduler)
            if stop:
                checkpointer.finalize()
                optimizer.wait_params()
                print_rank0(f"> exiting at iteration {iteration}: {stop}")
                log.close()
                return history
        checkpointer.finalize()
        optimizer.wait_params()
    finally:
        exits.close()
    if valid_ds is not None and t.eval_iters and t.train_iters % t.eval_interval:
        loss = evaluate(model, valid_ds, eval_round * t.eval_iters, cfg, groups, device)
        history["valid"].append((t.train_iters, loss))
        log.evaluation(t.train_iters, "validation", loss)
    if test_ds is not None and t.eval_iters:
        history["test"] = evaluate(model, test_ds, 0, cfg, groups, device)
        log.evaluation(t.train_iters, "test", history["test"])
    log.close()
    sys.stdout.flush()
    return history
