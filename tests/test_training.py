"""The training stack end to end (tier 2): pretrain() through the same path as
pretrain_gpt_moe.py, on mock data, in multi-process gloo worlds; what it prints is what is checked.
"""

import contextlib
import functools
import io
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from harness import run, ted_groups
from megatron.cli.arguments import parse_args
from megatron.cli.configs import build_config, tokenizer_kwargs
from megatron.launch.initialize import set_seed
from megatron.data.tokenizer import build_tokenizer
from megatron.training.training import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
         "--seq-length 16 --mock-data --vocab-size 120 --make-vocab-size-divisible-by 8 "
         "--hidden-dropout 0 --attention-dropout 0 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine "
         "--lr-warmup-iters 2 --adam-eps 1e-6 --seed 5 --log-interval 1 --eval-interval 5 "
         "--eval-iters 2 --num-workers 0").split()
MOE = "--num-experts 8 --moe-router-topk 2 --expert-interval 2 --moe-z-loss-coeff 0.001".split()


def pretrain_case(argv: list[str]) -> dict | None:
    """Parse argv like pretrain_gpt_moe.py does and train; rank 0 returns what it printed."""
    args = parse_args(argv)
    groups = ted_groups(args.tensor_model_parallel_size, args.expert_model_parallel_size,
                        args.pipeline_model_parallel_size, args.expert_tensor_parallel_size,
                        args.sequence_parallel, args.context_parallel_size)
    tokenizer = build_tokenizer(**tokenizer_kwargs(args))
    cfg = build_config(args, torch.distributed.get_world_size(), tokenizer.vocab_size)
    set_seed(cfg.train.seed)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        history = pretrain(cfg, tokenizer, groups, torch.device("cpu"))
    return ({"printed": printed.getvalue(), "history": history}
            if torch.distributed.get_rank() == 0 else None)


def logged(printed: str, key: str) -> list[float]:
    """Values of `key: %E` from the iteration lines."""
    return [float(v) for v in re.findall(rf"\| {key}: ([-+0-9.E]+) \|", printed)]


def layout_flags(tp, ep, dp):
    return ["--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep)]


@functools.cache
def reference_run(extra: tuple) -> dict:
    return pretrain_case(MODEL + MOE + list(extra))


E2E = ("--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "10")


@pytest.mark.parametrize("tp,ep,dp", [(2, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 4)])
def test_printed_lm_loss_equals_single_process_at_every_layout(tp, ep, dp):
    ref = reference_run(E2E)
    got = run(tp * dp, pretrain_case, MODEL + MOE + list(E2E) + layout_flags(tp, ep, dp))[0]
    want_loss, got_loss = logged(ref["printed"], "lm loss"), logged(got["printed"], "lm loss")
    assert len(want_loss) == len(got_loss) == 10
    for a, b in zip(got_loss, want_loss):
        assert abs(a - b) <= 1e-5 * abs(b), f"{got_loss} != {want_loss}"
    for a, b in zip(logged(got["printed"], "moe aux loss"), logged(ref["printed"], "moe aux loss")):
        assert abs(a - b) <= 1e-5 * abs(b)
    got_valid, want_valid = zip(*got["history"]["valid"]), zip(*ref["history"]["valid"])
    (got_at, got_loss), (want_at, want_loss) = got_valid, want_valid
    assert got_at == want_at and got_loss == pytest.approx(want_loss, rel=1e-5)


def test_log_line_has_megatrons_fields():
    line = next(l for l in reference_run(E2E)["printed"].splitlines()
                if "iteration" in l and "lm loss" in l)
    for field in ("iteration        1/      10", "consumed samples:",
                  "elapsed time per iteration (ms):", "learning rate:", "lm loss:", "moe aux loss:",
                  "grad norm:", "tokens per second:", "TFLOP/s per device:", "ETA:"):
        assert field in line, field
    assert re.search(r"lm loss: \d\.\d{6}E[+-]\d\d", line)
    assert "validation loss at iteration 5" in reference_run(E2E)["printed"]


def test_gradient_accumulation_equals_a_bigger_micro_batch():
    """Micro-batch 2 x 2 accumulation steps == micro-batch 4, in no-drop mode. The aux and z losses
    are per micro-batch (a mean of per-micro-batch balance terms is not the balance of their
    union), so they are off here; the LM loss is a per-token mean over equal-size micro-batches."""
    common = ["--global-batch-size", "4", "--train-iters", "6", "--disable-moe-token-dropping",
              "--moe-aux-loss-coeff", "0", "--moe-z-loss-coeff", "0"]
    accumulated = pretrain_case(MODEL + MOE + common + ["--micro-batch-size", "2"])
    single = pretrain_case(MODEL + MOE + common + ["--micro-batch-size", "4"])
    a, b = logged(accumulated["printed"], "lm loss"), logged(single["printed"], "lm loss")
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("precision", [["--bf16"], ["--fp16", "--initial-loss-scale", "1024"]])
def test_half_precision_stays_near_the_fp32_curve(precision):
    """bf16 / fp16 (loss scaling, fp32 master weights) over 8 steps stay within 2% of fp32."""
    flags = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8",
             "--lr", "3e-3"]
    fp32 = logged(pretrain_case(MODEL + MOE + flags)["printed"], "lm loss")
    got = logged(pretrain_case(MODEL + MOE + flags + precision)["printed"], "lm loss")
    assert len(got) == 8 and all(math.isfinite(v) for v in got)
    assert max(abs(a - b) / b for a, b in zip(got, fp32)) < 0.02, (got, fp32)
    assert got[-1] < got[0]


def test_bf16_across_ranks_stays_near_the_single_process_fp32_curve():
    """bf16 at TP=2 x EP=2 x DP=2 (bf16 activations through DTD and the all-to-alls, fp32 gradient
    reduction): within 2% of one fp32 process."""
    flags = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
             "--lr", "3e-3"]
    fp32 = logged(pretrain_case(MODEL + MOE + flags)["printed"], "lm loss")
    got = run(4, pretrain_case, MODEL + MOE + flags + ["--bf16"] + layout_flags(2, 2, 2))[0]
    bf16 = logged(got["printed"], "lm loss")
    assert len(bf16) == 6 and max(abs(a - b) / b for a, b in zip(bf16, fp32)) < 0.02, (bf16, fp32)


def test_fp16_overflow_skips_steps_and_backs_off_the_scale():
    """Starting at 2^40 every step overflows: it is skipped (no update, no loss value) and the
    scale halves each time (hysteresis 1) until steps go through."""
    flags = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "30", "--fp16",
             "--initial-loss-scale", str(2.0**40), "--hysteresis", "1"]
    printed = pretrain_case(MODEL + MOE + flags)["printed"]
    skipped = [int(v) for v in re.findall(r"number of skipped iterations: +(\d+)", printed)]
    scales = [float(v) for v in re.findall(r"loss scale: ([0-9.]+)", printed)]
    assert skipped[0] == 1 and 10 <= sum(skipped) < 30
    assert scales[0] == 2.0**40 and scales[-1] < 2.0**30
    losses = logged(printed, "lm loss")
    assert len(losses) == 30 - sum(skipped) and all(math.isfinite(v) for v in losses)
    lrs = [float(v) for v in re.findall(r"learning rate: ([0-9.E+-]+)", printed)]
    for i in range(len(lrs) - 1):  # a skipped step does not advance the learning-rate schedule
        if skipped[i]:
            assert lrs[i + 1] == lrs[i]
    assert lrs[-1] > lrs[0]


def test_quickstart_short_run_learns(tmp_path):
    """The README's first command, shortened (30 iterations), in this environment."""
    env = dict(os.environ, TED_VENV=sys.prefix, TED_QUICKSTART_DIR=str(tmp_path))
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), "--short"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    valid = [float(v) for v in re.findall(
        r"validation loss at iteration \d+ \| lm loss value: ([0-9.E+-]+)", done.stdout)]
    assert len(valid) == 3 and valid[-1] < valid[0] - 0.3, valid
    assert valid[-1] < math.log(4096) - 1.5  # far below an untrained model's ~ln(vocab)
    assert "quickstart outputs in" in done.stdout
    assert (tmp_path / "checkpoints" / "iter_0000030").is_dir()
    sample = (tmp_path / "sample.txt").read_text()
    assert sample.startswith("ROMEO:") and len(sample.split()) > 5, sample


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
             "--tensorboard-dir", str(tmp_path / "tb")]
    pretrain_case(MODEL + MOE + flags)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm-loss", "moe-aux-loss", "grad-norm", "learning-rate", "lm-loss validation"} <= tags
    assert [e.step for e in events.Scalars("lm-loss")] == [1, 2, 3, 4]


def test_vocabulary_padding_does_not_change_the_model():
    """--vocab-size 512 (513 ids with EOD) pads to 640 at TP=1, 768 at TP=2 and 1024 at TP=4: the
    real rows are drawn alike and the padded logits are masked, so the printed losses agree."""
    # the last value wins
    flags = MODEL + MOE + list(E2E[:4]) + ["--train-iters", "4", "--vocab-size", "512",
                                           "--make-vocab-size-divisible-by", "128"]
    ref = logged(pretrain_case(flags)["printed"], "lm loss")
    for tp in (2, 4):
        got = logged(run(tp, pretrain_case, flags + layout_flags(tp, 1, 1))[0]["printed"],
                     "lm loss")
        assert len(got) == len(ref) == 4
        assert got == pytest.approx(ref, rel=1e-6), (tp, got, ref)
