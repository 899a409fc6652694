#!/usr/bin/env python
"""GPT-MoE pretraining with TED (tensor x expert x data parallelism).

    torchrun --nproc-per-node 4 pretrain_gpt_moe.py --tensor-model-parallel-size 2 \
        --expert-model-parallel-size 2 --num-experts 8 --moe-router-topk 2 ... (see --help)

Every check of the command line, the launcher's variables, the layout and the input files runs
before the first collective (megatron/cli/preflight.py): a bad launch prints ONE `error:` line and
every rank exits with 2. Faults at run time (a rank that never joins or dies) exit with 1, named
in one line by rank 0 (megatron/launch/faults.py).
"""

import os
import sys

# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

from megatron.launch import faults  # noqa: E402  (light: no torch, so it can run first)
from megatron.cli.preflight import EXIT_BAD_INPUT, load_config  # noqa: E402  (light too)
from megatron.training.exits import catch_early  # noqa: E402  (light too)


def main(argv=None):
    faults.die_with_launcher()  # first: killing torchrun during the imports must end us too
    # a preemption warning (or Ctrl-C) during the imports, the join or the load is remembered and
    # honoured at the first iteration that can save, instead of killing a rank with no checkpoint
    catch_early(sys.argv[1:] if argv is None else list(argv))
    cfg, tokenizer = load_config(argv)
    import torch

    from megatron.launch.initialize import (await_fault_verdict, finish_distributed,
                                              initialize_distributed, keep_freed_memory_mapped,
                                              launch_env, set_seed)
    from megatron.checkpoint import CheckpointError
    from megatron.training.optimizer import NonFiniteError
    from megatron.training.training import pretrain

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    try:
        groups, device = initialize_distributed(cfg.topology, cfg.train.backend,
                                                cfg.train.timeout_minutes)
        if device.type == "cpu":
            keep_freed_memory_mapped()
        set_seed(cfg.train.seed)
        pretrain(cfg, tokenizer, groups, device)
    except faults.LaunchError as e:  # a rank that never joined, a port in use: one line
        if not e.quiet:
            faults.say("error", str(e))
        sys.exit(e.status)
    except SystemExit as e:  # a deliberate stop all ranks take together
        finish_distributed(0 if e.code is None else e.code if isinstance(e.code, int) else 1)
        raise
    # raised on every rank alike: the reduced loss, the load
    except (NonFiniteError, CheckpointError) as e:
        # a bad checkpoint to load is bad input; a save failing at run time (exit_status 1) not
        status = (getattr(e, "exit_status", EXIT_BAD_INPUT) if isinstance(e, CheckpointError)
                  else faults.EXIT_FAULT)
        if launch_env().rank == 0:
            faults.say("error", str(e))
        finish_distributed(status)  # a rank alone in it: the others stop after the watchdog's grace
        sys.exit(status)
    except RuntimeError:  # a collective failed: when a peer died the watchdog names it and exits
        await_fault_verdict()
        raise
    finish_distributed()


if __name__ == "__main__":
    main()
