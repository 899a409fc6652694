"""Leaving a run early, as Megatron does: after --exit-interval iterations, after
--exit-duration-in-mins, or when the --exit-signal arrives (--exit-signal-handler: a scheduler's
preemption warning). Every rank decides at the same iteration; the loop then saves and exits 0.

The signal is watched from the first line of the entry point (`catch_early`), not only from the
first iteration: a scheduler's warning that arrives while the ranks import, join or load is
remembered and honoured at the first iteration that can save. SIGINT (Ctrl-C) asks to stop the
same way; a second one stops at once, without a checkpoint. Light at import (no torch): the entry
point imports this module before anything heavy.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from megatron.parallel.topology import TEDGroups

EXIT_INTERRUPTED = 128 + signal.SIGINT  # a second Ctrl-C: the shell's status for death by SIGINT


@dataclass(frozen=True)
class ExitConfig:
    interval: Optional[int] = None
    duration_minutes: Optional[float] = None
    signal_handler: bool = False
    signal_name: str = "SIGTERM"


def watched_signals(signal_name: str) -> tuple[str, ...]:
    """The signals that ask a run to stop under --exit-signal-handler: its --exit-signal, and
    SIGINT (Ctrl-C, or torchrun passing one on), which would otherwise print a traceback per rank
    and save nothing."""
    return tuple(dict.fromkeys((signal_name, "SIGINT")))


def _stop_at_once(rank_prints: bool) -> None:
    if rank_prints:
        print("> a second SIGINT: stopping at once, without a checkpoint", file=sys.stderr,
              flush=True)
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def _ignore_repeats(name: str) -> None:
    """A stop was asked: repeats of a scheduler's signal (the batch script says it again until
    the step ends) change nothing, and must not kill the rank once Python, exiting, puts its
    handlers back to the default (it leaves ignored signals ignored). SIGINT stays watched: a
    second Ctrl-C stops at once."""
    if name != "SIGINT":
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class SignalLatch:
    """A handler that remembers the first stop signal (`caught`: its name), installed by the entry
    point before its heavy imports; ExitControl takes over what it caught."""

    def __init__(self, names: tuple[str, ...]):
        self.caught: Optional[str] = None
        for name in names:
            signal.signal(getattr(signal, name), self)

    def __call__(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.caught == "SIGINT" and name == "SIGINT":
            _stop_at_once(os.environ.get("RANK", "0") == "0")
        self.caught = self.caught or name
        _ignore_repeats(name)


_early: Optional[SignalLatch] = None  # the entry point's latch, until ExitControl takes it over


def catch_early(argv: list[str]) -> Optional[SignalLatch]:
    """From the first line of the entry point: when `argv` asks for --exit-signal-handler, catch
    its signal (and SIGINT) until training starts. A look at the raw flags, before they parse:
    an unknown signal name is left to the flag checks to report."""
    if "--exit-signal-handler" not in argv:
        return None
    name = "SIGTERM"
    for i, word in enumerate(argv):
        if word == "--exit-signal" and i + 1 < len(argv):
            name = argv[i + 1]
        elif word.startswith("--exit-signal="):
            name = word.split("=", 1)[1]
    name = name if name.startswith("SIG") else "SIG" + name
    if not isinstance(getattr(signal, name, None), signal.Signals):
        return None
    global _early
    _early = SignalLatch(watched_signals(name))
    return _early


class ExitControl:
    def __init__(self, cfg: ExitConfig, groups: TEDGroups, device):
        self.cfg, self.groups, self.device = cfg, groups, device
        self.start = time.time()
        self.received: Optional[str] = None  # the name of the first stop signal, once caught
        self._previous = {}
        if cfg.signal_handler:
            global _early
            # caught during start-up by the entry point's latch: acted on at the first iteration
            self.received = _early.caught if _early is not None else None
            _early = None
            for name in watched_signals(cfg.signal_name):
                if name != self.received or name == "SIGINT":  # else: ignored from now on
                    self._previous[name] = signal.signal(getattr(signal, name), self._on_signal)

    def close(self) -> None:
        """Give the signals back to whoever had them before training (one that asked for the
        stop stays ignored: see _ignore_repeats)."""
        for name, previous in self._previous.items():
            if signal.getsignal(getattr(signal, name)) != signal.SIG_IGN:
                signal.signal(getattr(signal, name), previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            _stop_at_once(self.groups.world.rank == 0)
        self.received = self.received or name  # acted on at the end of the current iteration
        _ignore_repeats(name)

    def reason(self, iteration: int) -> Optional[str]:
        """Why to stop after `iteration`, the same on every rank; None to go on. One small
        all-reduce per iteration when a signal or a duration is watched."""
        import torch

        from megatron.parallel import comm

        cfg = self.cfg
        if cfg.signal_handler or cfg.duration_minutes is not None:
            late = self.groups.world.rank == 0 and cfg.duration_minutes is not None and \
                (time.time() - self.start) / 60.0 >= cfg.duration_minutes  # rank 0's clock decides
            flags = torch.tensor([float(self.received is not None), float(late)],
                                 device=self.device)
            comm.all_reduce_(flags, self.groups.world, op=torch.distributed.ReduceOp.MAX)
            if flags[0]:  # another rank's signal, when not this one's
                return f"{self.received or cfg.signal_name} received"
            if flags[1]:
                return f"--exit-duration-in-mins {cfg.duration_minutes} reached"
        if cfg.interval and iteration % cfg.interval == 0:
            return f"--exit-interval {cfg.interval} reached"
        return None
