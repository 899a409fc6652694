"""What the tools share on the command line: bad input is one `tool.py: error: ...` line and exit
status 2, never a traceback, as pretrain_gpt_moe.py reports it.

Library-level functions keep raising (ValueError / OSError naming the flag), so tests and other
code can catch them; only `run` turns them into the one line. No megatron import here: the
tokenizer trainer stays quick to start.
"""

import argparse
import os
import sys

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse without the usage block before each error (one line instead of twenty)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}; see --help", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def run(main, argv=None):
    """main(argv), with ValueError / OSError reported as one line and exit status 2."""
    prog = os.path.basename(sys.argv[0])
    try:
        return main(argv)
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {describe(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        sys.exit(130)


def describe(err: BaseException) -> str:
    """An OSError as 'PATH: reason' (its str() is '[Errno 13] Permission denied: ...')."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


def check_input_file(path: str, flag: str) -> None:
    """A readable file, or a ValueError naming the flag: missing, a directory, unreadable."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give the file itself")
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: file not found")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise ValueError(f"{flag} {path} cannot be read ({err.strerror})") from None


def output_directory(prefix: str, flag: str) -> None:
    """Create the directory a --*-prefix lives in; a ValueError naming the flag if it cannot be."""
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {prefix}: cannot create {directory} ({err.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{flag} {prefix}: {directory} is not writable")
