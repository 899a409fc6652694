"""Real training processes for the fault and Slurm tests: a world launched by hand (RANK /
WORLD_SIZE per process, as srun does) or by torchrun, its output in files, waiting for a line,
and a check that nothing of it is left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil

from megatron.launch.initialize import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_gpt_moe.py")
# The smallest MoE run that still has every part: TP x EP, 4 experts, mock data
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
        "--seq-length 16 --mock-data --vocab-size 120 --make-vocab-size-divisible-by 8 "
        "--micro-batch-size 2 --lr 1e-3 --num-experts 4 --moe-router-topk 2 --hidden-dropout 0 "
        "--attention-dropout 0 --eval-iters 0").split()


def quiet_env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONWARNINGS="ignore", **{k: str(v) for k, v in extra.items()})


class Proc:
    """One process with stdout/stderr in files under `tmp`."""

    def __init__(self, argv: list[str], env: dict, tmp, name: str):
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        # its own session: a cleanup kill of its group never reaches the test runner
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err,
                                          start_new_session=True)
        self.pid = self.popen.pid

    def out(self) -> str:
        return self.out_path.read_text()

    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 120.0, stream: str = "out") -> re.Match:
        """Block until `pattern` shows in the process's output (or fail, naming what it printed)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = re.search(pattern, self.out() if stream == "out" else self.err())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not printed (exit {self.popen.poll()}):\n"
                             f"{self.out()[-2000:]}\n{self.err()[-2000:]}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()


def launch_world(world: int, argv: list[str], tmp, port: int | None = None,
                 ranks=None) -> list[Proc]:
    """Ranks `ranks` (default all) of a world started by hand, as srun starts its tasks."""
    port = port or free_port()
    procs = []
    for rank in ranks if ranks is not None else range(world):
        env = quiet_env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        procs.append(Proc([sys.executable, SCRIPT, *argv], env, tmp, f"rank{rank}"))
    return procs


def family(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (what must be gone after a kill)."""
    try:
        me = psutil.Process(pid)
        return [me, *me.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def rss_kib(pid: int) -> int:
    """Resident memory of a live process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")
