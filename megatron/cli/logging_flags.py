"""Megatron-LM's logging, checkpoint and run-time flags (issue 23): what the run logs beyond the
iteration line (megatron.training.monitor), what a checkpoint load tolerates, and how the run
runs. Declared here, added to their groups by megatron.cli.arguments; each `dest` is the name of
the config field it sets (LogConfig, RuntimeConfig, CheckpointConfig, DataConfig).
"""

from __future__ import annotations

import argparse
import logging

from megatron.checkpoint.strictness import STRICTNESS
from megatron.training.options import TIMING_LOG_OPTIONS

# Megatron-Core's AttnBackend values
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")


def add_logging_flags(g) -> None:
    g.add_argument("--log-params-norm", action="store_true",
                   help="log the L2 norm of the fp32 parameters each iteration (line and "
                        "TensorBoard params-norm), every element counted once over TP/EP/DP/PP")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="log the number of zero elements in the reduced gradients (line and "
                        "TensorBoard num-zeros), every element counted once")
    g.add_argument("--timing-log-level", type=int, choices=[0, 1, 2], default=0,
                   help="0: the step's own timers (TensorBoard with --log-timers-to-tensorboard); "
                        "1: also Megatron's timer block after each log line (forward-backward, "
                        "all-grads-sync, optimizer-count-zeros, optimizer); 2: also "
                        "forward-compute, backward-compute, batch-generator")
    g.add_argument("--timing-log-option", choices=TIMING_LOG_OPTIONS, default="minmax",
                   help="the timer block per timer: max over ranks, (min, max), or all ranks")
    g.add_argument("--log-throughput", action="store_true",
                   help="add Megatron-LM's 'throughput per GPU (TFLOP/s/GPU): X' to the log line "
                        "(its model FLOP count; TensorBoard throughput with "
                        "--log-timers-to-tensorboard)")
    g.add_argument("--logging-level", type=_logging_level, default=None,
                   help="the level of Python's root logger (an int as in Megatron-LM, or a name "
                        "such as INFO)")
    g.add_argument("--wandb-project", default=None,
                   help="log the TensorBoard scalars to Weights & Biases in this project (offline "
                        "run files when there is no API key or no network)")
    g.add_argument("--wandb-exp-name", default=None, help="the Weights & Biases run's name")
    g.add_argument("--wandb-save-dir", default=None,
                   help="where the Weights & Biases run files go (default: --save/wandb)")
    g.add_argument("--wandb-entity", default=None, help="the Weights & Biases team or user")


def _logging_level(value: str) -> int:
    if value.lstrip("-").isdigit():
        return int(value)
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"{value} is neither an int nor a level name such as "
                                         "DEBUG, INFO, WARNING")
    return level


def add_runtime_flags(g) -> None:
    g.add_argument("--deterministic-mode", action="store_true",
                   help="bitwise reproducible runs. CPU runs already are (same flags, same "
                        "layout: equal losses bit for bit); on GPUs this selects deterministic "
                        "kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG)")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's automatic garbage collector off; collect every "
                        "--manual-gc-interval iterations and around evaluations, on every rank "
                        "at the same points")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: iterations between collections (0: only around "
                        "evaluations)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: no collection around evaluations")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read the .bin files with file reads instead of memory-mapping them "
                        "(megatron-core's IndexedDataset mmap switch)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="Megatron-LM's kernel choice; accepted with a notice: attention runs as "
                        "torch's scaled_dot_product_attention here")


def add_checkpoint_switches(g) -> None:
    g.add_argument("--dist-ckpt-strictness", dest="strictness", choices=STRICTNESS,
                   default="assume_ok_unexpected",
                   help="what a load tolerates (Megatron-Core's names). 'unexpected': a tensor "
                        "the model has that the checkpoint lacks; 'missing': one the checkpoint "
                        "has that the model lacks. assume_ok_unexpected (default): unexpected "
                        "ones fail the load, missing ones are ignored; log_unexpected / "
                        "return_unexpected: unexpected ones are listed and keep their initial "
                        "values; log_all / return_all: both listed; raise_unexpected: unexpected "
                        "ones are an error before anything is read; raise_all: either is; "
                        "ignore_all: both skipped silently")
    g.add_argument("--use-persistent-ckpt-worker", action="store_true",
                   help="accepted: --async-save writes from a background thread of each rank "
                        "(no worker process to keep)")
    g.add_argument("--ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save",
                   action="store_true", default=True,
                   help="accepted (always so here): every rank writes its share, each element "
                        "once")
    g.add_argument("--no-ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save",
                   action="store_false",
                   help="accepted: saves stay fully parallel here (nothing is written twice)")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true",
                   help="accepted (always so here): every rank reads only the parts it holds")
    g.add_argument("--auto-detect-ckpt-format", action="store_true",
                   help="accepted: --load is always read by what it holds (its metadata); a "
                        "folder in another format is named as such")
    g.add_argument("--ckpt-assume-constant-structure", action="store_true",
                   help="accepted: no effect here (each save plans its own writes)")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="accepted (always so here): optimizer state is stored as full tensors by "
                        "parameter name, loadable at any layout")
