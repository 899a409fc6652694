"""Checkpoints with Megatron's habits on torch.distributed.checkpoint, resumable at any layout.

storage.py       stored tensors on DCP: the parts a rank holds, planners, the safe reader
files.py         a checkpoint folder: metadata, tracker, atomic publishing, one-process reads/writes
guards.py        the --save folder's lock, free space, leftovers of killed saves, retention
rng_state.py     each rank's random streams
checkpointer.py  saving and loading a training run (optimizer state, buffers, RNG)
"""

from megatron.checkpoint.checkpointer import CheckpointConfig, Checkpointer, Resumed
from megatron.checkpoint.files import (
    META,
    TRACKER,
    check_compatible,
    check_schedule,
    config_dict,
    configs_from_meta,
    find_checkpoint,
    iteration_dir,
    read_checkpoint_meta,
    read_stored_tensors,
    write_model_checkpoint,
)
from megatron.checkpoint.rng_state import read_rng_file
from megatron.checkpoint.storage import CheckpointError, Parts

__all__ = ["CheckpointConfig", "Checkpointer", "Resumed", "META", "TRACKER", "check_compatible",
           "check_schedule", "config_dict", "configs_from_meta", "find_checkpoint", "iteration_dir",
           "read_checkpoint_meta", "read_stored_tensors", "write_model_checkpoint", "read_rng_file",
           "CheckpointError", "Parts"]
