"""--dist-ckpt-strictness: what a load tolerates when the checkpoint's tensors and the model's
differ, with Megatron-Core's values (its StrictHandling) and its words for the two sides:

  unexpected  a tensor the model asks for that the checkpoint does not hold
  missing     a tensor the checkpoint holds that the model does not ask for

assume_ok_unexpected (Megatron's default): no check first; an unexpected tensor fails the load
(the planner's error), missing ones are not read. log_* / return_*: the mismatches are listed
(return_*: to the caller, which is the training loop here, so listed too) and an unexpected tensor
keeps its initial value; raise_*: an error before anything is read; ignore_all: skipped silently.
A tensor of a different shape is always an error.
"""

from __future__ import annotations

STRICTNESS = ("assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected",
              "raise_all", "return_unexpected", "return_all", "ignore_all")
_SHOWN = 8  # keys named in a message


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def resolve(strictness: str, unexpected: set, missing: set, where: str):
    """(keys to leave out of the load, lines to log), or ValueError with the message to raise.
    `unexpected` and `missing` are the whole world's (identical on every rank)."""
    if strictness not in STRICTNESS:
        raise ValueError(f"--dist-ckpt-strictness {strictness}: use one of "
                         f"{', '.join(STRICTNESS)}")
    if strictness == "assume_ok_unexpected":  # the load itself fails on an unexpected tensor
        return set(), []
    check_missing = strictness.endswith("_all")
    if strictness.startswith("raise"):
        found = []
        if unexpected:
            found.append(f"the model has tensors it lacks: {_names(unexpected)}")
        if missing and check_missing:
            found.append(f"it holds tensors the model lacks: {_names(missing)}")
        if found:
            raise ValueError(f"{where} does not match the model (--dist-ckpt-strictness "
                             f"{strictness}): {'; '.join(found)}. Load it with "
                             "--dist-ckpt-strictness log_all to keep the model's initial values "
                             "for the tensors it lacks and skip the others")
        return set(), []
    lines = []
    if strictness.startswith(("log", "return")):
        if unexpected:
            lines.append(f"WARNING: {where} lacks {len(unexpected)} tensors of the model (they "
                         f"keep their initial values): {_names(unexpected)}")
        if missing and check_missing:
            lines.append(f"WARNING: {where} holds {len(missing)} tensors the model does not "
                         f"use (not read): {_names(missing)}")
    return set(unexpected), lines
