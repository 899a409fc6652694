"""Run pretrain_gpt_moe.main(argv) and SIGKILL this process at one point of its second save
(tests/test_checkpoint.py). The points, in the order a save passes them:
    start     iter_N.tmp made, nothing written        written   DCP files and metadata written
    rename    about to rename iter_N.tmp -> iter_N    tracker   about to replace the tracker file
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pretrain_gpt_moe  # noqa: E402
from megatron.checkpoint import checkpointer  # noqa: E402

POINT, ARGV = sys.argv[1], sys.argv[2:]
saves = {"n": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, point, before: bool):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before and POINT == point and saves["n"] == 2:
            die()
        out = original(*args, **kwargs)
        if not before and POINT == point and saves["n"] == 2:
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
pretrain_gpt_moe.main(ARGV)
