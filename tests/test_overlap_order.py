"""--overlap-grad-reduce starts each bucket's reduction during backward in one fixed order on
every rank. An MoE layer's backward graph depends on its tokens (packed or padded experts, one
fused GEMM node or several), so which bucket completes first differs between DP ranks; started
as they completed, two ranks paired different buckets' collectives (gloo: "Received data size
doesn't match expected size") at any DP size."""

from __future__ import annotations

import pytest

from harness import run
from test_training import MODEL, logged, pretrain_case

ARGV = MODEL + ("--num-experts 4 --moe-router-topk 2 --expert-interval 2 --moe-ffn-hidden-size 32 "
                "--micro-batch-size 2 --global-batch-size 8 --train-iters 3 --eval-iters 0").split()


@pytest.mark.parametrize("world,flags", [
    (2, "--use-distributed-optimizer --overlap-param-gather"),
    (4, "--expert-model-parallel-size 2 --context-parallel-size 2"),
])
def test_overlapped_reduction_trains_as_the_plain_one(world, flags):
    plain = logged(run(world, pretrain_case, ARGV + flags.split())[0]["printed"], "lm loss")
    over = logged(run(world, pretrain_case, ARGV + flags.split() + ["--overlap-grad-reduce"])[0]
                  ["printed"], "lm loss")
    assert len(plain) == 3 and over == plain


def order_case() -> list:
    """One rank of a world of 2 whose backward completes the buckets in the reverse order of its
    peer's: the buckets each rank started, in order."""
    import torch
    import torch.distributed as dist

    from harness import ted_groups
    from megatron.model.params import set_spec
    from megatron.training.optimizer import Optimizer, OptimizerConfig

    groups = ted_groups(1, 1)
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4, bias=False) for _ in range(4)))
    for p in model.parameters():
        set_spec(p, init="normal", std=0.02)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3, overlap_grad_reduce=True,
                                                   bucket_size=16))
    started = []
    for fg in opt.flat_groups:
        fg.start_reduce = _recording(fg, started, opt)
    opt.expect_gradients(1)
    params = list(model.parameters())
    order = params if dist.get_rank() == 0 else params[::-1]
    for p in order:  # gradients arriving in a rank-dependent order
        p.grad = torch.ones_like(p)
        opt._on_grad(p)
    opt.reduce_gradients()
    return started


def _recording(fg, started: list, opt):
    original = fg.start_reduce

    def start():
        started.append(opt.flat_groups.index(fg))
        original()
    return start


def test_buckets_start_in_the_same_order_whatever_order_they_complete_in():
    first, second = run(2, order_case)
    assert first == second and sorted(first) == [0, 1, 2, 3]
