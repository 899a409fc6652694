"""Training configuration, and `Config`: every config of one run, built once at the entry point
(megatron.cli builds it from flags; tools and tests build it directly). Pure data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.checkpoint import CheckpointConfig
from megatron.data.config import DataConfig
from megatron.model.config import ModelConfig, RecomputeConfig
from megatron.parallel.stages import StagePlan
from megatron.parallel.topology import Topology
from megatron.training.exits import ExitConfig
from megatron.training.lr_schedule import ScheduleConfig
from megatron.training.optimizer import OptimizerConfig
from megatron.training.options import LogConfig, RuntimeConfig
from ted_patches.config import MoEConfig


@dataclass(frozen=True)
class TensorBoardConfig:
    queue_size: int = 1000
    log_interval: int = 1
    timers: bool = False
    batch_size: bool = False
    memory: bool = False
    validation_ppl: bool = False


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    seed: int
    schedule: ScheduleConfig
    eval_interval: int
    eval_iters: int
    log_interval: int
    tensorboard_dir: Optional[str]
    tensorboard: TensorBoardConfig
    backend: Optional[str]
    timeout_minutes: int

    @property
    def train_iters(self) -> int:
        return self.schedule.train_iters

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)

    def num_samples(self) -> tuple[int, int, int]:
        """Samples the train, valid and test datasets must hold: every train step, every
        evaluation (one each --eval-interval, and one at the end), one test evaluation."""
        evaluations = self.train_iters // self.eval_interval + 1
        per_eval = self.eval_iters * self.global_batch_size
        return self.train_iters * self.global_batch_size, evaluations * per_eval, per_eval


@dataclass(frozen=True)
class Config:
    topology: Topology
    model: ModelConfig
    moe: Optional[MoEConfig]
    recompute: RecomputeConfig
    optim: OptimizerConfig
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    exit: ExitConfig
    # the peers' flags that were mapped or have no effect: printed once
    notices: tuple[str, ...] = ()
    stages: Optional[StagePlan] = None  # the pipeline's stages (None: no pipeline parallelism)
    log: LogConfig = LogConfig()  # what is logged beyond the iteration line
    runtime: RuntimeConfig = RuntimeConfig()  # --deterministic-mode, --manual-gc
