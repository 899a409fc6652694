#!/usr/bin/env python
"""GPT-MoE pretraining with TED (tensor x expert x data parallelism).

    torchrun --nproc-per-node 4 pretrain_gpt_moe.py --tensor-model-parallel-size 2 \
        --expert-model-parallel-size 2 --num-experts 8 --moe-router-topk 2 ... (see --help)

Every check of the command line, the layout and the input files runs before the first
collective, on every rank: a bad launch prints one `error:` line per rank and exits with 2.
"""

import os
import sys

# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

from megatron.training.arguments import (  # noqa: E402
    ConfigError, build_config, check_writable_directory, parse_args, tokenizer_kwargs)
from megatron.training.initialize import launch_env  # noqa: E402


def load_config(argv=None):
    """Parse and validate everything; (config, tokenizer). Exits with 2 on bad input."""
    args = parse_args(argv)
    env = launch_env()
    try:
        from megatron.training.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(**tokenizer_kwargs(args))
        cfg = build_config(args, env.world_size, tokenizer.vocab_size)
        if cfg.train.tensorboard_dir:
            _check_tensorboard(cfg.train.tensorboard_dir)
        if not cfg.data.mock:
            from megatron.training.data import check_data

            check_data(cfg.data.data_path, cfg.data.split, cfg.train.num_samples())
        if cfg.checkpoint.save or cfg.checkpoint.load:
            from megatron.training.checkpointing import check_checkpoint_flags

            check_checkpoint_flags(cfg.checkpoint, cfg.model, cfg.moe, cfg.topology, env.rank)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"pretrain_gpt_moe.py: error (rank {env.rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return cfg, tokenizer


def _check_tensorboard(path: str) -> None:
    """On every rank (only rank 0 writes, but every rank must stop together): the package is
    there and the directory can be created or written."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                          "(or the project's [tensorboard] extra)") from None
    check_writable_directory("--tensorboard-dir", path)


def main(argv=None):
    cfg, tokenizer = load_config(argv)
    import torch

    from megatron.training.initialize import destroy_distributed, initialize_distributed, set_seed
    from megatron.training.training import pretrain

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    groups, device = initialize_distributed(cfg.topology, cfg.train.backend, cfg.train.timeout_minutes)
    try:
        set_seed(cfg.train.seed)
        pretrain(cfg, tokenizer, groups, device)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
