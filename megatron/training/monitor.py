"""What Megatron-LM's logging flags measure, beside the iteration line (megatron.training.log):
the parameters' norm and the gradients' zeros counted once over every shard, the timers of
--timing-log-level and their block, Weights & Biases, memory, and the run-time switches
(--deterministic-mode, --manual-gc, --logging-level).

Counting once: the optimizer's flat groups already know which rank's shard is the one copy of
each element (`FlatGroup.counts_in_norm`, what the gradient norm and checkpoints use): TP shards
summed over TP, replicated parameters on TP rank 0 and data-parallel rank 0 (or each ZeRO-1
shard), experts over EP, each pipeline stage's own parameters, the tied embedding's copy left
out. Each rank sums its share; one all-reduce over the world adds them up.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import socket
import time
from contextlib import contextmanager

import torch

from megatron.parallel import comm
from megatron.parallel.topology import Group, TEDGroups
from megatron.training.options import LogConfig, RuntimeConfig


# ---- counted once over the world ---------------------------------------------------------------
def _owned(fg):
    """This rank's slice [lo, hi) of a flat group without the ZeRO-1 padding at its end."""
    numel = sum(p.numel() for p in fg.params)
    return fg.lo, max(fg.lo, min(fg.hi, numel))


def params_norm(optimizer, groups: TEDGroups) -> float:
    """L2 norm of the model's fp32 (master) parameters, Megatron's calc_params_l2_norm: every
    element once, whatever the layout."""
    total = torch.zeros((), dtype=torch.float64, device=optimizer.flat_groups[0].master.device)
    for fg in optimizer.flat_groups:
        if fg.counts_in_norm(groups):
            lo, hi = _owned(fg)
            total += torch.linalg.vector_norm(fg.master[:hi - lo], dtype=torch.float64) ** 2
    comm.all_reduce_(total, groups.world)
    return math.sqrt(total.item())


def num_zeros_in_grad(optimizer, groups: TEDGroups) -> int:
    """Elements of the reduced gradients that are exactly zero (Megatron's count_zeros), every
    element once."""
    total = torch.zeros((), dtype=torch.int64, device=optimizer.flat_groups[0].grad_buf.device)
    for fg in optimizer.flat_groups:
        if fg.counts_in_norm(groups):
            lo, hi = _owned(fg)
            total += (fg.grad_buf[lo:hi] == 0).sum()
    comm.all_reduce_(total, groups.world)
    return int(total.item())


# ---- timers -------------------------------------------------------------------------------------
# Megatron-LM's timer names and levels (those that have a counterpart here), in its log order.
TIMER_LEVELS = {"forward-backward": 1, "forward-compute": 2, "backward-compute": 2,
                "batch-generator": 2, "all-grads-sync": 1, "optimizer-count-zeros": 1,
                "optimizer": 1}


class Timers:
    """Seconds per timer name summed over a log interval; the names above `level` are not timed.
    `block()` (every rank, at the log interval) returns Megatron's report of them."""

    def __init__(self, level: int, option: str, world: Group):
        self.level, self.option, self.world = level, option, world
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def active(self, name: str) -> bool:
        return TIMER_LEVELS[name] <= self.level

    def add(self, name: str, seconds: float) -> None:
        if self.active(name):
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def start(self, name: str) -> None:
        if self.active(name):
            self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        began = self._started.pop(name, None)
        if began is not None:
            self.add(name, time.perf_counter() - began)

    @contextmanager
    def time(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def wrap(self, name: str, fn):
        """`fn` timed under `name` on every call."""
        if not self.active(name):
            return fn

        def timed(*args, **kwargs):
            with self.time(name):
                return fn(*args, **kwargs)
        return timed

    def block(self, iterations: int) -> str | None:
        """Megatron's timer report, ms per iteration over the interval; resets. A collective:
        every rank calls it at the same iterations (its text matters on rank 0)."""
        names = [n for n in TIMER_LEVELS if self.active(n)]
        self.seconds, seconds = {}, self.seconds
        if not names:
            return None
        mine = torch.tensor([seconds.get(n, 0.0) * 1000.0 / max(iterations, 1) for n in names],
                            dtype=torch.float64)
        ranks = comm.raw_all_gather(mine, self.world)  # [world, names]
        if self.option == "all":
            return _all_ranks_text(names, ranks)
        lines = []
        for i, name in enumerate(names):
            timed = ranks[:, i][ranks[:, i] > 0]
            if timed.numel():
                label = (name + " ").ljust(48, ".")
                lo, hi = timed.min().item(), timed.max().item()
                lines.append(f"    {label}: {hi:.2f}" if self.option == "max"
                             else f"    {label}: ({lo:.2f}, {hi:.2f})")
        title = ("max time across ranks (ms):" if self.option == "max"
                 else "(min, max) time across ranks (ms):")
        return "\n".join([title] + lines) if lines else None


def _all_ranks_text(names: list[str], ranks: torch.Tensor) -> str | None:
    lines = ["times across ranks (ms):"]
    for i, name in enumerate(names):
        timed = [(r, v) for r, v in enumerate(ranks[:, i].tolist()) if v > 0]
        if timed:
            lines.append(f"  {name}:")
            lines += [f"     rank {r:2d}: {v:.2f}" for r, v in timed]
    return "\n".join(lines) if len(lines) > 1 else None


def time_model(timers: Timers, modules) -> None:
    """Level 2: forward-compute (each training forward of `modules`) and backward-compute (from
    the first gradient reaching a forward's output to the end of that backward pass)."""
    if not timers.active("forward-compute"):
        return
    def before(module, _inputs) -> None:  # a hook returning a value would replace the inputs
        if _training(module):
            timers.start("forward-compute")

    def after(module, _inputs, out) -> None:
        _after_forward(timers, module, out)

    for module in modules:
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


def _training(module) -> bool:
    return module.training and torch.is_grad_enabled()


def _after_forward(timers: Timers, module, out) -> None:
    if not _training(module):
        return
    timers.stop("forward-compute")
    first = next((t for t in _tensors(out) if t.requires_grad), None)
    if first is not None:
        first.register_hook(lambda grad: _backward_started(timers))


def _backward_started(timers: Timers) -> None:
    timers.start("backward-compute")
    # runs once the engine has finished this backward pass (what DDP uses to wait for it)
    torch.autograd.Variable._execution_engine.queue_callback(
        lambda: timers.stop("backward-compute"))


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return [v for v in vars(out).values() if isinstance(v, torch.Tensor)] if hasattr(
        out, "__dict__") else []


# ---- memory -------------------------------------------------------------------------------------
def memory_scalars():
    """Megatron's --log-memory-to-tensorboard tags. On a GPU the CUDA allocator's figures; on CPU
    the process's resident set (current for reserved and allocated, peak for max)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats = torch.cuda.memory_stats()
        return [("mem-reserved-bytes", stats.get("reserved_bytes.all.current", 0)),
                ("mem-allocated-bytes", stats.get("allocated_bytes.all.current", 0)),
                ("mem-max-allocated-bytes", stats.get("allocated_bytes.all.peak", 0))]
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        current = peak
    return [("mem-reserved-bytes", current), ("mem-allocated-bytes", current),
            ("mem-max-allocated-bytes", peak)]


# ---- Weights & Biases ---------------------------------------------------------------------------
def wandb_dir(log: LogConfig, save: str | None) -> str:
    """Megatron-LM's choice: --wandb-save-dir, else <--save>/wandb."""
    return log.wandb_save_dir or os.path.join(save or ".", "wandb")


def _online() -> bool:
    """Sync to the service only with an API key and a reachable host; otherwise offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"] == "online"
    if not os.environ.get("WANDB_API_KEY"):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        socket.create_connection((host.split("/")[0], 443), timeout=3).close()
        return True
    except OSError:
        return False


def open_wandb(log: LogConfig, save: str | None, run_config: dict, say):
    """A wandb run (rank 0 calls this), or None without --wandb-project."""
    if not log.wandb_project:
        return None
    import wandb

    directory = wandb_dir(log, save)
    os.makedirs(directory, exist_ok=True)
    mode = "online" if _online() else "offline"
    run = wandb.init(project=log.wandb_project, name=log.wandb_exp_name, entity=log.wandb_entity,
                     dir=directory, config=run_config, mode=mode,
                     # the training's stdout stays ours (no console capture)
                     settings=wandb.Settings(console="off", silent=True))
    if mode == "offline":
        say(f"> wandb: offline (no API key or no network): run files in {run.dir}/..; upload "
            "them later with `wandb sync`")
    return run


# ---- run-time switches --------------------------------------------------------------------------
def apply_runtime(runtime: RuntimeConfig, log: LogConfig, device, say) -> None:
    """--logging-level and --deterministic-mode, before the model is built."""
    if log.logging_level is not None:
        logging.getLogger().setLevel(log.logging_level)
    if runtime.deterministic_mode and device.type == "cpu":
        say("> deterministic mode: CPU runs are bitwise reproducible already (same flags and "
            "layout, same numbers); nothing to switch")
    elif runtime.deterministic_mode and device.type == "cuda":
        # cuBLAS reads its workspace setting when its handle is made (the first GEMM)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        say("> deterministic mode: torch.use_deterministic_algorithms(True), "
            f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}")


class ManualGC:
    """--manual-gc: Python's threshold collector off for the run; gc.collect() every
    --manual-gc-interval iterations and around evaluations (so every rank pauses at the same
    points). `close()` turns the collector back on."""

    def __init__(self, runtime: RuntimeConfig):
        self.cfg = runtime
        self.was_enabled = gc.isenabled()
        if runtime.manual_gc:
            gc.disable()
            gc.collect()

    def after_iteration(self, iteration: int) -> None:
        interval = self.cfg.manual_gc_interval
        if self.cfg.manual_gc and interval and iteration % interval == 0:
            gc.collect()

    def around_evaluation(self) -> None:
        if self.cfg.manual_gc and self.cfg.manual_gc_eval:
            gc.collect()

    def close(self) -> None:
        if self.cfg.manual_gc and self.was_enabled:
            gc.enable()


def step_extras(log: LogConfig, optimizer, groups: TEDGroups, metrics, timers: Timers) -> dict:
    """After a step, on every rank: the step's timers into `timers`, and the values the flags
    ask for (collectives over the world, so every rank calls this)."""
    for name in ("forward-backward", "optimizer"):
        timers.add(name, metrics.timers.get(name, 0.0))
    extra = {}
    if log.log_num_zeros_in_grad and not metrics.skipped:  # as Megatron: none for a skipped step
        with timers.time("optimizer-count-zeros"):
            extra["num-zeros"] = num_zeros_in_grad(optimizer, groups)
    if log.log_params_norm:
        extra["params-norm"] = params_norm(optimizer, groups)
    return extra
