"""The layout planner (megatron/plan/) with sequence parallelism (--sequence-parallel) and the
experts' own grid (--expert-tensor-parallel-size), against real CPU/gloo training steps on worlds
of 2 and 4: every collective's calls and bytes per (kind, group), counted at the dispatcher
(megatron/parallel/counter.py, megatron-core's TP all-reduces included) with the experts' TP group
and TP x EP block named as the planner names them ("etp", "etp_ep"); every parameter, flat group
and the optimizer state exactly; with a pipeline, each pipeline rank. Then the planner's search
over ETP and SP (tools/ted_planner.py)."""

import functools
import json

import pytest

from harness import run
from megatron import plan as planner
from test_planner import cli, config, counted_steps

CLI = ("--preset 1.3b --cluster a100-40gb --gpus 64 --micro-batch-size 1 --global-batch-size 64 "
       "--fp16").split()
SP = " --sequence-parallel"
LAYOUT = "--tensor-model-parallel-size {} --expert-model-parallel-size {} --global-batch-size {}"
RECOMPUTE = " --recompute-granularity full --recompute-method uniform"
# name -> (world, flags): SP at TP 2 and 4, the experts' grid apart from TP (ETP 1 at TP 2 with EP
# spanning the TP ranks, ETP 2 at TP 1), DTD on and off, recompute with and without CAC, ZeRO-1,
# tiling, half precision, the model variants whose collectives differ.
CASES = {
    "tp2-sp-ep1": (2, LAYOUT.format(2, 1, 4) + SP),
    "tp2-sp-etp1-ep2 top2 zero1": (2, LAYOUT.format(2, 2, 4) + SP + " --moe-router-topk 2 "
                                      "--expert-tensor-parallel-size 1 "
                                      "--use-distributed-optimizer"),
    "tp2-etp1-ep2 dtd recompute+cac": (2, LAYOUT.format(2, 2, 4) + RECOMPUTE
                                          + " --expert-tensor-parallel-size 1"),
    "tp1-etp2 top2": (2, LAYOUT.format(1, 1, 4) + " --expert-tensor-parallel-size 2 "
                                                  "--moe-router-topk 2"),
    "tp2-sp-ep2 recompute+cac dropout": (4, LAYOUT.format(2, 2, 8) + SP + RECOMPUTE
                                            + " --hidden-dropout 0.1"),
    "tp2-sp-ep2 no-dtd recompute no-cac": (4, LAYOUT.format(2, 2, 8) + SP + RECOMPUTE
                                              + " --disable-moe-dtd --disable-moe-cac "
                                                "--moe-router-topk 2"),
    "tp4-sp fp16 swiglu residual zero1 tiled": (
        4, LAYOUT.format(4, 1, 4) + SP + " --fp16 --initial-loss-scale 1024 --swiglu "
                                         "--mlp-type residual --use-distributed-optimizer "
                                         "--optimizer-tile-size 500"),
    "tp2-sp-etp1-ep4 recompute+cac": (4, LAYOUT.format(2, 4, 8) + SP + RECOMPUTE
                                         + " --expert-tensor-parallel-size 1"),
    "tp2-sp-etp1-ep2 edp2 bf16 zero1": (4, LAYOUT.format(2, 2, 8) + SP
                                           + " --expert-tensor-parallel-size 1 --bf16 "
                                             "--use-distributed-optimizer"),
    "tp2-etp1-ep2 edp2 dtd top2": (4, LAYOUT.format(2, 2, 8) + " --moe-router-topk 2 "
                                      "--expert-tensor-parallel-size 1"),
    "tp1-etp2-ep2 recompute+cac": (4, LAYOUT.format(1, 2, 8) + RECOMPUTE
                                      + " --expert-tensor-parallel-size 2"),
    "tp2-sp rope rmsnorm qk-norm untied selective shared-expert": (
        4, LAYOUT.format(2, 2, 8) + SP + " --position-embedding-type rope --normalization RMSNorm "
                                         "--disable-bias-linear --qk-layernorm "
                                         "--untie-embeddings-and-output-weights "
                                         "--recompute-granularity selective "
                                         "--moe-shared-expert-intermediate-size 32 "
                                         "--moe-shared-expert-gate"),
}
NO_DROP = (4, LAYOUT.format(2, 2, 8) + SP + " --expert-tensor-parallel-size 1 "
              "--disable-moe-token-dropping --moe-router-topk 2")
PIPE = " --pipeline-model-parallel-size 2"
PP_CASES = {
    "tp2-sp-pp2 tied": (4, LAYOUT.format(2, 1, 4) + SP + PIPE),
    "tp2-sp-etp1-ep2-pp2 untied recompute+cac": (
        4, LAYOUT.format(2, 2, 8) + SP + PIPE + RECOMPUTE + " --expert-tensor-parallel-size 1 "
                                                          "--untie-embeddings-and-output-weights"),
}


# ---- real steps, on every rank (test_planner.counted_steps) --------------------------------------
def step_cases(cases: dict, layout=None) -> dict:
    return {name: counted_steps(flags, layout) for name, flags in cases.items()}


@functools.cache
def measured(world: int) -> list:
    cases = {name: flags for name, (w, flags) in {**CASES, **PP_CASES}.items() if w == world}
    if world == NO_DROP[0]:
        cases["no-drop"] = NO_DROP[1]
    return run(world, step_cases, cases)


def _all_cases():
    return [pytest.param(w, name, id=name) for name, (w, _) in {**CASES, **PP_CASES}.items()]


def _flags(name: str) -> str:
    return {**CASES, **PP_CASES}[name][1]


def _planned(cfg, pp_rank: int) -> dict:
    return {k: (t.calls, t.bytes) for k, t in planner.comm_per_step(cfg, pp_rank).items()}


@pytest.mark.parametrize("world,name", _all_cases())
def test_planned_collectives_equal_the_counted_ones_on_every_rank(world, name):
    cfg = config(_flags(name), world)
    for rank, got in enumerate(measured(world)):
        res = got[name]
        assert res["pp_rank"] == cfg.topology.coords(rank).pp
        assert res["counter"] == _planned(cfg, res["pp_rank"]), f"rank {rank}"


@pytest.mark.parametrize("world,name", _all_cases())
def test_parameters_and_optimizer_state_equal_the_real_model(world, name):
    cfg = config(_flags(name), world)
    for rank, got in enumerate(measured(world)):
        res, r = got[name], got[name]["pp_rank"]
        assert res["params"] == [(p.name, p.numel) for p in planner.param_table(cfg, r)], rank
        fgs = planner.flat_groups(cfg, r)
        assert [(fg.group, fg.padded) for fg in fgs] == [(g, n) for g, n, _, _ in res["flat"]]
        memory = planner.memory_per_gpu(cfg, pp_rank=r)
        assert memory.params == sum(n * p for _, n, p, _ in res["flat"])
        assert memory.grads == sum(n * g for _, n, _, g in res["flat"])
        assert memory.optimizer == planner.optimizer_state_bytes(cfg, r) == res["state_bytes"]


@pytest.mark.parametrize("world", [2, 4])
def test_the_counter_agrees_with_the_ledger_on_the_experts_groups(world):
    """Our collectives on etp / etp_ep reach the counter under the same names and bytes as the
    ledger's (the counter also sees megatron-core's TP all-reduces, and nothing else)."""
    for per_rank in measured(world):
        for name, res in per_rank.items():
            counter, ledger = res["counter"], res["ledger"]
            assert set(ledger) <= set(counter), name
            assert not [k for k in counter if k[1].startswith(("ranks", "c10d", "unknown"))]
            for key, value in counter.items():
                if key == ("all_reduce", "tp") and key in ledger:
                    assert ledger[key][0] <= value[0], name
                elif key[0] not in ("send", "recv"):
                    assert ledger.get(key) == value, (name, key)


def test_the_experts_groups_carry_the_dispatch():
    """What the folded layouts must show: with ETP 1 no collective on the experts' TP group and
    the all-to-all over the experts' EP group; with SP the slices need no DTD flag."""
    folded = _planned(config(_flags("tp2-sp-etp1-ep4 recompute+cac"), 4), 0)
    assert not [k for k in folded if k[1] == "etp"] and ("all_to_all", "ep") in folded
    no_dtd = _planned(config(_flags("tp2-sp-ep2 no-dtd recompute no-cac"), 4), 0)
    plain = _planned(config(LAYOUT.format(2, 2, 8) + " --disable-moe-dtd --moe-router-topk 2 "
                            + RECOMPUTE + " --disable-moe-cac", 4), 0)
    assert no_dtd[("all_to_all", "ep")][1] * 2 == plain[("all_to_all", "ep")][1]
    # without slices the experts' input and output are all-reduced over ETP (= TP); with SP only
    # the fc2 bias gradients are: 2 MoE layers x 2 micro-batches x [E_l = 4, H = 32] fp32
    assert no_dtd[("all_reduce", "etp")] == (4, 4 * 4 * 32 * 4)
    assert plain[("all_reduce", "etp")][1] > 10 * no_dtd[("all_reduce", "etp")][1]


def test_no_drop_mode_issues_the_planned_calls():
    """The padded no-drop capacity's all-reduce runs over the experts' TP x EP block; the calls
    are planned exactly (the bytes assume the capacity factor's capacity)."""
    world, flags = NO_DROP
    want = {k: calls for k, (calls, _) in _planned(config(flags, world), 0).items()}
    assert want[("all_reduce", "etp_ep")] == 2 * 2  # 2 MoE layers x 2 micro-batches
    for got in measured(world):
        assert {k: calls for k, (calls, _) in got["no-drop"]["counter"].items()} == want


# ---- the model, by hand ------------------------------------------------------------------------
def test_sequence_parallelism_divides_the_held_activations_by_tp():
    """Dense TP 4: what a layer keeps outside attention and the MLP's hidden activations (the
    norms' inputs and statistics, the residual, the linears' inputs, dropout masks) is cut by
    4; the whole-sequence part (QKV, attention, fc1's output) is not."""
    base = ("--tensor-model-parallel-size 4 --global-batch-size 4 --num-experts 1 "
            "--hidden-dropout 0.1")
    off, on = config(base, 4), config(base + SP, 4)
    T, H, e = 2 * 16, 32, 4
    # per layer: input, norm output (QKV's input), residual, fc1's input (fp32) + 2 LayerNorm
    # stats each for the two norms (fp32) + 2 dropout masks (bool)
    held = 4 * T * H * e + 2 * 2 * T * 4 + 2 * T * H
    blocks = {}
    for name, cfg in (("off", off), ("on", on)):
        kept = planner.memory._walk(cfg, 0, planner.stages_of(cfg, 0)[0])[1]
        blocks[name] = kept
    layers = 4
    head = 2 * T * H * e + 2 * T * 4  # the last layer's output, the final norm's and stats
    assert blocks["off"] - blocks["on"] == (layers * held + head) * 3 // 4


def test_the_experts_grid_splits_expert_memory_and_flops():
    """ETP 1 at TP 2: each expert whole on one rank (twice the expert parameters of ETP 2), half
    the expert rows (each TP rank's own slice); the same FLOPs, expert-DP from the expert grid."""
    a = config(LAYOUT.format(2, 2, 8) + SP, 4)
    b = config(LAYOUT.format(2, 2, 8) + SP + " --expert-tensor-parallel-size 1", 4)
    assert (a.topology.edp, b.topology.edp) == (1, 2)
    experts = [sum(p.numel for p in planner.param_table(c) if p.expert and p.tp_split)
               for c in (a, b)]  # w1, w2, b1: split over ETP
    assert experts[1] == 2 * experts[0]
    E, (_, C) = 8, planner.micro_shapes(a, 8)
    assert planner.expert_rows(a, E, C) == E * C
    assert planner.expert_rows(b, E, C) == E * C // 2
    assert planner.flops_per_rank(a) == pytest.approx(planner.flops_per_rank(b))


# ---- the search ---------------------------------------------------------------------------------
def _rows(capsys, *argv) -> list[dict]:
    code, out, err = cli(capsys, *CLI, *argv, "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_the_search_offers_the_experts_grid_and_sequence_parallelism(capsys):
    rows = _rows(capsys, "--pipeline-model-parallel-size", "1")
    got = {(r["tp"], r["ep"], r["etp"], r["sp"]) for r in rows}
    want = set()
    # 16 heads: TP up to 16; 16 experts: EP up to 16; the experts' FFN 8192: any ETP of 64
    for t in (1, 2, 4, 8, 16):
        for etp in (1, 2, 4, 8, 16, 32, 64):
            for ep in (1, 2, 4, 8, 16):
                if 64 % t or 64 % (etp * ep):
                    continue
                want |= {(t, ep, etp, sp) for sp in ((False, True) if t > 1 else (False,))}
    assert got == want
    for r in rows:
        assert r["edp"] * r["etp"] * r["ep"] == 64 and r["tp"] * r["cp"] * r["dp"] == 64
    # SP: the same collectives' bytes at most, less activation memory
    by = {(r["tp"], r["ep"], r["etp"], r["sp"]): r for r in rows if r["cp"] == 1}
    on, off = by[(8, 8, 8, True)], by[(8, 8, 8, False)]
    assert on["memory_bytes"]["activations"] < off["memory_bytes"]["activations"]


def test_etp_and_sp_flags_restrict_the_search(capsys):
    rows = _rows(capsys, "--expert-tensor-parallel-size", "1", "--sequence-parallel",
                 "--tensor-model-parallel-size", "4")
    assert rows and {(r["tp"], r["etp"], r["sp"]) for r in rows} == {(4, 1, True)}
    rows = _rows(capsys, "--no-sequence-parallel", "--tensor-model-parallel-size", "2",
                 "--pipeline-model-parallel-size", "1")
    assert {(r["etp"], r["sp"]) for r in rows} == {(e, False) for e in (1, 2, 4, 8, 16, 32, 64)}
    code, out, _ = cli(capsys, *CLI, "--tensor-model-parallel-size", "2",
                       "--expert-tensor-parallel-size", "1", "--pipeline-model-parallel-size",
                       "1")
    header = next(line for line in out.splitlines() if line.lstrip().startswith("TP "))
    assert "ETP" in header and "SP" in header


def test_contradicting_sequence_parallel_flags_are_one_error_line(capsys):
    code, out, err = cli(capsys, *CLI, "--sequence-parallel", "--no-sequence-parallel")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--sequence-parallel and --no-sequence-parallel" in err
