"""The schedule flags: training length and learning-rate warmup / decay in iterations, samples
(Megatron-LM) or tokens (Megatron-DeepSpeed). Iteration flags convert exactly (iterations x global
batch [x sequence length]), so --lr-warmup-iters, --lr-warmup-samples and --lr-warmup-tokens
describe one schedule in three units.
"""

from __future__ import annotations

import math

from megatron.training.lr_schedule import ScheduleConfig


class ScheduleError(ValueError):
    """A bad or contradictory schedule flag; the message names it."""


def _one_of(args, names: tuple[str, ...], what: str):
    given = [(n, getattr(args, n)) for n in names if getattr(args, n, None) is not None]
    if len(given) > 1:
        flags = " and ".join("--" + n.replace("_", "-") for n, _ in given)
        raise ScheduleError(f"{flags} are both given for the {what}: choose one")
    return given[0] if given else (None, None)


def schedule_from_args(args, global_batch_size: int, seq_length: int) -> ScheduleConfig:
    gbs = global_batch_size
    for name in ("train_iters", "train_samples", "train_tokens", "lr_warmup_samples",
                 "lr_decay_samples", "lr_warmup_tokens", "lr_decay_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < (1 if name.startswith("train") else 0):
            raise ScheduleError(f"--{name.replace('_', '-')} must be >= "
                                f"{1 if name.startswith('train') else 0} (got {value})")
    length, _ = _one_of(args, ("train_iters", "train_samples"), "training length")
    if length is None:
        raise ScheduleError("give --train-iters N (or --train-samples N)")
    iters = args.train_iters if length == "train_iters" else args.train_samples // gbs
    if iters < 1:
        raise ScheduleError(f"--train-samples {args.train_samples} is less than one "
                            f"--global-batch-size {gbs}")
    tokens = args.lr_warmup_tokens is not None or args.lr_decay_tokens is not None
    unit, per_sample = ("tokens", seq_length) if tokens else ("samples", 1)
    per_iteration = gbs * per_sample

    def steps(name: str, value) -> int:
        if name.endswith("iters"):
            return value * per_iteration
        return value * per_sample if name.endswith("samples") else value

    name, value = _one_of(args, ("lr_decay_iters", "lr_decay_samples", "lr_decay_tokens"),
                          "learning-rate decay")
    decay = steps(name, value) if name else iters * per_iteration
    if decay < 1:
        raise ScheduleError("the learning-rate decay must last >= 1 step")
    fraction = getattr(args, "lr_warmup_fraction", None)
    warm_flags = (("lr_warmup_samples", "lr_warmup_tokens")
                  + (("lr_warmup_iters",) if args.lr_warmup_iters else ()))
    name, value = _one_of(args, warm_flags, "warmup")
    if fraction is not None:
        if name:
            raise ScheduleError(f"--{name.replace('_', '-')} and --lr-warmup-fraction are both "
                                "given: choose one")
        if not 0.0 <= fraction < 1.0:
            raise ScheduleError(f"--lr-warmup-fraction must be in [0, 1) (got {fraction})")
        warmup = int(fraction * decay)
    else:
        warmup = steps(name, value) if name else 0
    if warmup >= decay:
        raise ScheduleError(f"learning-rate warmup ({warmup} {unit}) must be shorter than the "
                            f"decay ({decay} {unit})")
    if args.train_tokens is not None:  # Megatron-DeepSpeed's second stop condition
        iters = min(iters, math.ceil(args.train_tokens / (gbs * seq_length)))
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ScheduleError("--override-opt_param-scheduler and "
                            "--use-checkpoint-opt_param-scheduler are both given: choose one")
    return ScheduleConfig(unit, per_iteration, warmup, decay, iters, args.lr_decay_style,
                          args.override_opt_param_scheduler,
                          args.use_checkpoint_opt_param_scheduler)


def add_schedule_args(g) -> None:
    g.add_argument("--train-iters", type=int, default=None,
                   help="optimizer steps (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples to train on: --train-samples // global batch iterations "
                        "(Megatron-LM)")
    g.add_argument("--train-tokens", type=int, default=None,
                   help="stop once this many tokens were trained on, a second stop condition "
                        "(Megatron-DeepSpeed)")
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="linear warmup from 0, in iterations")
    g.add_argument("--lr-warmup-samples", type=int, default=None,
                   help="warmup in samples (Megatron-LM)")
    g.add_argument("--lr-warmup-tokens", type=int, default=None,
                   help="warmup in tokens (Megatron-DeepSpeed)")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of the decay")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="decay length in iterations (default: training)")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="decay length in samples (Megatron-LM)")
    g.add_argument("--lr-decay-tokens", type=int, default=None,
                   help="decay length in tokens (Megatron-DeepSpeed)")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   action="store_true", dest="override_opt_param_scheduler",
                   help="on resume, the schedule flags replace the checkpoint's (Megatron)")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler",
                   help="on resume, the checkpoint's schedule replaces the flags' (Megatron); with "
                        "neither, they must agree")
