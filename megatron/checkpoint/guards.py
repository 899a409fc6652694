"""What keeps a --save folder sound over a weeks-long run: one writer at a time (a lock), room on
the disk before a save, leftovers of killed saves removed, and retention (--save-retain-interval).

The lock is an flock on SAVE/.megatron_ted.lock, taken by rank 0 for the whole run: the kernel
drops it when the process ends however it ends (a crash or SIGKILL leaves no stale lock), and
the file names the holder (host and pid) for the error the next run prints. Every rank checks it
before any collective (megatron/cli/preflight.py), rank 0 takes it after the join.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket

from megatron.checkpoint.storage import CheckpointError, CheckpointSaveError

LOCK = ".megatron_ted.lock"
_HELD: dict[str, int] = {}  # realpath of a --save folder -> the fd whose flock this process holds


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            host, pid = f.read().split()[:2]
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return "another process"


def _busy(root: str) -> str:
    return (f"--save {root} is in use by another run ({_holder(os.path.join(root, LOCK))}): one "
            "run at a time may write a checkpoint folder; stop that run or give this one another "
            "--save")


def check_save_lock(root: str) -> None:
    """Any rank, before any collective: raise a CheckpointError when another process holds the
    lock. A shared probe, so the ranks of one run never trip over each other."""
    path = os.path.join(root, LOCK)
    if os.path.realpath(root) in _HELD or not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CheckpointError(_busy(root)) from None
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def hold_save_lock(root: str) -> None:
    """Rank 0: take the lock for the rest of this process (idempotent). Another run that took it
    first (the two passed the probe together) is a fault: CheckpointSaveError."""
    key = os.path.realpath(root)
    if key in _HELD:
        return
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointSaveError(_busy(root)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    _HELD[key] = fd


def release_save_lock(root: str) -> None:
    fd = _HELD.pop(os.path.realpath(root), None)
    if fd is not None:
        os.close(fd)  # drops the flock; the file stays (a lock file is never deleted: no race)


# ---- disk space ----------------------------------------------------------------------------------
def folder_bytes(folder: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e7 else f"{n / 1e9:.6f} GB"


def no_space_message(root: str, iteration: int, needed: int) -> str:
    free = shutil.disk_usage(root).free
    return (f"not enough space in {root} for checkpoint {iteration} (needs {_gb(needed)}, "
            f"{_gb(free)} free): free space there or give --save another folder; the previous "
            "checkpoint is intact")


def check_space(root: str, iteration: int, needed: int) -> str | None:
    """The error line when `root`'s disk has less than `needed` bytes free, else None."""
    if shutil.disk_usage(root).free < needed:
        return no_space_message(root, iteration, needed)
    return None


# ---- leftovers and retention ---------------------------------------------------------------------
def remove_leftovers(root: str) -> None:
    """Rank 0, no save in flight: the unfinished iter_N.tmp and replaced iter_N.old folders of
    saves that were killed (never loaded: only committed folders are)."""
    for entry in os.listdir(root):
        if entry.startswith("iter_") and entry.endswith((".tmp", ".old")):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def retain(root: str, latest: int, interval: int) -> list[int]:
    """Rank 0, after `latest` committed: delete the committed checkpoints older than it whose
    iteration is not a multiple of `interval` (Megatron-Core's --save-retain-interval);
    returns the iterations deleted."""
    deleted = []
    for entry in sorted(os.listdir(root)):
        name = entry.removeprefix("iter_")
        if entry.startswith("iter_") and name.isdigit():
            it = int(name)
            if it < latest and it % interval:
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
                deleted.append(it)
    return deleted
