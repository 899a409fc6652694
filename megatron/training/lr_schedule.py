"""The learning-rate schedule, counted as megatron-core's OptimizerParamScheduler counts it: in
samples, or in tokens (megatron.cli.schedule turns the flags of either unit into this config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleConfig:
    unit: str  # "samples" | "tokens": what one scheduler step counts
    per_iteration: int  # scheduler steps per training iteration
    warmup_steps: int
    decay_steps: int
    train_iters: int  # iterations to run (--train-iters, --train-samples, cut by --train-tokens)
    decay_style: str = "linear"
    # --override-opt_param-scheduler: the flags win over a checkpoint's schedule
    override: bool = False
    use_checkpoint: bool = False  # --use-checkpoint-opt_param-scheduler: the checkpoint's wins


def build_scheduler(optimizer, schedule: ScheduleConfig, lr: float, min_lr: float,
                    weight_decay: float):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if schedule.warmup_steps else lr, max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=schedule.decay_steps,
        lr_decay_style=schedule.decay_style, start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=schedule.train_iters * schedule.per_iteration, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=schedule.use_checkpoint,
        override_opt_param_scheduler=schedule.override,
    )
