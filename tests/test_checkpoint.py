"""Checkpoints: exact resume, any layout on load, atomic saves, refusing code, bad input
(tier 2: pretrain() in multi-process gloo worlds, as pretrain_gpt_moe.py runs it)."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from harness import run
import megatron.checkpoint as ckpt
from megatron.checkpoint import storage
from test_training import MODEL, MOE, layout_flags, logged, pretrain_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the last value wins over MODEL's 0
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
BATCH = ["--micro-batch-size", "2", "--global-batch-size", "8"]


def train(layout, iters, *extra):
    tp, ep, dp = layout
    argv = MODEL + MOE + BATCH + ["--train-iters", str(iters), *extra] + layout_flags(tp, ep, dp)
    return run(tp * dp, pretrain_case, argv)[0]


# ---- exact resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,extra", [
    ((2, 2, 2), []),
    ((1, 2, 4), ["--use-distributed-optimizer"]),
])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, layout, extra):
    """20 iterations straight, saving at 10 == load of that checkpoint + 10, in every printed lm
    loss (fp32, dropout on, tokens dropped at cf 1.0). (--exit-interval and --load of a --save
    folder: test_a_checkpoint_loads_at_any_layout_and_trains_on.)"""
    flags = DROPOUT + extra
    straight = logged(train(layout, 20, *flags, "--save", str(tmp_path), "--save-interval", "10")
                      ["printed"], "lm loss")
    assert open(tmp_path / ckpt.TRACKER).read().strip() == "20"
    second = train(layout, 20, *flags, "--load", str(tmp_path / "iter_0000010"))
    assert "loaded" in second["printed"] and "iteration       11/      20" in second["printed"]
    resumed = logged(second["printed"], "lm loss")
    assert len(straight) == 20 and len(resumed) == 10 and resumed == straight[10:]


# ---- any layout on load ------------------------------------------------------------------------
PADDED = ["--make-vocab-size-divisible-by", "48"]  # 121 ids pad to 144 at TP 1, 192 at TP 2 and 4


@pytest.mark.parametrize("layout", [(1, 1, 1), (1, 4, 4), (4, 2, 2), (2, 1, 1)])
def test_a_checkpoint_loads_at_any_layout_and_trains_on(tmp_path_factory, layout):
    """Saved at (TP, EP, DP) = (2, 2, 2) after 3 steps; loaded directly at another layout, the 4th
    step's loss (the loaded weights) and the validation loss after it (the loaded optimizer
    state, one AdamW step later) equal the original layout's."""
    save = str(tmp_path_factory.getbasetemp() / "saved_at_2_2_2")
    flags = PADDED + ["--eval-interval", "4", "--save", save]
    if not os.path.exists(save):
        original = train((2, 2, 2), 4, *flags, "--exit-interval", "3")  # saves at 3, exits
        shutil.copytree(save, save + ".at3")
        original = train((2, 2, 2), 4, *PADDED, "--eval-interval", "4", "--load", save + ".at3")
        with open(save + ".want.json", "w") as f:
            json.dump({"loss": logged(original["printed"], "lm loss"),
                       "valid": original["history"]["valid"]}, f)
    want = json.load(open(save + ".want.json"))
    got = train(layout, 4, *PADDED, "--eval-interval", "4", "--load", save + ".at3")
    assert "RNG states not restored" in got["printed"] or layout == (2, 2, 2)
    assert logged(got["printed"], "lm loss") == pytest.approx(want["loss"], rel=1e-5)
    assert got["history"]["valid"][0][1] == pytest.approx(want["valid"][0][1], rel=1e-5)


def test_stored_tensors_are_the_one_process_model(tmp_path):
    """A checkpoint saved at TP=2, EP=2 holds each expert by global id, SwiGLU halves apart and
    only the real vocabulary rows: exactly the tensors one process initializes."""
    from megatron.model.params import stored_tensors
    from harness import ted_groups
    from ted_patches.build import build_model
    from megatron.cli.arguments import parse_args
    from megatron.cli.configs import build_config

    argv = MODEL + MOE + BATCH + PADDED + ["--train-iters", "3", "--swiglu"]
    train((2, 2, 2), 3, *argv[len(MODEL + MOE + BATCH):], "--save", str(tmp_path),
          "--exit-interval", "1")
    stored = ckpt.read_stored_tensors(str(tmp_path))
    cfg = build_config(parse_args(argv), 1, 121)
    groups = ted_groups(1, 1)
    model = build_model(cfg.model, cfg.moe, groups, seed=cfg.train.seed)
    want = stored_tensors(model, groups)
    assert stored.keys() == want.keys() and stored["embedding.weight"].shape == (121, 32)
    assert "layers.1.mlp.experts.7.w1.gate" in stored and "layers.0.mlp.fc1.weight.up" in stored
    for key, tensor in want.items():  # the first warmup step has lr 0: every weight is where it was
        assert torch.equal(stored[key], tensor), key


# ---- atomic saves --------------------------------------------------------------------------------
ONE_PROCESS = [sys.executable] + MODEL + MOE + BATCH  # argv tail for pretrain_gpt_moe.main, world 1


def _launch(*argv, point=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    script = ([os.path.join(ROOT, "tests", "kill_during_save.py"), point] if point
              else [os.path.join(ROOT, "pretrain_gpt_moe.py")])
    return subprocess.Popen([sys.executable, *script, *MODEL, *MOE, *BATCH, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _loads(save: str) -> int:
    """The iteration the latest checkpoint resumes at, after reading all of it back."""
    meta = ckpt.read_checkpoint_meta(save)
    assert ckpt.read_stored_tensors(save)["embedding.weight"].shape == (121, 32)
    return meta["iteration"]


def test_a_kill_at_any_point_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    """A real process SIGKILLed at each point of its second save (every iteration saves), and
    one killed after a random delay: the latest checkpoint always loads whole."""
    import random

    points = ["start", "written", "rename", "tracker"]
    procs = {p: _launch("--train-iters", "4", "--save-interval", "1", "--save", str(tmp_path / p),
                        point=p) for p in points}
    delayed = _launch("--train-iters", "400", "--save-interval", "1", "--save",
                      str(tmp_path / "random"))
    for point, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == -9, err[-2000:]
        assert _loads(str(tmp_path / point)) == 1, point  # the first checkpoint
    while not os.path.exists(tmp_path / "random" / ckpt.TRACKER):
        assert delayed.poll() is None, delayed.communicate()[1][-2000:]
    import time

    time.sleep(random.uniform(0.0, 2.0))
    delayed.kill()
    delayed.communicate(timeout=60)
    iteration = _loads(str(tmp_path / "random"))
    assert iteration >= 1
    resumed = _launch("--train-iters", "400", "--exit-interval", str(iteration + 1),
                      "--load", str(tmp_path / "random"))
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0 and f"iteration {iteration + 1:8d}/" in out, err[-2000:]


# ---- loading never runs code ---------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _small_checkpoint(path) -> str:
    from megatron.model.params import stored_tensors
    from harness import ted_groups
    from ted_patches.build import build_model
    from util import tiny_model_config

    groups = ted_groups(1, 1)
    cfg = tiny_model_config()
    model = build_model(cfg, None, groups, seed=3)
    meta = {"model": ckpt.config_dict(cfg), "moe": None,
            "tokenizer": {"tokenizer_type": "NullTokenizer", "vocab_size": 95}}
    return ckpt.write_model_checkpoint(str(path), stored_tensors(model, groups), meta)


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    folder = _small_checkpoint(tmp_path / "ck")
    assert ckpt.read_stored_tensors(folder)["embedding.weight"].shape == (96, 32)  # benign: loads
    marker = tmp_path / "pwned"
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(ckpt.CheckpointError, match="refusing to unpickle"):
        ckpt.read_checkpoint_meta(folder)
    torch.save({"torch": _Payload(marker)}, os.path.join(folder, "rng", "rank_00000.pt"))
    with pytest.raises(ckpt.CheckpointError, match="not plain data; refused"):
        ckpt.read_rng_file(folder, 0)
    assert not marker.exists()


# ---- bad input -----------------------------------------------------------------------------------
def _preflight(argv, capsys, monkeypatch) -> tuple[int, str]:
    import pretrain_gpt_moe

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    try:
        pretrain_gpt_moe.load_config(MODEL + MOE + BATCH + ["--train-iters", "3"] + argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_bad_checkpoints_are_errors_before_training(tmp_path, capsys, monkeypatch):
    save = str(tmp_path / "run")
    train((1, 1, 1), 3, "--save", save)
    folder = ckpt.iteration_dir(save, 3)
    assert _preflight(["--load", save], capsys, monkeypatch)[0] == 0  # whole: fine
    code, err = _preflight(["--load", save, "--hidden-size", "64"], capsys, monkeypatch)
    assert code == 2 and "model hidden_size = 32, the flags give 64" in err, err
    code, err = _preflight(["--load", save, "--num-experts", "4"], capsys, monkeypatch)
    assert code == 2 and "num_experts = 8, the flags give 4" in err, err
    code, err = _preflight(["--load", save, "--lr", "5e-3"], capsys, monkeypatch)
    assert (code == 2 and "max_lr 0.001 -> 0.005" in err
            and "--override-opt_param-scheduler" in err), err
    assert _preflight(["--load", save, "--lr", "5e-3", "--override-opt_param-scheduler"], capsys,
                      monkeypatch)[0] == 0
    data = next(f for f in os.listdir(folder) if f.endswith(".distcp"))
    os.truncate(os.path.join(folder, data), 100)
    code, err = _preflight(["--load", save], capsys, monkeypatch)
    assert code == 2 and f"{os.path.join(folder, data)} is truncated" in err, err
    os.remove(os.path.join(folder, data))
    code, err = _preflight(["--load", save], capsys, monkeypatch)
    assert code == 2 and f"{os.path.join(folder, data)} is missing" in err, err
    os.remove(os.path.join(folder, ckpt.META))
    code, err = _preflight(["--load", save], capsys, monkeypatch)
    assert code == 2 and "ted_checkpoint.json is missing" in err, err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a checkpoint")
    code, err = _preflight(["--load", str(tmp_path / "notes")], capsys, monkeypatch)
    assert code == 2 and "holds files but no checkpoint" in err, err
    blocked = tmp_path / "file"
    blocked.write_text("")
    code, err = _preflight(["--save", str(blocked / "ck")], capsys, monkeypatch)
    assert code == 2 and "--save" in err and "not a writable directory" in err, err


def test_a_mismatched_tensor_names_itself_and_both_shapes(tmp_path):
    folder = _small_checkpoint(tmp_path / "ck")
    meta = json.load(open(os.path.join(folder, ckpt.META)))
    stored = ckpt.read_stored_tensors(folder)
    stored["layers.0.mlp.fc2.weight"] = torch.zeros(32, 48)
    ckpt.write_model_checkpoint(str(tmp_path / "bad"), stored, meta)
    parts = {"model.layers.0.mlp.fc2.weight": ckpt.Parts((32, 64), {(0, 0): torch.empty(32, 64)})}
    with pytest.raises(ckpt.CheckpointError,
                       match=r"layers.0.mlp.fc2.weight has shape \(32, 48\) in the checkpoint "
                             r"but \(32, 64\) in the model"):
        storage.dcp_load(parts, ckpt.iteration_dir(str(tmp_path / "bad"), 0), None)


def test_load_of_nothing_starts_from_scratch_and_changes_are_warned(tmp_path):
    empty = train((1, 1, 1), 3, "--load", str(tmp_path / "nowhere"), "--save",
                  str(tmp_path / "run"))
    assert (f"WARNING: no checkpoint in --load {tmp_path / 'nowhere'}: training from scratch"
            in empty["printed"])
    resumed = train((1, 1, 1), 5, "--load", str(tmp_path / "run"), "--global-batch-size", "4",
                    "--override-opt_param-scheduler")
    assert "--global-batch-size 8, now 4" in resumed["printed"]
    assert "consumed samples:           32 |" in resumed["printed"]  # 3 x 8, then 2 x 4


def test_async_save_equals_a_blocking_save_and_finetune_starts_over(tmp_path):
    train((1, 2, 2), 3, "--save", str(tmp_path / "sync"), "--use-distributed-optimizer")
    train((1, 2, 2), 3, "--save", str(tmp_path / "async"), "--async-save",
          "--use-distributed-optimizer")
    for state in ("model", "exp_avg", "exp_avg_sq"):
        a, b = (ckpt.read_stored_tensors(str(tmp_path / d), state) for d in ("sync", "async"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), state
    tuned = train((1, 1, 1), 3, "--load", str(tmp_path / "async"), "--finetune")
    assert ("optimizer state not loaded" in tuned["printed"]
            and "iteration        1/       3" in tuned["printed"])


def test_a_non_finite_loss_stops_training_naming_the_iteration_and_the_last_checkpoint(tmp_path):
    from megatron.training.optimizer import NonFiniteError

    with pytest.raises(RuntimeError) as err:  # the harness re-raises the rank's NonFiniteError
        train((1, 1, 1), 30, "--lr", "1e6", "--lr-warmup-iters", "0", "--save", str(tmp_path),
              "--save-interval", "1")
    message = (str(err.value).splitlines()[-1] if not isinstance(err.value, NonFiniteError)
               else str(err.value))
    assert ("training stopped before the update" in message
            and f"{tmp_path}/iter_" in message), message
    assert "iteration 1:" not in message  # the first steps were finite and saved
    regardless = train((1, 1, 1), 6, "--lr", "1e6", "--lr-warmup-iters", "0",
                       "--no-check-for-nan-in-loss-and-grad")
    assert "number of nan iterations:   1" in regardless["printed"]


def raising_case_keeps_signal(argv):
    """pretrain_case under a handler of our own for SIGTERM: training raises, and the handler that
    --exit-signal-handler replaced is back afterwards."""
    import signal

    def ours(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        pretrain_case(argv)
    except Exception as e:  # noqa: BLE001 (the case reports what it raised)
        raised = type(e).__name__
    else:
        raised = None
    finally:
        restored = signal.getsignal(signal.SIGTERM) is ours
        signal.signal(signal.SIGTERM, previous)
    return {"raised": raised, "restored": restored}


def test_the_signal_handler_is_given_back_when_training_raises():
    argv = MODEL + MOE + BATCH + ["--train-iters", "30", "--lr", "1e6", "--lr-warmup-iters", "0",
                                  "--exit-signal-handler"] + layout_flags(1, 1, 1)
    assert run(1, raising_case_keeps_signal, argv)[0] == {"raised": "NonFiniteError",
                                                          "restored": True}


# ---- leaving early: a signal, a duration ---------------------------------------------------------
def signalled_case(argv, delay: float):
    """pretrain_case, with rank 1 sending itself SIGTERM after `delay` seconds of training."""
    import signal
    import threading

    if torch.distributed.get_rank() == 1:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
    out = pretrain_case(argv)
    return out if out is not None else "rank 1 returned"


def test_a_signal_on_one_rank_saves_and_exits_on_every_rank_at_the_same_step(tmp_path):
    argv = MODEL + MOE + BATCH + ["--train-iters", "400", "--save", str(tmp_path),
                                  "--exit-signal-handler"]
    # a return from both: no rank hangs
    out = run(2, signalled_case, argv + layout_flags(1, 2, 2), 3.0)
    assert out[1] == "rank 1 returned"
    printed = out[0]["printed"]
    stopped = int(printed.split("> exiting at iteration ")[1].split(":")[0])
    assert "SIGTERM received" in printed and 1 <= stopped < 400
    assert ckpt.read_checkpoint_meta(str(tmp_path))["iteration"] == stopped


def test_exit_duration_and_interval_save_and_stop(tmp_path):
    late = train((1, 1, 1), 50, "--save", str(tmp_path / "late"),
                 "--exit-duration-in-mins", "0.00001")
    assert "--exit-duration-in-mins 1e-05 reached" in late["printed"]
    assert ckpt.read_checkpoint_meta(str(tmp_path / "late"))["iteration"] == 1
    early = train((1, 1, 1), 50, "--exit-interval", "4")
    assert "> exiting at iteration 4: --exit-interval 4 reached" in early["printed"]
