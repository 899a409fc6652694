"""Checkpoints as a cluster treats them (issue 22), each fault made real: processes killed with
SIGKILL at a save's edges, bytes flipped in a stored tensor, two runs on one folder, a full disk
(a small tmpfs where mounting works, an injected ENOSPC always), retention, and the flags."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import megatron.checkpoint as ckpt
from megatron.checkpoint import storage
from megatron.checkpoint.guards import LOCK
from test_checkpoint import BATCH, _launch, _loads, _preflight, train
from test_training import MODEL, MOE

LONG = ["--train-iters", "400", "--log-interval", "1"]


def _until(proc, text: str, timeout: float = 240) -> str:
    """Read proc's stdout until a line holds `text`; what was read."""
    seen, end = [], time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never printed {text!r}:\n{''.join(seen)[-3000:]}"
                         f"{proc.communicate()[1][-3000:]}")


def _finish(proc, timeout: float = 240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ---- 1. an async save commits as soon as it is written ------------------------------------------
def test_an_async_save_is_latest_once_written_and_a_kill_before_the_next_keeps_it(tmp_path):
    """Saves every 50 iterations in the background: SIGKILL right after the first says it is
    saved (long before the second starts): the requeue resumes from iteration 50."""
    save = str(tmp_path / "run")
    proc = _launch(*LONG, "--async-save", "--save-interval", "50", "--save", save)
    printed = _until(proc, "checkpoint saved at iteration 50 (async, ")
    proc.send_signal(signal.SIGKILL)
    _finish(proc, 60)
    assert "iteration      100/" not in printed
    assert open(os.path.join(save, ckpt.TRACKER)).read().strip() == "50"
    assert _loads(save) == 50
    resumed = _launch("--train-iters", "52", "--log-interval", "1", "--save", save, "--load", save,
                      "--override-opt_param-scheduler")
    code, out, err = _finish(resumed)
    assert code == 0 and "iteration       51/" in out and "(iteration 50," in out, err[-2000:]


# ---- 2. a kill in the first save, then a requeue -------------------------------------------------
@pytest.mark.parametrize("point", ["start", "written"])
def test_a_kill_in_the_first_save_then_a_requeue_trains(tmp_path, point):
    """The first save (iteration 2) killed with its iter_0000002.tmp half or wholly written and
    no tracker: the requeue, with the same --save and --load, warns once and trains from scratch,
    and its first save removes the leftover."""
    save = str(tmp_path / "run")
    killed = _spawn(point, "--train-iters", "4", "--save-interval", "2", "--save", save,
                    "--load", save, KILL_AT_SAVE="1")
    assert _finish(killed)[0] == -9
    assert os.listdir(save) and os.path.isdir(os.path.join(save, "iter_0000002.tmp"))
    requeued = _launch("--train-iters", "3", "--save-interval", "3", "--save", save, "--load", save)
    code, out, err = _finish(requeued)
    assert code == 0, err[-2000:]
    assert out.count(f"WARNING: no checkpoint in --load {save}: training from scratch") == 1, out
    assert "iteration        1/" in out
    assert sorted(e for e in os.listdir(save) if e.startswith("iter_")) == ["iter_0000003"]
    assert _loads(save) == 3


def _spawn(point: str, *argv, **env) -> subprocess.Popen:
    """tests/kill_during_save.py at `point` with the tests' model and `argv`, one process."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_during_save.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", **env)
    return subprocess.Popen([sys.executable, script, point, *MODEL, *MOE, *BATCH, *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- 3. integrity --------------------------------------------------------------------------------
def _flip(folder: str, tensor: str) -> str:
    """XOR four bytes in the middle of `tensor`'s first stored chunk; the file's path."""
    metadata = storage.SafeReader(folder).read_metadata()
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == tensor)
    path = os.path.join(folder, info.relative_path)
    with open(path, "r+b") as f:
        f.seek(info.offset + info.length // 2)  # in the data, not in torch.save's zip records
        data = bytearray(f.read(4))
        f.seek(info.offset + info.length // 2)
        f.write(bytes(b ^ 0x5A for b in data))
    return path


def test_flipped_bytes_in_a_stored_tensor_are_refused_naming_file_and_tensor(tmp_path):
    save = str(tmp_path / "run")
    code, out, err = _finish(_launch("--train-iters", "6", "--exit-interval", "3", "--save",
                                     save))
    assert code == 0 and "checkpoint saved at iteration 3" in out, err[-2000:]
    tensor = "model.layers.0.attention.qkv.weight"
    path = _flip(ckpt.iteration_dir(save, 3), tensor)
    # both only read the checkpoint: started together (CI time)
    resumed = _launch("--train-iters", "6", "--load", save)
    unchecked = _launch("--train-iters", "6", "--load", save, "--no-verify-checkpoint")
    code, out, err = _finish(resumed)
    assert code == 2 and "iteration " not in out, (out[-2000:], err[-2000:])
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and path in lines[0] and tensor in lines[0], err[-2000:]
    assert "--no-verify-checkpoint" in lines[0] and "Traceback" not in err
    with pytest.raises(ckpt.CheckpointError, match=tensor):
        ckpt.read_stored_tensors(save)  # the tools' one-process reader checks too
    code, out, err = _finish(unchecked)
    assert code == 0 and "checksums not verified: --no-verify-checkpoint" in out, err[-2000:]


# ---- 4. one writer per --save --------------------------------------------------------------------
def test_two_runs_on_one_folder_the_second_is_refused_and_a_killed_holder_frees_it(tmp_path):
    save = str(tmp_path / "run")
    first = _launch(*LONG, "--save-interval", "1000", "--save", save)
    _until(first, "iteration        2/")  # past the join: it holds the lock
    second = _launch("--train-iters", "3", "--save", save)
    code, out, err = _finish(second)
    assert code == 2, err[-2000:]
    want = f"--save {save} is in use by another run (pid {first.pid} on {socket.gethostname()})"
    assert want in err and err.count("error") == 1, err[-2000:]
    first.send_signal(signal.SIGKILL)  # the kernel drops the lock with the process
    _finish(first, 60)
    third = _launch("--train-iters", "3", "--save", save)
    code, out, err = _finish(third)
    assert code == 0 and "checkpoint saved at iteration 3" in out, err[-2000:]
    assert LOCK in os.listdir(save) and ckpt.find_checkpoint(save).endswith("iter_0000003")


# ---- 5. a full disk ------------------------------------------------------------------------------
@pytest.mark.parametrize("async_save", [False, True])
def test_an_out_of_space_write_is_one_line_exit_1_and_the_previous_checkpoint_loads(tmp_path,
                                                                                    async_save):
    save = str(tmp_path / "run")
    argv = ["--train-iters", "4", "--save-interval", "1", "--save", save]
    argv += ["--async-save"] if async_save else []
    proc = _spawn("enospc", *argv)
    code, out, err = _finish(proc)
    assert code == 1, err[-2000:]
    said = [line for line in (out + err).splitlines() if line.startswith(("error", "pretrain"))]
    assert said and all(f"not enough space in {save} for checkpoint 2" in s for s in said), said
    assert "no space left" in said[0] and "Traceback" not in err and len(said[0]) < 400
    assert _loads(save) == 1 and not os.path.exists(ckpt.iteration_dir(save, 2) + ".tmp")


def test_a_save_that_cannot_fit_stops_before_writing(tmp_path):
    """A 1.5 MB tmpfs holds the first checkpoint (~1 MB) but not a second: the run stops before
    writing it, exit 1, the first intact (skipped where tmpfs cannot be mounted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); "
                    "the injected ENOSPC test covers the write path")
    try:
        save = str(disk / "run")
        code, out, err = _finish(_launch("--train-iters", "4", "--save-interval", "2", "--save",
                                         save))
        assert code == 1, err[-2000:]
        assert f"error: not enough space in {save} for checkpoint 4 (needs 0.000" in err, err
        assert "GB free)" in err and "Traceback" not in err
        assert os.listdir(save) and _loads(save) == 2
    finally:
        subprocess.run(["umount", str(disk)])


# ---- 6. retention --------------------------------------------------------------------------------
def test_save_retain_interval_keeps_multiples_and_the_latest(tmp_path):
    save = str(tmp_path / "run")
    train((1, 1, 1), 9, "--save", save, "--save-interval", "2", "--save-retain-interval", "4")
    kept = sorted(e for e in os.listdir(save) if e.startswith("iter_"))
    assert kept == ["iter_0000004", "iter_0000008", "iter_0000009"], kept
    assert _loads(save) == 9


# ---- 7. small items ------------------------------------------------------------------------------
def test_a_garbage_tracker_is_named(tmp_path, capsys, monkeypatch):
    save = tmp_path / "run"
    save.mkdir()
    (save / ckpt.TRACKER).write_bytes(b"\xff\xfe\x00garbage")
    code, err = _preflight(["--load", str(save)], capsys, monkeypatch)
    assert code == 2 and f"{save / ckpt.TRACKER} is unreadable" in err, err


def test_ckpt_format_torch_is_a_notice_and_fsdp_dtensor_an_error(capsys, monkeypatch):
    import pretrain_gpt_moe

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "100"]
    cfg, _ = pretrain_gpt_moe.load_config(base + ["--ckpt-format", "torch"])
    assert [n for n in cfg.notices if "--ckpt-format torch" in n] == [
        "--ckpt-format torch: checkpoints are written as torch_dist (torch.distributed.checkpoint, "
        "layout-free: loadable at any TP/EP/DP)"]
    with pytest.raises(SystemExit) as exit_info:
        pretrain_gpt_moe.load_config(base + ["--ckpt-format", "fsdp_dtensor"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "use --ckpt-format torch_dist" in err, err
    cfg, _ = pretrain_gpt_moe.load_config(base + ["--verify-integrity"])
    assert cfg.checkpoint.verify
    cfg, _ = pretrain_gpt_moe.load_config(base + ["--no-verify-checkpoint"])
    assert not cfg.checkpoint.verify


def test_leftovers_never_hide_a_committed_checkpoint(tmp_path):
    """A committed checkpoint beside a newer, unfinished .tmp (no tracker): the committed one."""
    save = tmp_path / "run"
    train((1, 1, 1), 3, "--save", str(save))
    os.remove(save / ckpt.TRACKER)
    shutil.copytree(save / "iter_0000003", save / "iter_0000005.tmp")
    assert ckpt.find_checkpoint(str(save)).endswith("iter_0000003")
