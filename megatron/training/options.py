"""What a run logs beyond the iteration line, and how it runs (Megatron-LM's logging and run-time
flags): pure data, filled from the flags of the same names by megatron.cli.configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TIMING_LOG_OPTIONS = ("max", "minmax", "all")


@dataclass(frozen=True)
class LogConfig:
    log_params_norm: bool = False  # the fp32 parameters' L2 norm, each element counted once
    log_num_zeros_in_grad: bool = False  # zeros in the reduced gradients, each counted once
    timing_log_level: int = 0  # 0: the step's own timers; 1: + Megatron's level-1 block; 2: + 2
    timing_log_option: str = "minmax"  # how the timer block reports ranks
    log_throughput: bool = False  # Megatron's `throughput per GPU (TFLOP/s/GPU): X` fragment
    logging_level: Optional[int] = None  # the root logger's level (Python's logging)
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None  # default: --save/wandb, else ./wandb
    wandb_entity: Optional[str] = None

    def __post_init__(self):
        if self.timing_log_level not in (0, 1, 2):
            raise ValueError(f"--timing-log-level {self.timing_log_level} must be 0, 1 or 2")
        if self.timing_log_option not in TIMING_LOG_OPTIONS:
            raise ValueError(f"--timing-log-option {self.timing_log_option} must be one of "
                             f"{', '.join(TIMING_LOG_OPTIONS)}")
        if self.wandb_project and not self.wandb_exp_name:
            raise ValueError("--wandb-project needs --wandb-exp-name NAME (the run's name, as in "
                             "Megatron-LM)")


@dataclass(frozen=True)
class RuntimeConfig:
    deterministic_mode: bool = False  # GPUs: deterministic kernels (CPU runs already are)
    manual_gc: bool = False  # Python's automatic collector off; gc.collect() at fixed points
    manual_gc_interval: int = 0  # collect every N iterations (0: only around evaluations)
    manual_gc_eval: bool = True  # collect before and after each evaluation

    def __post_init__(self):
        if self.manual_gc_interval < 0:
            raise ValueError(f"--manual-gc-interval must be >= 0 (got {self.manual_gc_interval})")
