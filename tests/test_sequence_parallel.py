"""Sequence parallelism and the experts' own grid (--sequence-parallel,
--expert-tensor-parallel-size): every layout equals one process; a checkpoint moves between the
grids; bad combinations are refused before any collective.

A layout is (TP, SP, ETP, EP, DP[, PP]); the one-process run is the same model, data and steps.
Options alternate over the layouts so each meets drop and no-drop, padded and padding-free,
recompute with communication-aware checkpointing and ZeRO-1. The whole matrix of world <= 8 is
`full_matrix()`; CI runs a fixed sample that covers every ETP/EP/TP pairing kind (set
TED_FULL_MATRIX=1 for all of it).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from harness import run, ted_groups
from util import assert_records_equal, build_for_layout, tiny_model_config, train_and_record

SEQ, MBS = 16, 2


def layout_case(tp: int, ep: int, etp=None, sp: bool = False, pp: int = 1, steps: int = 2,
                micro: int = 4, **kw) -> dict:
    """`steps` optimizer steps of a 4-layer GPT-MoE (4 experts, top-2, MoE in layers 1 and 3,
    SwiGLU experts of their own FFN size, biases on): the losses, the first step's reduced
    gradients and the parameters after, in full."""
    from ted_patches.config import MoEConfig

    groups = ted_groups(tp, ep, pp, etp, sp)
    mcfg = tiny_model_config(num_layers=4, swiglu=kw.get("swiglu", False),
                             add_bias_linear=kw.get("bias", True))
    moe = MoEConfig(num_experts=4, layers=(1, 3), topk=2, drop_tokens=kw.get("drop", True),
                    capacity_factor=1.0, min_capacity=2, aux_loss_coeff=0.1, z_loss_coeff=0.01,
                    pad_free=kw.get("pad_free"), dtd=kw.get("dtd", True),
                    expert_ffn_hidden_size=kw.get("expert_ffn", 32),
                    mlp_type=kw.get("mlp_type", "standard"),
                    shared_expert_intermediate_size=kw.get("shared"),
                    shared_expert_gate=kw.get("shared_gate", False),
                    router_num_groups=2 if kw.get("limited") else None,
                    router_group_topk=1 if kw.get("limited") else None)
    zero1 = kw.get("zero1", False)
    model, opt, pipe = build_for_layout(mcfg, moe, groups, pp=pp, micro=micro, mbs=MBS, seq=SEQ,
                                        recompute=kw.get("recompute", False), zero1=zero1)
    return train_and_record(model, opt, groups, pipe, steps, micro, MBS, SEQ, mcfg.vocab_size,
                            zero1)


MODEL_KEYS = ("drop", "swiglu", "bias", "expert_ffn", "mlp_type", "shared", "shared_gate",
              "limited")


@functools.cache
def one_process(micro: int, **model) -> dict:
    return layout_case(1, 1, micro=micro, **model)


def check_equal(tp, ep, etp, sp, dp, pp=1, **kw) -> None:
    kw.setdefault("micro", max(4, dp))  # at least one micro-batch per DP rank
    ref = one_process(kw["micro"], **{k: v for k, v in kw.items() if k in MODEL_KEYS})
    ranks = run(tp * dp * pp, layout_case, tp, ep, etp, sp, pp, **kw)
    assert_records_equal(ranks, ref, kw.get("zero1", False))


OPTIONS = [  # cycled over the matrix: each layout kind meets each of them
    {"drop": True, "pad_free": True},
    {"drop": True, "pad_free": False, "recompute": True},
    {"drop": False, "pad_free": True, "zero1": True},
    {"drop": False, "pad_free": False},
    {"drop": True, "pad_free": True, "recompute": True, "swiglu": True},
]


def full_matrix() -> list[tuple]:
    """Every (TP, ETP, EP, DP) of world 2, 4 and 8 the tiny model allows (TP divides its 4
    heads; ETP its expert FFN 32; EP its 4 experts; ETP x EP divides the world), SP on and off at
    TP > 1, except those megatron-core rejects or that equal an older layout (SP off with ETP !=
    TP is the DTD path; it is kept)."""
    out = []
    for world in (2, 4, 8):
        for tp in (1, 2, 4):
            if world % tp:
                continue
            for etp in (1, 2, 4):
                for ep in (1, 2, 4):
                    if world % (etp * ep) or (tp == etp == 1 and ep == 1 and world > 2):
                        continue
                    for sp in ((False, True) if tp > 1 else (False,)):
                        if tp == etp and not sp and world > 2:
                            continue  # the TED core's own layouts (tests/test_moe.py)
                        opts = OPTIONS[len(out) % len(OPTIONS)]
                        out.append((tp, ep, etp, sp, world // tp, opts))
    return out


def sampled() -> list[tuple]:
    """A fixed subset: every layout of world 2, every other one of world 4 (the options cycle, so
    each kind still meets several), and of world 8 four that differ in kind (EP spanning TP ranks,
    ETP above TP, both SP settings)."""
    if os.environ.get("TED_FULL_MATRIX"):
        return full_matrix()
    keep = {(2, 4, 1, True), (1, 4, 2, False), (2, 2, 4, True), (4, 1, 2, False)}
    out, fours = [], 0
    for c in full_matrix():
        world = c[0] * c[4]
        if world == 4:
            fours += 1
        if world == 2 or (world == 4 and fours % 2) or (c[0], c[1], c[2], c[3]) in keep:
            out.append(c)
    return out


def _name(case) -> str:
    tp, ep, etp, sp, dp, opts = case
    flags = ",".join(k for k, v in opts.items() if v is True)
    return f"tp{tp}{'sp' if sp else ''}-etp{etp}-ep{ep}-dp{dp}-{flags}"


@pytest.mark.parametrize("case", sampled(), ids=_name)
def test_every_sp_and_expert_grid_layout_equals_one_process(case):
    tp, ep, etp, sp, dp, opts = case
    check_equal(tp, ep, etp, sp, dp, **opts)


@pytest.mark.parametrize("tp,ep,etp,pp,dp,kw", [
    (2, 2, 1, 2, 1, {"drop": True}),  # SP hidden states between stages: [b, s/TP, h]
    (2, 1, 2, 2, 2, {"drop": False, "pad_free": False}),
])
def test_sequence_parallel_with_a_pipeline_equals_one_process(tp, ep, etp, pp, dp, kw):
    check_equal(tp, ep, etp, True, dp, pp=pp, micro=4, **kw)


@pytest.mark.parametrize("tp,ep,etp,sp,dp,kw", [
    (2, 2, 2, False, 2, {"drop": False}),  # DTD slices of each destination's rows
    (2, 2, 1, True, 1, {"drop": True, "recompute": True}),
])
def test_group_limited_routing_sent_once_per_rank_equals_one_process(tp, ep, etp, sp, dp, kw):
    """Two groups of two experts, one group per token: each token's two experts share an EP
    rank (at EP 2) and it is sent there once (ted_patches/per_rank.py)."""
    check_equal(tp, ep, etp, sp, dp, limited=True, pad_free=True, **kw)


def test_residual_moe_under_sequence_parallelism_equals_one_process():
    check_equal(2, 2, 2, True, 2, mlp_type="residual", drop=True)


def test_shared_expert_under_sequence_parallelism_equals_one_process():
    check_equal(2, 1, 1, True, 2, shared=48, shared_gate=True, drop=False, pad_free=True)


# ---- through the command line, with checkpoints --------------------------------------------------
def cli(world: int, layout: str, iters: int, *extra) -> dict:
    from test_training import MODEL, pretrain_case

    argv = (MODEL + "--num-experts 4 --moe-router-topk 2 --expert-interval 2 "
            "--moe-ffn-hidden-size 32 --micro-batch-size 2 --global-batch-size 8 "
            "--eval-interval 4".split() + ["--train-iters", str(iters)] + layout.split()
            + list(extra))
    return run(world, pretrain_case, argv)[0]


SP_ETP2 = ("--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 2 "
           "--expert-model-parallel-size 2")


def test_a_checkpoint_moves_between_sp_and_expert_grids_and_goes_on_equal(tmp_path):
    """4 iterations at (TP 2, SP, ETP 2, EP 2, DP 2), saving at iteration 2 == load of that
    checkpoint + 2 at the same layout, bit for bit; the checkpoint loaded at one process and at
    (TP 2, ETP 1, EP 2) continues with the same losses within fp32 rounding."""
    from test_training import logged

    straight = logged(cli(4, SP_ETP2, 4, "--save", str(tmp_path), "--save-interval", "2")
                      ["printed"], "lm loss")
    at_2 = str(tmp_path / "iter_0000002")  # --load of an iteration folder loads that one
    same = logged(cli(4, SP_ETP2, 4, "--load", at_2)["printed"], "lm loss")
    assert len(straight) == 4 and same == straight[2:]
    for world, layout in ((1, ""), (2, "--tensor-model-parallel-size 2 "
                                       "--expert-tensor-parallel-size 1 "
                                       "--expert-model-parallel-size 2")):
        other = logged(cli(world, layout, 4, "--load", at_2)["printed"], "lm loss")
        assert len(other) == 2
        for a, b in zip(other, straight[2:]):
            assert abs(a - b) <= 1e-5 * abs(b), (layout, other, straight)


BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 --mock-data "
        "--vocab-size 100 --num-experts 4 --moe-router-topk 2").split()


@pytest.mark.parametrize("world,flags,message", [
    (2, "--tensor-model-parallel-size 2 --sequence-parallel --seq-length 15",
     "--sequence-parallel splits --seq-length 15 over --tensor-model-parallel-size 2: use a "
     "multiple of 2"),
    (4, "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 3",
     "world size 4 is not divisible by --expert-tensor-parallel-size 3 x "
     "--expert-model-parallel-size 1; use one of [1, 2, 4]"),
    (4, "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1 "
        "--expert-model-parallel-size 3",
     "--num-experts 4 is not divisible by --expert-model-parallel-size 3; use one of [1, 2, 4]"),
    (2, "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1 --disable-moe-dtd",
     "drop --disable-moe-dtd or add --sequence-parallel"),
    (4, "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 4 "
        "--moe-ffn-hidden-size 6",
     "--moe-ffn-hidden-size 6 is not divisible by --expert-tensor-parallel-size 4; use one of "
     "[1, 2]"),
    (4, "--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1 "
        "--expert-model-parallel-size 4", None),
])
def test_bad_sp_and_expert_grid_layouts_name_the_flags_and_the_choices(world, flags, message):
    from megatron.cli.arguments import ConfigError, parse_args
    from megatron.cli.configs import build_config

    argv = BASE + flags.split()
    if message is None:  # a layout that works: EP 4 spans the TP ranks
        topo = build_config(parse_args(argv), world, 100).topology
        assert (topo.tp, topo.etp, topo.ep, topo.edp, topo.sp) == (2, 1, 4, 1, True)
        return
    with pytest.raises(ConfigError) as err:
        build_config(parse_args(argv), world, 100)
    text = str(err.value)
    head, _, tail = message.partition("...")
    assert head in text and tail in text, text


def per_rank_case(tp: int, ep: int, sp: bool) -> dict:
    """One MoE layer with 8 experts in 2 groups, top-4 inside one group: the same routing sent
    once per (token, rank) and once per (token, expert). Outputs, input gradients, the a2a bytes."""
    from ted_patches.config import MoEConfig
    from util import MoEOnly

    groups = ted_groups(tp, ep, 1, None, sp)
    mcfg = tiny_model_config(hidden_size=64)
    moe = MoEConfig(num_experts=8, layers=(0,), topk=4, drop_tokens=True, capacity_factor=1.0,
                    pad_free=True, router_num_groups=2, router_group_topk=1)
    layer = MoEOnly(mcfg, moe, groups).moe
    gen = torch.Generator().manual_seed(3 + groups.dp.rank)
    x_full = torch.randn(2, SEQ, 64, generator=gen)
    out = {}
    for per_rank in (True, False):
        layer.dispatcher.per_rank = per_rank
        x = x_full
        if sp:
            x = x.view(2, tp, -1, 64)[:, groups.tp.rank]
        x = x.clone().requires_grad_(True)
        groups.ledger.reset()
        y, _ = layer(x)
        y.square().sum().backward()
        out[per_rank] = (y.detach(), x.grad, groups.ledger.nbytes("all_to_all", "ep"))
    return out


@pytest.mark.parametrize("tp,ep,sp", [(1, 2, False), (2, 2, True)])
def test_one_row_per_destination_sends_fewer_bytes_and_computes_the_same(tp, ep, sp):
    for rank in run(tp * ep, per_rank_case, tp, ep, sp):
        (y1, g1, once), (y2, g2, each) = rank[True], rank[False]
        assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(g1, g2, atol=1e-6)
        # each token's 4 choices share one EP rank: a quarter of the rows (plus 4 weights and
        # 4 expert ids per row)
        assert 0 < once < 0.35 * each, (once, each)
