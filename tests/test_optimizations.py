"""The paper's optimizations leave the numbers unchanged (tier 2): recompute with and without
CAC, ZeRO-1 and the tiled optimizer step; CAC's all-to-all count and ZeRO's state bytes."""

import dataclasses
import functools

import pytest
import torch

from harness import run, ted_groups
from megatron.model.config import RecomputeConfig
from megatron.training.optimizer import Optimizer, OptimizerConfig
from megatron.training.forward_backward import forward_backward, train_step
from ted_patches.config import moe_layer_indices
from ted_patches.build import build_model
from util import (PARAM_FLOOR, assert_close_dicts, full_tensors, my_microbatches,
                  tiny_model_config, tiny_moe_config)

SEQ, MBS, MICRO = 16, 2, 2
RECOMPUTE = {
    "none": RecomputeConfig(),
    "full": RecomputeConfig("full", "uniform", 1, cac=False),
    "full+cac": RecomputeConfig("full", "uniform", 1, cac=True),
    "block+cac": RecomputeConfig("full", "block", 2, cac=True),
    "selective": RecomputeConfig("selective"),
}


def build(groups, recompute: RecomputeConfig, layers=4, dropout=0.0):
    mcfg = tiny_model_config(num_layers=layers, hidden_dropout=dropout, attention_dropout=dropout)
    moe = tiny_moe_config(2, True, layers=moe_layer_indices(layers, expert_interval=2))
    return build_model(mcfg, moe, groups, seed=11, recompute=recompute), mcfg


def recompute_case(tp: int, ep: int, name: str, dropout: float = 0.0) -> dict:
    """Gradients of one step (2 micro-batches) and the all-to-alls it sent, per MoE layer."""
    groups = ted_groups(tp, ep)
    torch.manual_seed(3)  # dropout masks: the same stream in every variant
    model, mcfg = build(groups, RECOMPUTE[name], dropout=dropout)
    opt = Optimizer(model, groups, OptimizerConfig())
    opt.zero_grad()
    mbs = my_microbatches(0, groups, MICRO, mbs=MBS, seq=SEQ, vocab=mcfg.vocab_size)
    groups.ledger.reset()
    forward_backward(model, mbs, 1.0)
    moe_layers = 2
    a2a = groups.ledger.count("all_to_all", "ep") / (moe_layers * len(mbs))
    opt.reduce_gradients()
    grads = full_tensors(model, groups, grads=True)
    return ({"grads": grads, "a2a_per_layer_per_microbatch": a2a}
            if torch.distributed.get_rank() == 0 else None)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_and_cac_leave_gradients_unchanged_and_cac_saves_a_third_of_the_all_to_alls(
        dropout):
    results = {name: run(4, recompute_case, 2, 2, name, dropout)[0] for name in RECOMPUTE}
    base = results["none"]
    for name, res in results.items():
        assert_close_dicts(res["grads"], base["grads"], 1e-6, f"{name} vs no recompute")
    counts = {name: res["a2a_per_layer_per_microbatch"] for name, res in results.items()}
    assert counts["none"] == 4 and counts["selective"] == 4
    assert counts["full"] == 6, counts
    assert counts["full+cac"] == 4 and counts["block+cac"] == 4, counts


# ---- ZeRO-1 and the tiled step -----------------------------------------------------------------
OPTIMIZERS = {
    "plain": OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.5),
    "tiled": OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.5, tile_size=1000),
    "zero1": OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.5, use_distributed_optimizer=True),
    "zero1+tiled": OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.5,
                                   use_distributed_optimizer=True, tile_size=777),
}


def optimizer_case(tp: int, ep: int, name: str, dtype=torch.float32, steps: int = 5) -> dict:
    groups = ted_groups(tp, ep)
    model, mcfg = build(groups, RecomputeConfig(), layers=2)
    model.to(dtype)
    cfg = OPTIMIZERS[name]
    if dtype == torch.float16:  # loss-scaled fp16 gradients through the same reductions
        cfg = dataclasses.replace(cfg, fp16=True, initial_loss_scale=1024.0)
    opt = Optimizer(model, groups, cfg)
    for step in range(steps):
        train_step(model, opt, my_microbatches(step, groups, 4, mbs=MBS, seq=SEQ,
                                               vocab=mcfg.vocab_size), groups)
    state = [(fg.group.name, fg.param_buf.numel(), fg.state_bytes()) for fg in opt.flat_groups]
    params = full_tensors(model, groups)
    return {"params": params, "state": state} if torch.distributed.get_rank() == 0 else None


@functools.cache
def optimizer_results(dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    return {name: run(8, optimizer_case, 2, 2, name, dtype)[0] for name in OPTIMIZERS}


def test_zero1_and_tiled_steps_match_the_plain_optimizer():
    res = optimizer_results("float32")
    plain = res["plain"]["params"]
    for name in ("tiled", "zero1", "zero1+tiled"):  # ZeRO reduce-scatters: another summation order
        assert_close_dicts(res[name]["params"], plain, 1e-6, name, PARAM_FLOOR)
    for k in plain:  # tiling changes only the loop, not the arithmetic: bitwise
        assert torch.equal(res["tiled"]["params"][k], plain[k]), k
        assert torch.equal(res["zero1+tiled"]["params"][k], res["zero1"]["params"][k]), k


def test_zero1_divides_optimizer_state_by_the_sharding_group():
    """fp32 params are their own master weights, so the state is the two Adam moments: 8 bytes per
    element, divided by DP (4) for dense parameters and by expert-DP (2) for expert parameters."""
    res = optimizer_results("float32")
    sizes = {"dp_cp": 4, "edp": 2}  # dense: DP x CP (CP 1 here), the reduction group
    for (group, numel, plain_bytes), (_, _, zero_bytes) in zip(res["plain"]["state"],
                                                                res["zero1"]["state"]):
        assert plain_bytes == 8 * numel
        assert zero_bytes * sizes[group] == -(-numel // sizes[group]) * sizes[group] * 8


def test_bf16_params_keep_fp32_master_weights_and_tiled_is_bitwise():
    res = optimizer_results("bfloat16")
    for k, v in res["plain"]["params"].items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(res["tiled"]["params"][k], v), k
    sizes = {"dp_cp": 4, "edp": 2}  # dense: DP x CP (CP 1 here), the reduction group
    for (group, numel, plain_bytes), (_, _, zero_bytes) in zip(res["plain"]["state"],
                                                                res["zero1"]["state"]):
        assert plain_bytes == 12 * numel  # fp32 master + two moments
        assert zero_bytes * sizes[group] == plain_bytes


def test_fp16_zero1_and_tiled_follow_the_plain_fp16_optimizer():
    """fp16 parameters, loss scale 1024: the sharded and tiled steps land on the same fp16 values
    up to one fp16 rounding of the (fp32) master weights."""
    res = optimizer_results("float16")
    plain = res["plain"]["params"]
    for name in ("tiled", "zero1", "zero1+tiled"):
        assert_close_dicts(res[name]["params"], plain, 2e-3, f"fp16 {name}", PARAM_FLOOR)
    for k in plain:
        assert torch.equal(res["tiled"]["params"][k], plain[k]), k


# ---- overlapped gradient reduction and parameter gather ------------------------------------------
OVERLAP = {  # small buckets, so each flat group is several buckets started at different times
    "buckets": OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.5, bucket_size=3000),
    "overlap-grad": OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.5, bucket_size=3000,
                                    overlap_grad_reduce=True),
    "zero1-buckets": OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.5, bucket_size=3000,
                                     use_distributed_optimizer=True),
    "zero1-overlap-both": OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.5, bucket_size=3000,
                                          use_distributed_optimizer=True, overlap_grad_reduce=True,
                                          overlap_param_gather=True),
}


def overlap_case(tp: int, ep: int, name: str, steps: int = 4) -> dict:
    groups = ted_groups(tp, ep)
    model, mcfg = build(groups, RecomputeConfig(), layers=2)
    opt = Optimizer(model, groups, OVERLAP[name])
    losses = [train_step(model, opt, my_microbatches(step, groups, 4, mbs=MBS, seq=SEQ,
                                                     vocab=mcfg.vocab_size),
                         groups).lm_loss for step in range(steps)]
    opt.wait_params()
    buckets = len(opt.flat_groups)
    params = full_tensors(model, groups)
    return ({"params": params, "losses": losses, "buckets": buckets}
            if torch.distributed.get_rank() == 0 else None)


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 2)])
def test_overlapped_reduction_and_gather_equal_the_same_buckets_without_overlap(tp, ep):
    """The same collectives on the same buckets, started during backward (and the ZeRO-1 gather
    waited for by the next forward): bitwise the same losses and parameters (DP = 2)."""
    res = {name: run(2 * tp, overlap_case, tp, ep, name)[0] for name in OVERLAP}
    assert res["buckets"]["buckets"] > 4  # the flat groups really are cut into buckets
    for plain, overlapped in (("buckets", "overlap-grad"), ("zero1-buckets", "zero1-overlap-both")):
        assert res[overlapped]["losses"] == res[plain]["losses"], overlapped
        for key, value in res[plain]["params"].items():
            assert torch.equal(res[overlapped]["params"][key], value), (overlapped, key)
    assert_close_dicts(res["zero1-buckets"]["params"], res["buckets"]["params"], 1e-6,
                       "zero1 vs plain", PARAM_FLOOR)
