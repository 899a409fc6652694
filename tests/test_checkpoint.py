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
from megatron.training import checkpointing as ckpt
from test_training import MODEL, MOE, layout_flags, logged, pretrain_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]  # the last value wins over MODEL's 0
BATCH = ["--micro-batch-size", "2", "--global-batch-size", "8"]


def train(layout, iters, *extra):
    tp, ep, dp = layout
    argv = MODEL + MOE + BATCH + ["--train-iters", str(iters), *extra] + layout_flags(tp, ep, dp)
    return run(tp * dp, pretrain_case, argv)[0]


# ---- exact resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,extra", [((2, 2, 2), []), ((1, 2, 4), ["--use-distributed-optimizer"])])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, layout, extra):
    """20 iterations straight == 10 + save + load + 10, in every printed lm loss (fp32, dropout
    on, tokens dropped at cf 1.0)."""
    flags = DROPOUT + extra
    straight = logged(train(layout, 20, *flags)["printed"], "lm loss")
    first = train(layout, 20, *flags, "--save", str(tmp_path), "--exit-interval", "10")
    second = train(layout, 20, *flags, "--save", str(tmp_path), "--load", str(tmp_path))
    assert "loaded" in second["printed"] and "iteration       11/      20" in second["printed"]
    resumed = logged(first["printed"], "lm loss") + logged(second["printed"], "lm loss")
    assert len(resumed) == 20 and resumed == straight
    assert open(tmp_path / ckpt.TRACKER).read().strip() == "20"


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
            json.dump({"loss": logged(original["printed"], "lm loss"), "valid": original["history"]["valid"]}, f)
    want = json.load(open(save + ".want.json"))
    got = train(layout, 4, *PADDED, "--eval-interval", "4", "--load", save + ".at3")
    assert "RNG states not restored" in got["printed"] or layout == (2, 2, 2)
    assert logged(got["printed"], "lm loss") == pytest.approx(want["loss"], rel=1e-5)
    assert got["history"]["valid"][0][1] == pytest.approx(want["valid"][0][1], rel=1e-5)


def test_stored_tensors_are_the_one_process_model(tmp_path):
    """A checkpoint saved at TP=2, EP=2 holds each expert by global id, SwiGLU halves apart and
    only the real vocabulary rows: exactly the tensors one process initializes."""
    from megatron.model import GPTModel
    from megatron.model.params import stored_tensors
    from harness import ted_groups
    from ted_patches.patch import apply_patches
    from megatron.training.arguments import build_config, parse_args

    argv = MODEL + MOE + BATCH + PADDED + ["--train-iters", "3", "--swiglu"]
    train((2, 2, 2), 3, *argv[len(MODEL + MOE + BATCH):], "--save", str(tmp_path), "--exit-interval", "1")
    stored = ckpt.read_stored_tensors(str(tmp_path))
    cfg = build_config(parse_args(argv), 1, 121)
    groups = ted_groups(1, 1)
    model = GPTModel(cfg.model, groups, seed=cfg.train.seed, init=False)
    apply_patches(model, cfg.moe, seed=cfg.train.seed)
    want = stored_tensors(model, groups)
    assert stored.keys() == want.keys() and stored["embedding.weight"].shape == (121, 32)
    assert "layers.1.mlp.experts.7.w1.gate" in stored and "layers.0.mlp.fc1.weight.up" in stored
    for key, tensor in want.items():  # the first warmup step has lr 0: every weight is where it was
        assert torch.equal(stored[key], tensor), key
