"""Every check that runs before the first collective, in one place: the command line, the
launcher's variables, the layout, the tokenizer and data files, the TensorBoard folder and the
checkpoints named by --save / --load.

A bad launch prints ONE `error:` line and every rank exits with 2: an error every rank finds
alike (flags, layout, world size) is printed by rank 0 only; one found in files by the first rank
of each node (each node may see its own filesystem); one in a rank's own variables by that rank.
Heavy imports (torch, megatron-core) happen inside the checks, after the flags parse.
"""

import contextlib
import difflib
import io
import os
import socket
import sys
import time

from megatron.launch import faults

EXIT_BAD_INPUT = 2
# How long a rank that does not print waits before it exits: torchrun (and srun
# --kill-on-bad-exit) kills every other rank as soon as one exits, and the printing rank could be
# killed before its line is out. Free under those launchers: the printing rank exits at once and
# the launcher then ends the waiting ones.
QUIET_EXIT_DELAY_S = 5.0
# Which rank prints a pre-flight error (see the module docstring)
ALL_RANKS, EACH_NODE, THIS_RANK = "all", "node", "rank"
# The files each tokenizer type reads (the others' flags are ignored, as in Megatron-LM)
TOKENIZER_FILES = {"SentencePieceTokenizer": ("tokenizer_model",),
                   "GPT2BPETokenizer": ("vocab_file", "merge_file")}


def load_config(argv=None):
    """Parse and validate everything; (config, tokenizer). Exits with 2 on bad input."""
    from megatron.cli.arguments import ConfigError
    from megatron.cli.configs import build_config, tokenizer_kwargs
    from megatron.launch.initialize import LaunchEnv, check_rendezvous_env, launch_env

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
            where = (f" (rank {env.rank} on {socket.gethostname()})" if env.rank >= 0
                     else f" (on {socket.gethostname()})")
        print(f"{faults.PROG}: error{where}: {error}", file=sys.stderr, flush=True)
    elif env.world_size > 1:
        time.sleep(QUIET_EXIT_DELAY_S)  # the printing rank leaves first (see QUIET_EXIT_DELAY_S)
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
    from megatron.cli.arguments import ConfigError, build_parser, parse_args

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            return parse_args(argv)
    except SystemExit as e:
        if not e.code:  # --help, printed on stdout
            raise
        # after argparse's usage block
        message = printed.getvalue().rpartition(" error: ")[2].strip()
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
    from megatron.data.datasets import check_input_file
    from megatron.data.tokenizer import build_tokenizer

    for name in TOKENIZER_FILES.get(kwargs["tokenizer_type"], ()):
        if kwargs[name]:
            check_input_file(kwargs[name], "--" + name.replace("_", "-"))
    return build_tokenizer(**kwargs)


def _check_data(cfg, tokenizer, env) -> None:
    from megatron.data.datasets import check_data

    notes = check_data(cfg.data.data_path, cfg.data.split, cfg.train.num_samples(),
                       vocab_size=tokenizer.vocab_size, cache_dir=cfg.data.cache_dir)
    for note in notes if env.rank == 0 else ():
        faults.say("warning", note)


def _check_tensorboard(path: str) -> None:
    """On every rank (only rank 0 writes, but every rank must stop together): the package is
    there and the directory can be created or written."""
    from megatron.cli.arguments import ConfigError

    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard-dir needs the tensorboard package: pip install "
                          "tensorboard (or the project's [tensorboard] extra)") from None
    check_writable_directory("--tensorboard-dir", path)


def check_checkpoint_flags(config, rank: int) -> None:
    """Before any process group, on every rank: --save can be written, and --load holds nothing
    (then training starts from scratch) or a whole checkpoint of the same model's shape and
    learning-rate schedule, with this rank's RNG file readable as plain data when it will be
    restored."""
    from megatron.checkpoint import (check_compatible, check_schedule, find_checkpoint,
                                     read_checkpoint_meta, read_rng_file)
    from megatron.checkpoint.guards import check_save_lock

    cfg = config.checkpoint
    if cfg.save:
        check_writable_directory("--save", cfg.save)
        check_save_lock(cfg.save)  # another run writing there: stop before any collective
    if config.moe is not None and config.moe.use_upcycling:  # --load holds a dense model
        from megatron.checkpoint.upcycle import check_upcycling

        check_upcycling(config.model, config.moe, cfg.load, cfg.save)
    elif cfg.load and find_checkpoint(cfg.load) is not None:
        meta = read_checkpoint_meta(cfg.load)
        check_compatible(meta, config.model, config.moe, meta["path"])
        if meta.get("has_optimizer") and not (cfg.no_load_optim or cfg.finetune):
            check_schedule(meta, config)
        same_layout = meta.get("layout", {}).get("name") == config.topology.describe()
        if meta.get("has_rng") and same_layout and not (cfg.no_load_rng or cfg.finetune):
            read_rng_file(meta["path"], rank)


def check_writable_directory(flag: str, path: str) -> None:
    from megatron.cli.arguments import ConfigError

    """Raise a ConfigError unless `path` is, or can be created as, a writable directory."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not a writable directory")
