"""Evaluation under every pipeline schedule: the validation and test losses equal one process's.
(torch's ZBV and DualPipeV schedules run backward actions in eval mode and fail; those two
evaluate through megatron.training.pipeline.Pipeline._forward_only.)"""

from __future__ import annotations

import functools
import re

import pytest

from harness import run
from test_training import MODEL, logged, pretrain_case

ARGV = MODEL + ("--num-experts 4 --moe-router-topk 2 --expert-interval 2 --moe-ffn-hidden-size 32 "
                "--micro-batch-size 2 --global-batch-size 8 --train-iters 2 --eval-interval 2 "
                "--num-layers 4 --lr-warmup-iters 1").split()


@functools.cache
def one_process() -> str:
    return run(1, pretrain_case, ARGV)[0]["printed"]


def evaluations(printed: str) -> list[float]:
    return [float(v) for v in re.findall(r"(?:validation|test) loss at iteration \d+ \| lm loss "
                                         r"value: ([-+0-9.E]+)", printed)]


@pytest.mark.parametrize("world,flags", [
    (2, "--pipeline-schedule zbv"),
    (2, "--pipeline-schedule dualpipev"),
    (4, "--pipeline-schedule zbv --context-parallel-size 2"),
])
def test_evaluation_under_the_v_schedules_equals_one_process(world, flags):
    ref = one_process()
    got = run(world, pretrain_case, ARGV + ["--pipeline-model-parallel-size", "2"]
              + flags.split())[0]["printed"]
    want, have = evaluations(ref), evaluations(got)
    assert len(want) == len(have) == 2, got[-2000:]  # validation at iteration 2, then test
    for a, b in zip(have, want):
        assert abs(a - b) <= 1e-5 * abs(b), (have, want)
    for a, b in zip(logged(got, "lm loss"), logged(ref, "lm loss")):
        assert abs(a - b) <= 1e-5 * abs(b)
