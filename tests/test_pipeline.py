"""Pipeline parallelism: the stage split, the schedules' order against Megatron's tables, every
layout equal to one process, checkpoints across pipeline sizes, and bad layouts refused."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from harness import run, ted_groups
from megatron.cli.arguments import ConfigError, parse_args
from megatron.cli.configs import build_config
from megatron.parallel.fields import FieldError
from megatron.parallel.stages import StagePlan
from test_training import MODEL, logged, pretrain_case
from util import (
    PARAM_FLOOR,
    assert_close_dicts,
    my_microbatches,
    tiny_model_config,
    train_and_record,
)

SEQ, MBS = 16, 2


# ---- the split -----------------------------------------------------------------------------------
def test_layers_split_evenly_unevenly_and_over_virtual_stages():
    plan = StagePlan(8, 4)
    assert [list(plan.stage_layers(s)) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    plan = StagePlan(8, 2, virtual=2, schedule="interleaved")  # stage s on rank s % 2
    assert plan.stages_of(0) == [0, 2] and plan.layers_of(1) == [2, 3, 6, 7]
    assert plan.holds_first(0) and plan.holds_last(1) and not plan.holds_last(0)
    plan = StagePlan(8, 2, virtual=2, schedule="zbv")  # a V: rank 0 holds the first and last
    assert plan.stages_of(0) == [0, 3] and plan.stages_of(1) == [1, 2]
    assert plan.holds_first(0) and plan.holds_last(0) and plan.layers_of(1) == [2, 3, 4, 5]
    plan = StagePlan(10, 4, first=1, last=3)
    assert plan.layer_counts() == [1, 3, 3, 3]
    assert StagePlan(7, 2, first=3).layer_counts() == [3, 4]


@pytest.mark.parametrize("kw,message", [
    (dict(num_layers=6, pp=4), "num_layers 6 do not split evenly over 4 pipeline stages"),
    (dict(num_layers=9, pp=4, first=1, last=1), "(7 left for 2 stages)"),
    (dict(num_layers=8, pp=2, schedule="zbv"), "use num_virtual_stages_per_pipeline_rank 2"),
    (dict(num_layers=8, pp=2, schedule="interleaved"), "needs >= 2 virtual stages per rank"),
    (dict(num_layers=8, pp=2, schedule="chimera"), "pipeline_schedule 'chimera'"),
    (dict(num_layers=3, pp=4), "3 do not split evenly over 4"),
])
def test_a_split_that_cannot_work_names_the_fields(kw, message):
    with pytest.raises(FieldError) as err:
        StagePlan(**kw)
    assert message in str(err.value)


# ---- the schedules' order ------------------------------------------------------------------------
def megatron_1f1b(P: int, rank: int, n: int) -> list[tuple]:
    """Megatron's non-interleaved 1F1B on one rank: P - rank - 1 warm-up forwards, then one
    forward and one backward per step, then the remaining backwards."""
    warm = min(P - rank - 1, n)
    order = [("F", rank, i) for i in range(warm)]
    for i in range(n - warm):
        order += [("F", rank, warm + i), ("B", rank, i)]
    return order + [("B", rank, i) for i in range(n - warm, n)]


def megatron_interleaved(P: int, V: int, rank: int, n: int) -> list[tuple]:
    """Megatron's interleaved 1F1B (forward_backward_pipelining_with_interleaving) on one rank:
    micro-steps k over n x V, in groups of P micro-batches per model chunk; warm-up
    (P - rank - 1) x 2 + (V - 1) x P forwards; backwards walk the chunks in reverse."""
    total = n * V

    def at(k: int, backward: bool) -> tuple:
        chunk = (k % (P * V)) // P
        chunk = V - 1 - chunk if backward else chunk
        return ("B" if backward else "F", rank + P * chunk, (k // (P * V)) * P + k % P)

    warm = min((P - rank - 1) * 2 + (V - 1) * P, total)
    order = [at(k, False) for k in range(warm)]
    for i in range(total - warm):
        order += [at(warm + i, False), at(i, True)]
    return order + [at(k, True) for k in range(total - warm, total)]


def order_case(pp: int, schedule: str, virtual: int, n: int, layers: int) -> list[tuple]:
    """Each stage's forwards (F) and the start of its backwards (B), per micro-batch, and the
    point-to-point sends and receives (with the peer), in the order this rank ran them."""
    from torch.distributed.pipelining import schedules

    from megatron.training.pipeline import Pipeline
    from ted_patches.build import build_model

    groups = ted_groups(1, 1, pp)
    mcfg = tiny_model_config(num_layers=layers)
    plan = StagePlan(layers, pp, virtual, schedule=schedule)
    pipe = Pipeline(build_model(mcfg, None, groups, seed=1, stages=plan), plan, groups, n, MBS,
                    SEQ, torch.device("cpu"))
    events = []
    for stage, chunk in zip(plan.stages_of(groups.coords.pp), pipe.chunks):
        def record(_module, _inputs, out, stage=stage, count=[0]):
            i, count[0] = count[0], count[0] + 1
            events.append(("F", stage, i))
            (out if isinstance(out, torch.Tensor) else out[0]).register_hook(
                lambda _grad: events.append(("B", stage, i)))
        chunk.register_forward_hook(record)
    batch_p2p = schedules._batch_p2p

    def recorded(ops, desc=None):
        events.extend(("send" if op.op is torch.distributed.isend else "recv", op.peer)
                      for op in ops)
        return batch_p2p(ops, desc)

    schedules._batch_p2p = recorded
    try:
        pipe.run(my_microbatches(0, groups, n, mbs=MBS, seq=SEQ, vocab=mcfg.vocab_size), 1.0,
                 True)
    finally:
        schedules._batch_p2p = batch_p2p
    return events


def check_1f1b_messages(events: list[tuple], rank: int, P: int, n: int) -> None:
    """Rank `rank` of a 1F1B pipeline: n activations (hidden state and position ids: two
    tensors) in from the previous stage and out to the next, n gradients (of the hidden state)
    back the other way, each received before the forward / backward that needs it and sent only
    after the forward / backward that made it; nothing else."""
    prev, after = rank - 1, rank + 1
    seen = {"F": 0, "B": 0, ("recv", prev): 0, ("recv", after): 0, ("send", after): 0,
            ("send", prev): 0}
    for e in events:
        if e[0] in ("F", "B"):
            seen[e[0]] += 1
            if e[0] == "F" and rank > 0:
                assert seen[("recv", prev)] >= 2 * seen["F"], f"F{e[2]} before its activation"
            if e[0] == "B" and rank < P - 1:
                assert seen[("recv", after)] >= seen["B"], f"B{e[2]} before its gradient"
            continue
        assert e in seen, f"a message to or from rank {e[1]}, not a neighbour"
        seen[e] += 1
        assert seen[("send", after)] <= 2 * seen["F"] and seen[("send", prev)] <= seen["B"]
    assert seen[("recv", prev)] == 2 * n * (rank > 0) and seen[("send", prev)] == n * (rank > 0)
    last = rank == P - 1
    assert seen[("send", after)] == 2 * n * (not last) and seen[("recv", after)] == n * (not last)


@pytest.mark.parametrize("pp,n", [(2, 2), (2, 5), (4, 4), (4, 7)])
def test_1f1b_runs_megatrons_order_for_any_micro_batch_count(pp, n):
    ranks = run(pp, order_case, pp, "1f1b", 1, n, pp)
    for rank, events in enumerate(ranks):
        assert [e for e in events if e[0] in "FB"] == megatron_1f1b(pp, rank, n), rank
        check_1f1b_messages(events, rank, pp, n)


@pytest.mark.parametrize("pp,n", [(2, 2), (2, 4), (2, 6), (4, 4), (4, 8)])
def test_interleaved_runs_megatrons_order(pp, n):
    ranks = run(pp, order_case, pp, "interleaved", 2, n, 2 * pp)
    for rank, events in enumerate(ranks):
        assert [e for e in events if e[0] in "FB"] == megatron_interleaved(pp, 2, rank, n), rank
        # per micro-batch and chunk: activations out (two tensors) unless the last stage, the
        # gradient back (one) unless the first
        sends = [e for e in events if e[0] == "send"]
        assert len(sends) == 2 * n * (2 - (rank == pp - 1)) + n * (2 - (rank == 0)), rank


# ---- equal to one process ------------------------------------------------------------------------
def pipeline_case(tp: int, ep: int, pp: int, steps: int = 2, micro: int = 4, **kw) -> dict:
    """`steps` optimizer steps of a 4-layer GPT-MoE (MoE in layers 1 and 3); the losses, the
    first step's reduced gradients (without ZeRO-1) and the parameters after, in full."""
    from megatron.model.config import RecomputeConfig
    from megatron.training.optimizer import Optimizer, OptimizerConfig
    from megatron.training.pipeline import Pipeline
    from ted_patches.build import build_model
    from ted_patches.config import MoEConfig, moe_layer_indices

    groups = ted_groups(tp, ep, pp)
    layers = kw.get("layers", 4)
    mcfg = tiny_model_config(num_layers=layers, untie_embeddings_and_output_weights=kw.get("untie",
                                                                                          False))
    moe = MoEConfig(num_experts=4, layers=moe_layer_indices(layers, expert_interval=2), topk=2,
                    drop_tokens=kw.get("drop", True), aux_loss_coeff=0.1, z_loss_coeff=0.01)
    recompute = RecomputeConfig("full", "uniform", 1) if kw.get("recompute") else None
    plan = StagePlan(layers, pp, kw.get("virtual", 1), kw.get("first"), kw.get("last"),
                     kw.get("schedule", "1f1b"))
    model = build_model(mcfg, moe, groups, seed=99, recompute=recompute, stages=plan)
    zero1, overlap = kw.get("zero1", False), kw.get("overlap", False)
    opt = Optimizer(model, groups, OptimizerConfig(
        lr=1e-3, adam_eps=1e-6, clip_grad=1.0, use_distributed_optimizer=zero1,
        overlap_grad_reduce=overlap, overlap_param_gather=overlap and zero1,
        bucket_size=2000 if overlap else None))
    pipe = None
    if pp > 1:
        pipe = Pipeline(model, plan, groups, micro // groups.dp.size, MBS, SEQ,
                        torch.device("cpu"))

    return train_and_record(model, opt, groups, pipe, steps, micro, MBS, SEQ, mcfg.vocab_size,
                            zero1)


@functools.cache
def one_process(layers: int, untie: bool, drop: bool, micro: int = 4) -> dict:
    return pipeline_case(1, 1, 1, layers=layers, untie=untie, drop=drop, micro=micro)


def merged(ranks: list[dict], key: str) -> dict:
    out = {}
    for r in ranks:
        out.update(r[key] or {})
    return out


# (tp, ep, pp, dp) and options: every pipeline size 2 and 4 with TP, EP and DP around it, virtual
# stages, uneven splits, the zero-bubble schedules, no-drop, recompute with CAC, ZeRO-1, untied.
LAYOUTS = [
    (1, 1, 2, 1, {}),
    (1, 1, 4, 1, {"recompute": True}),
    (2, 1, 2, 1, {"untie": True}),
    (1, 2, 2, 2, {"zero1": True}),
    (1, 1, 2, 2, {"virtual": 2, "schedule": "interleaved", "drop": False}),
    (1, 1, 2, 1, {"virtual": 2, "schedule": "zbv"}),
    (1, 1, 2, 1, {"virtual": 2, "schedule": "dualpipev", "untie": True}),
    (1, 1, 2, 1, {"layers": 5, "first": 2, "schedule": "gpipe"}),
    (2, 2, 2, 2, {"recompute": True, "zero1": True}),
    (1, 2, 4, 2, {"drop": False, "micro": 8}),
    (2, 1, 4, 1, {"layers": 8, "virtual": 2, "schedule": "interleaved", "micro": 8}),
    (1, 2, 2, 2, {"overlap": True, "zero1": True}),  # buckets reduced while the pipeline runs
    (1, 1, 2, 2, {"overlap": True, "virtual": 2, "schedule": "zbv"}),
]


def every_layout() -> list[tuple]:
    """Every (TP, EP, PP, DP) of world <= 8 with PP 2 or 4 that the tiny model allows (TP divides
    its 4 heads, EP its 4 experts and DP), drop and no-drop alternating; 1F1B with as many
    micro-batches per DP rank as stages."""
    from megatron.parallel.topology import valid_layouts

    out = []
    for world in (2, 4, 6, 8):
        for pp in (2, 4):
            if world % pp:
                continue
            for tp, ep in valid_layouts(world // pp, {"heads": 4}, {"experts": 4}):
                dp = world // pp // tp
                out.append((tp, ep, pp, dp, {"drop": len(out) % 2 == 0, "micro": pp * dp}))
    return out


def sampled_layouts() -> list[tuple]:
    """every_layout() thinned for CI time, deterministically: a layout is kept when it brings
    what LAYOUTS and the layouts kept before it do not yet hold: a (world, PP) pair, or a TP, EP
    or DP size at its PP. Every world size, and every TP, EP and DP size at PP 2 and at PP 4,
    still runs (4 of the 15; the other 11 repeat sizes already run)."""
    def keys(tp, ep, pp, dp):
        return {("world", tp * pp * dp, pp), ("tp", tp, pp), ("ep", ep, pp), ("dp", dp, pp)}

    seen = set().union(*(keys(*layout[:4]) for layout in LAYOUTS))
    out = []
    for layout in every_layout():
        new = keys(*layout[:4]) - seen
        if new:
            out.append(layout)
            seen |= new
    return out


@pytest.mark.parametrize("tp,ep,pp,dp,kw", sampled_layouts() + LAYOUTS)
def test_every_pipeline_layout_equals_one_process(tp, ep, pp, dp, kw):
    ref = one_process(kw.get("layers", 4), kw.get("untie", False), kw.get("drop", True),
                      kw.get("micro", 4))
    ranks = run(tp * pp * dp, pipeline_case, tp, ep, pp, **kw)
    for key in ("loss", "aux", "norm"):
        for a, b in zip(ranks[0][key], ref[key]):
            assert abs(a - b) <= 1e-5 * abs(b), f"{key}: {ranks[0][key]} != {ref[key]}"
    if not kw.get("zero1"):
        assert_close_dicts(merged(ranks, "grads"), ref["grads"], 1e-5, "gradient")
    # after Adam's steps: relative to max(scale, init std), as the other equivalence tests
    assert_close_dicts(merged(ranks, "final"), ref["final"], 5e-5, "parameter", PARAM_FLOOR)


# ---- through the command line, with checkpoints --------------------------------------------------
PP_MODEL = (MODEL + "--num-layers 4 --num-experts 4 --moe-router-topk 2 --expert-interval 2 "
            "--micro-batch-size 2 --global-batch-size 8".split())


def train(tp: int, ep: int, pp: int, dp: int, iters: int, *extra) -> dict:
    argv = PP_MODEL + ["--train-iters", str(iters), "--tensor-model-parallel-size", str(tp),
                       "--expert-model-parallel-size", str(ep),
                       "--pipeline-model-parallel-size", str(pp), *extra]
    return run(tp * pp * dp, pretrain_case, argv)[0]


def test_resume_at_pp2_is_exact_and_its_checkpoint_goes_on_at_pp1_and_pp4(tmp_path):
    """4 iterations straight at (TP, EP, PP, DP) = (1, 2, 2, 2), saving at iteration 2 == load of
    that checkpoint + 2, every printed loss equal; the same checkpoint loaded at PP 1 and PP 4
    gives the same losses (and validation) after it, within fp32 rounding."""
    flags = ["--eval-interval", "4"]
    straight = train(1, 2, 2, 2, 4, *flags, "--save", str(tmp_path), "--save-interval", "2")
    at2 = str(tmp_path / "iter_0000002")  # --load of an iteration folder loads that one
    second = train(1, 2, 2, 2, 4, *flags, "--load", at2)
    assert "iteration        3/       4" in second["printed"]
    resumed = logged(second["printed"], "lm loss")
    assert resumed == logged(straight["printed"], "lm loss")[2:] and len(resumed) == 2
    from megatron.checkpoint import read_stored_tensors
    from megatron.model.params import stored_tensors
    from ted_patches.build import build_model
    cfg = build_config(parse_args(PP_MODEL + ["--train-iters", "4"]), 1, 120)
    one = build_model(cfg.model, cfg.moe, ted_groups(1, 1), seed=5)
    assert read_stored_tensors(at2).keys() == stored_tensors(one, ted_groups(1, 1)).keys()
    want = logged(straight["printed"], "lm loss")[2:]
    for layout in ((1, 2, 1, 2), (1, 1, 4, 1)):
        got = train(*layout, 4, *flags, "--load", at2)
        assert logged(got["printed"], "lm loss") == pytest.approx(want, rel=1e-5), layout
        assert got["history"]["valid"][-1][1] == pytest.approx(
            straight["history"]["valid"][-1][1], rel=1e-5)


def test_megatron_lms_mixtral_recipe_trains_at_its_own_pipeline_size():
    """Megatron-LM's Mixtral example shape: PP = 4, EP across the data-parallel ranks, sequence
    parallelism (a no-op at TP 1), overlapped reduction and parameter gather, RoPE, SwiGLU,
    GQA, untied: 8 ranks, shrunk."""
    argv = ("--use-mcore-models --disable-bias-linear --seq-length 16 --max-position-embeddings 32 "
            "--num-layers 4 --hidden-size 32 --ffn-hidden-size 56 --num-attention-heads 4 "
            "--init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 "
            "--normalization RMSNorm --position-embedding-type rope --swiglu "
            "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 "
            "--no-position-embedding --rotary-base 1000000 --num-experts 4 --moe-router-topk 2 "
            "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 "
            "--moe-token-dispatcher-type alltoall --overlap-param-gather --overlap-grad-reduce "
            "--mock-data --vocab-size 100 --micro-batch-size 1 --global-batch-size 8 --lr 1e-4 "
            "--train-iters 4 --min-lr 1.0e-5 --weight-decay 0.1 --clip-grad 1.0 "
            "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 "
            "--expert-model-parallel-size 2 --use-distributed-optimizer --sequence-parallel "
            "--eval-iters 2 --eval-interval 4 --log-interval 1 --num-workers 0").split()
    out = run(8, pretrain_case, argv)[0]
    losses = logged(out["printed"], "lm loss")
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert "PP=4 EP=2 DP=2" in out["printed"] and "1f1b, 4 stages of [1, 1, 1, 1]" in out["printed"]
    assert len(re.findall(r"pipeline bubble: [0-9.]+%", out["printed"])) == 4


# ---- bad layouts, before any collective ----------------------------------------------------------
BASE = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 --mock-data "
        "--vocab-size 100").split()


@pytest.mark.parametrize("world,flags,message", [
    (4, "--pipeline-model-parallel-size 3",
     "world size 4 is not divisible by --pipeline-model-parallel-size 3; use one of [1, 2, 4]"),
    (4, "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 4",
     "2 ranks per pipeline stage is not divisible by --tensor-model-parallel-size 4; use one of "
     "[1, 2]"),
    (3, "--pipeline-model-parallel-size 3",
     "--num-layers 4 do not split evenly over 3 pipeline stages"),
    (2, "--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 0",
     "--decoder-first-pipeline-num-layers must be >= 1"),
    (2, "--pipeline-model-parallel-size 2 --pipeline-schedule zbv --global-batch-size 4",
     None),
    (8, "--pipeline-model-parallel-size 4 --global-batch-size 4",
     "--pipeline-schedule 1f1b needs at least 4 (one per stage) micro-batches per step"),
    (2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
        "--global-batch-size 6",
     "--pipeline-schedule interleaved needs a multiple of --pipeline-model-parallel-size 2"),
    (2, "--pipeline-model-parallel-size 2 --pipeline-schedule dualpipev --global-batch-size 6",
     "needs at least the 4 stages micro-batches"),
    (1, "--num-virtual-stages-per-pipeline-rank 2",
     "--num-virtual-stages-per-pipeline-rank needs --pipeline-model-parallel-size > 1"),
])
def test_bad_pipeline_layouts_name_the_flags_and_the_choices(world, flags, message):
    argv = BASE + flags.split()
    if message is None:  # a layout that works
        assert build_config(parse_args(argv), world, 100).stages.schedule == "zbv"
        return
    with pytest.raises(ConfigError) as err:
        build_config(parse_args(argv), world, 100)
    assert message in str(err.value), str(err.value)
