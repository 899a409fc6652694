"""The tests' multi-process harness: see megatron/training/local_world.py."""

from megatron.training.local_world import run, ted_groups, world  # noqa: F401
