"""The repo's linter, run as a test: lines of at most 100 characters and pyflakes' errors
(ruff.toml), over every Python file of the checkout; no library file over 600 lines."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install the project's [test] extra"
    done = subprocess.run([ruff, "check", "--no-cache", "--quiet", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_no_library_file_is_over_600_lines():
    long = []
    for folder in ("megatron", "ted_patches"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        n = sum(1 for _ in f)
                    if n > 600:
                        long.append(f"{os.path.relpath(path, ROOT)}: {n} lines")
    assert not long, long
