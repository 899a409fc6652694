#!/usr/bin/env python
"""GPT-MoE pretraining with TED (tensor x expert x data parallelism).

    torchrun --nproc-per-node 4 pretrain_gpt_moe.py --tensor-model-parallel-size 2 \
        --expert-model-parallel-size 2 --num-experts 8 --moe-router-topk 2 ... (see --help)

Every check of the command line, the launcher's variables, the layout and the input files runs
before the first collective. A bad launch prints ONE `error:` line and every rank exits with 2:
an error every rank finds alike (flags, layout, world size) is printed by rank 0 only; one found
in files by the first rank of each node (each node may see its own filesystem); one in a rank's
own variables by that rank. Faults at run time (a rank that never joins or dies) exit with 1,
named in one line by rank 0 (faults.py).
"""

import contextlib
import difflib
import io
import os
import socket
import sys

# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

from megatron.training import faults  # noqa: E402  (light: no torch, so it can run first)

EXIT_BAD_INPUT = 2
# Which rank prints a pre-flight error (see the module docstring)
ALL_RANKS, EACH_NODE, THIS_RANK = "all", "node", "rank"
# The files each tokenizer type reads (the others' flags are ignored, as in Megatron-LM)
TOKENIZER_FILES = {"SentencePieceTokenizer": ("tokenizer_model",),
                   "GPT2BPETokenizer": ("vocab_file", "merge_file")}


def load_config(argv=None):
    """Parse and validate everything; (config, tokenizer). Exits with 2 on bad input."""
    from megatron.training.arguments import ConfigError, build_config, tokenizer_kwargs
    from megatron.training.initialize import LaunchEnv, check_rendezvous_env, launch_env

    try:
        env = launch_env()
    except faults.LaunchError as e:
        guess = _best_guess_env(LaunchEnv)
        _fail(e, guess, THIS_RANK if e.rank_specific or guess.rank < 0 else ALL_RANKS)
    with _failing(env, ALL_RANKS, ConfigError):
        args = _parse_args(argv)
        kwargs = tokenizer_kwargs(args)
    with _failing(env, EACH_NODE, ValueError, OSError):
        tokenizer = _build_tokenizer(kwargs)
    with _failing(env, ALL_RANKS, ConfigError, ValueError):
        cfg = build_config(args, env.world_size, tokenizer.vocab_size)
    with _failing(env, EACH_NODE, ConfigError, ValueError, OSError):
        if cfg.train.tensorboard_dir:
            _check_tensorboard(cfg.train.tensorboard_dir)
        if not cfg.data.mock:
            _check_data(cfg, tokenizer, env)
        if cfg.checkpoint.save or cfg.checkpoint.load:
            from megatron.training.checkpointing import check_checkpoint_flags

            check_checkpoint_flags(cfg, env.rank)
    with _failing(env, ALL_RANKS, faults.LaunchError):
        check_rendezvous_env(env)
    return cfg, tokenizer


@contextlib.contextmanager
def _failing(env, who: str, *errors):
    """Any of `errors` raised inside: one line from the rank `who` names, exit 2 on every rank."""
    try:
        yield
    except errors as e:
        _fail(e, env, who)


def _fail(error, env, who: str) -> None:
    prints = {ALL_RANKS: env.rank == 0, EACH_NODE: env.local_rank == 0, THIS_RANK: True}[who]
    if prints:
        where = ""
        if env.world_size > 1 and (who == THIS_RANK or env.rank != 0):
            where = f" (rank {env.rank} on {socket.gethostname()})" if env.rank >= 0 else f" (on {socket.gethostname()})"
        print(f"{faults.PROG}: error{where}: {error}", file=sys.stderr, flush=True)
    sys.exit(getattr(error, "status", EXIT_BAD_INPUT))


def _best_guess_env(LaunchEnv):
    """The launcher's variables are broken: take what parses (-1: unknown), to pick who prints."""
    def number(*names):
        for name in names:
            try:
                return int(os.environ[name])
            except (KeyError, ValueError):
                continue
        return -1  # unknown: this process prints (THIS_RANK) or stays quiet
    return LaunchEnv(number("RANK", "SLURM_PROCID"), max(number("WORLD_SIZE", "SLURM_NTASKS"), 2),
                     number("LOCAL_RANK", "SLURM_LOCALID"))


def _parse_args(argv):
    """argparse prints its whole usage block before an error (~90 lines, on every rank): keep
    the error itself, with the nearest flag when one was misspelled."""
    from megatron.training.arguments import ConfigError, build_parser, parse_args

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            return parse_args(argv)
    except SystemExit as e:
        if not e.code:  # --help, printed on stdout
            raise
        message = printed.getvalue().rpartition(" error: ")[2].strip()  # after argparse's usage block
    raise ConfigError(f"{message}{_nearest_flags(message, build_parser())}; see --help")


def _nearest_flags(message: str, parser) -> str:
    if not message.startswith("unrecognized arguments:"):
        return ""
    known = [flag for action in parser._actions for flag in action.option_strings]
    guesses = []
    for word in message.split(":", 1)[1].split():
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            guesses += difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
    return f" (did you mean {', '.join(dict.fromkeys(guesses))}?)" if guesses else ""


def _build_tokenizer(kwargs: dict):
    from megatron.training.data import check_input_file
    from megatron.training.tokenizer import build_tokenizer

    for name in TOKENIZER_FILES.get(kwargs["tokenizer_type"], ()):
        if kwargs[name]:
            check_input_file(kwargs[name], "--" + name.replace("_", "-"))
    return build_tokenizer(**kwargs)


def _check_data(cfg, tokenizer, env) -> None:
    from megatron.training.data import check_data

    notes = check_data(cfg.data.data_path, cfg.data.split, cfg.train.num_samples(),
                       vocab_size=tokenizer.vocab_size, cache_dir=cfg.data.cache_dir)
    for note in notes if env.rank == 0 else ():
        faults.say("warning", note)


def _check_tensorboard(path: str) -> None:
    """On every rank (only rank 0 writes, but every rank must stop together): the package is
    there and the directory can be created or written."""
    from megatron.training.arguments import ConfigError, check_writable_directory

    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                          "(or the project's [tensorboard] extra)") from None
    check_writable_directory("--tensorboard-dir", path)


def main(argv=None):
    faults.die_with_launcher()  # first: killing torchrun during the imports must end us too
    cfg, tokenizer = load_config(argv)
    import torch

    from megatron.training.initialize import (await_fault_verdict, finish_distributed, initialize_distributed,
                                              keep_freed_memory_mapped, launch_env, set_seed)
    from megatron.training.checkpointing import CheckpointError
    from megatron.training.optimizer import NonFiniteError
    from megatron.training.training import pretrain

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    try:
        groups, device = initialize_distributed(cfg.topology, cfg.train.backend, cfg.train.timeout_minutes)
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
    except (NonFiniteError, CheckpointError) as e:  # raised on every rank alike: the reduced loss, the load
        status = EXIT_BAD_INPUT if isinstance(e, CheckpointError) else faults.EXIT_FAULT
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
