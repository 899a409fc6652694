"""Run pretrain_gpt_moe.main(argv) and SIGKILL this process at one point of its second save
(tests/test_checkpoint.py), or of the save that KILL_AT_SAVE names (tests/test_checkpoint_faults.py:
the first). The points, in the order a save passes them:
    start     iter_N.tmp made, nothing written        written   DCP files and metadata written
    rename    about to rename iter_N.tmp -> iter_N    tracker   about to replace the tracker file
and one that fails instead of dying:
    enospc    the write of checkpoint KILL_AT_SAVE's stored tensors raises OSError(ENOSPC), as a
              full disk does (the iteration number: every iteration saves)
"""

import errno
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pretrain_gpt_moe  # noqa: E402
from megatron.checkpoint import checkpointer  # noqa: E402

POINT, ARGV = sys.argv[1], sys.argv[2:]
saves = {"n": 0}
AT = int(os.environ.get("KILL_AT_SAVE", "2"))


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, point, before: bool):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before and POINT == point and saves["n"] == AT:
            die()
        out = original(*args, **kwargs)
        if not before and POINT == point and saves["n"] == AT:
            die()
        return out

    setattr(owner, name, wrapped)


original_save = checkpointer.Checkpointer.save


def counting_save(self, *args, **kwargs):
    saves["n"] += 1
    return original_save(self, *args, **kwargs)


checkpointer.Checkpointer.save = counting_save
wrap(checkpointer, "save_torch", "start", before=True)
wrap(checkpointer, "dcp_save", "written", before=False)
wrap(os, "rename", "rename", before=True)
wrap(os, "replace", "tracker", before=True)


def no_space(self, *args, **kwargs):
    if f"iter_{AT:07d}.tmp" in str(self.path):  # by folder: an async write runs after its save()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write_data(self, *args, **kwargs)


if POINT == "enospc":
    from megatron.checkpoint import storage

    write_data = storage.ChecksumWriter.write_data
    storage.ChecksumWriter.write_data = no_space
pretrain_gpt_moe.main(ARGV)
