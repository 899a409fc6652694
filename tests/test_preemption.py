"""Preemption and Ctrl-C, with real processes and real signals: under --exit-signal-handler a
SIGTERM or SIGINT to torchrun (which passes it to each rank's whole process group, data-loader
workers included) ends the run with a checkpoint and status 0; a signal that arrives during
start-up is remembered and honoured at the first iteration; and an error found before training
reaches the log every time, whichever rank exits first. The figures are printed (pytest -s)."""

import os
import re
import signal
import subprocess
import time

import pytest

from procs import ROOT, SCRIPT, TINY, Proc, alive, family, launch_world, quiet_env

ITERATION = r"iteration\s+{}/"
STOPPED = r"> exiting at iteration (\d+): {} received"


def tracker(folder) -> int:
    return int((folder / "latest_checkpointed_iteration.txt").read_text())


def preemptible(save) -> list[str]:
    return [*TINY, "--tensor-model-parallel-size", "2", "--train-iters", "100000",
            "--log-interval", "5", "--num-workers", "2", "--exit-signal-handler",
            "--save", str(save)]


def no_noise(text: str) -> None:
    """No traceback from a rank nor a data-loader worker killed under one (what a lost checkpoint
    looked like). torchrun's own traceback of the signal it got is torchrun's, not a rank's."""
    for bad in ('pretrain_gpt_moe.py", line', "KeyboardInterrupt", "is killed by signal",
                "died or exited"):
        assert bad not in text, text[-3000:]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_torchrun_saves_and_every_rank_exits_0(name, tmp_path):
    argv = ["torchrun", "--standalone", "--nproc-per-node", "2", SCRIPT,
            *preemptible(tmp_path / "ckpt")]
    launcher = Proc(argv, quiet_env(), tmp_path, "torchrun")
    everyone = []
    try:
        launcher.wait_for(ITERATION.format(5), timeout=240)
        everyone = family(launcher.pid)[1:]  # the ranks and their data-loader workers
        sent = time.monotonic()
        os.kill(launcher.pid, getattr(signal, name))
        launcher.popen.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        launcher.kill()
    out, err = launcher.out(), launcher.err()
    stopped = int(re.search(STOPPED.format(name), out)[1])
    assert f"> checkpoint saved at iteration {stopped} in {tmp_path / 'ckpt'}" in out, out
    assert tracker(tmp_path / "ckpt") == stopped
    # torchrun reports a worker that failed; ours all exited 0 (it says nothing about them)
    assert "exitcode" not in err and "FAILED" not in err, err[-3000:]
    no_noise(out + err)
    end = time.monotonic() + 30
    while alive(everyone) and time.monotonic() < end:
        time.sleep(0.1)
    assert alive(everyone) == []
    print(f"\n[figure] {name} to torchrun at iteration >= 5: checkpoint at iteration {stopped}, "
          f"torchrun gone {seconds:.1f} s later (status {launcher.popen.returncode})")


def test_a_signal_during_start_up_is_honoured_at_the_first_iteration(tmp_path):
    """SIGTERM to every rank 1 s after start (the ranks are still importing), as srun's step
    gets it: each remembers it and the run saves at iteration 1 and exits 0."""
    procs = launch_world(2, preemptible(tmp_path / "ckpt"), tmp_path)
    try:
        time.sleep(1.0)
        for proc in procs:
            os.kill(proc.pid, signal.SIGTERM)
        statuses = [proc.popen.wait(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    out = procs[0].out()
    assert statuses == [0, 0], [proc.err()[-2000:] for proc in procs]
    assert re.search(STOPPED.format("SIGTERM"), out)[1] == "1", out
    assert tracker(tmp_path / "ckpt") == 1
    no_noise(out + procs[0].err() + procs[1].err())
    print("\n[figure] SIGTERM 1 s after start: honoured at iteration 1, checkpoint saved, "
          "both ranks exited 0")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "pretrain_gpt_moe.py: error" in line]


REPEATS = 5  # was 20; each launch is a fresh torchrun (a few seconds): CI time


def test_an_error_before_training_reaches_the_log_every_time():
    """torchrun with 2 ranks, REPEATS times: rank 1 finds an error every rank finds (rank 0
    prints it) first, and rank 0 0.5 s later; torchrun kills the other ranks as soon as one
    exits, so the quiet rank must leave last. The printing path is pretrain_gpt_moe.py's own,
    without the imports (tests/fail_before_training.py)."""
    argv = ["torchrun", "--standalone", "--nproc-per-node", "2",
            os.path.join(ROOT, "tests", "fail_before_training.py"), "--late", "0.5"]
    start, printed = time.monotonic(), 0
    for _ in range(REPEATS):
        done = subprocess.run(argv, env=quiet_env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        lines = error_lines(done.stderr)
        printed += len(lines) == 1 and "--global-batch-size 20 is not divisible" in lines[0]
        assert done.returncode == 1 and "exitcode  : 2" in done.stderr, done.stderr[-2000:]
    assert printed == REPEATS
    print(f"\n[figure] the error line was printed once in {printed} of {REPEATS} torchrun launches "
          f"({time.monotonic() - start:.1f} s)")


def test_the_real_batch_size_error_under_torchrun_is_printed_once_and_first():
    argv = ["torchrun", "--standalone", "--nproc-per-node", "2", SCRIPT, *TINY,
            "--train-iters", "2", "--global-batch-size", "5"]
    done = subprocess.run(argv, env=quiet_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    lines = error_lines(done.stderr)
    assert done.returncode == 1 and "exitcode  : 2" in done.stderr, done.stderr[-2000:]
    assert (len(lines) == 1 and done.stderr.lstrip().startswith(lines[0])
            and "--global-batch-size 5 is not divisible" in lines[0]), done.stderr[-2000:]
