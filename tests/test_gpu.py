"""GPU smoke tests (tier 3): skipped without a GPU. The same code path as on CPUs, with NCCL."""

import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pretrain_argv(*extra) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"),
            "--distributed-backend", "nccl", "--num-layers", "4", "--hidden-size", "256",
            "--num-attention-heads", "8", "--seq-length", "256", "--micro-batch-size", "8",
            "--global-batch-size", "16", "--train-iters", "10", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "1000", "--num-experts", "8", "--moe-router-topk", "2",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1",
            "--eval-interval", "10", "--eval-iters", "1", *extra]


def _losses(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", stdout)]


def test_bf16_gpt_moe_trains_on_one_gpu():
    """One process (NCCL initialized, its collectives over groups of one are identities): the CUDA
    code path of the model, bf16 with fp32 master weights, recompute with CAC, ZeRO-1, tiling."""
    argv = _pretrain_argv("--bf16", "--train-iters", "30", "--log-interval", "10",
                          "--eval-interval", "30",
                          "--recompute-granularity", "full", "--recompute-method", "uniform",
                          "--use-distributed-optimizer", "--optimizer-tile-size", "100000")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, WORLD_SIZE="1", RANK="0"))
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _losses(done.stdout)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_moe_layer_forward_backward_on_gpu_matches_cpu():
    from megatron.model import ModelConfig
    from megatron.model.params import init_parameters
    from harness import ted_groups
    from ted_patches.config import MoEConfig
    from ted_patches.moe_layer import MoELayer

    groups = ted_groups(1, 1)
    mcfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                       vocab_size=64, max_position_embeddings=8, hidden_dropout=0.0,
                       attention_dropout=0.0)
    cfg = MoEConfig(num_experts=8, layers=(0,), topk=2)
    results = []
    for device in ("cpu", "cuda"):
        holder = torch.nn.Module()
        holder.moe = MoELayer(mcfg, cfg, groups)
        init_parameters(holder, 3, groups)
        holder.to(device)
        x = torch.randn(4, 32, 64,
                        generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
        y, aux = holder.moe(x)
        (y.square().sum() + aux.loss).backward()
        results.append((y.detach().cpu(), x.grad.cpu(), holder.moe.experts.w1.grad.cpu()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_two_gpus_over_nccl_equal_one(tp, ep):
    """TP=2 (DTD's all-gather / reduce-scatter over NCCL) and EP=2 (the all-to-all) against one GPU,
    fp32: the same printed losses within 1e-3 (GPU kernels may reorder sums by layout)."""
    one = subprocess.run(_pretrain_argv(), capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, WORLD_SIZE="1", RANK="0"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", *_pretrain_argv(
        "--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep))[1:]],
        capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(two.stdout), _losses(one.stdout)
    assert len(a) == len(b) == 10 and max(abs(x - y) / y for x, y in zip(a, b)) < 1e-3
