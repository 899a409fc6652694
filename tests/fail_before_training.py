"""One rank of a torchrun world that fails pre-flight through pretrain_gpt_moe.py's own printing
path (megatron/cli/preflight.py), with the race that lost the line forced: rank 0, which prints
an error every rank finds, finds it `--late` seconds after the others. Light: no torch."""

import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli import preflight  # noqa: E402

env = types.SimpleNamespace(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            local_rank=int(os.environ["LOCAL_RANK"]))
if env.rank == 0:
    time.sleep(float(sys.argv[sys.argv.index("--late") + 1]))
preflight._fail(ValueError("--global-batch-size 20 is not divisible by --micro-batch-size 3 x "
                           "data-parallel size 2; use a multiple of 6, e.g. 18"),
                env, preflight.ALL_RANKS)
