"""Leaving a run early, as Megatron does: after --exit-interval iterations, after
--exit-duration-in-mins, or when the --exit-signal arrives (--exit-signal-handler: a scheduler's
preemption warning). Every rank decides at the same iteration; the loop then saves and exits 0.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.parallel import comm
from megatron.parallel.topology import TEDGroups


@dataclass(frozen=True)
class ExitConfig:
    interval: Optional[int] = None
    duration_minutes: Optional[float] = None
    signal_handler: bool = False
    signal_name: str = "SIGTERM"


class ExitControl:
    def __init__(self, cfg: ExitConfig, groups: TEDGroups, device):
        self.cfg, self.groups, self.device = cfg, groups, device
        self.start = time.time()
        self.received = False
        self._previous = None
        if cfg.signal_handler:
            self._previous = signal.signal(getattr(signal, cfg.signal_name), self._on_signal)

    def close(self) -> None:
        """Give the signal back to whoever had it before training."""
        if self._previous is not None:
            signal.signal(getattr(signal, self.cfg.signal_name), self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # acted on at the end of the current iteration

    def reason(self, iteration: int) -> Optional[str]:
        """Why to stop after `iteration`, the same on every rank; None to go on. One small
        all-reduce per iteration when a signal or a duration is watched."""
        cfg = self.cfg
        if cfg.signal_handler or cfg.duration_minutes is not None:
            late = self.groups.world.rank == 0 and cfg.duration_minutes is not None and \
                (time.time() - self.start) / 60.0 >= cfg.duration_minutes  # rank 0's clock decides
            flags = torch.tensor([float(self.received), float(late)], device=self.device)
            comm.all_reduce_(flags, self.groups.world, op=torch.distributed.ReduceOp.MAX)
            if flags[0]:
                return f"{cfg.signal_name} received"
            if flags[1]:
                return f"--exit-duration-in-mins {cfg.duration_minutes} reached"
        if cfg.interval and iteration % cfg.interval == 0:
            return f"--exit-interval {cfg.interval} reached"
        return None
