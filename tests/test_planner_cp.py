"""The layout planner (megatron/plan/) with context parallelism (--context-parallel-size), against
real CPU/gloo training steps on worlds of 2 and 4: every collective's calls and bytes per (kind,
group), counted at the dispatcher (megatron/parallel/counter.py) with the context-parallel group
and DP x CP named as the planner names them ("cp", "dp_cp"): the keys' and values' all-gathers
over CP (again in a recompute without CAC, and in selective recompute's), their gradients'
reduce-scatters, the router's logits gathered over CP, the loss's token count, the dense
gradients over DP x CP, the padding-free dispatch of each rank's own tokens; every parameter, flat
group and the optimizer state exactly. The dispatch's sizes depend on the routing: the exact
cases route every token to every expert (top-k = E, nothing dropped), where the planner's
balanced estimate is the truth; a top-2 case checks the calls and every byte outside the dispatch.
Then the memory and time models by hand, and the search over CP (tools/ted_planner.py)."""

import functools
import json

import pytest

from harness import run
from megatron import plan as planner
from test_planner import cli, config
from test_planner_sp import step_cases

# top-k = E = 4: every token to every expert, none dropped (capacity T at factor 1)
ALL = " --num-experts 4 --moe-router-topk 4"
LAYOUT = ("--tensor-model-parallel-size {} --expert-model-parallel-size {} "
          "--context-parallel-size {} --global-batch-size {}")
SP = " --sequence-parallel"
RECOMPUTE = " --recompute-granularity full --recompute-method uniform"
MLA = (" --multi-latent-attention --q-lora-rank 12 --kv-lora-rank 10 --qk-head-dim 6 "
       "--qk-pos-emb-head-dim 4 --v-head-dim 5 --position-embedding-type rope")
# name -> (world, flags): CP 2 and 4 with TP (DTD slices, SP's own tokens, no DTD), EP over the CP
# ranks, the experts' own grid, recompute with and without CAC, selective, ZeRO-1 over DP x CP,
# grouped-query and multi-latent attention, half precision, a pipeline.
CASES = {
    "cp2": (2, LAYOUT.format(1, 1, 2, 4) + ALL),
    "cp2-ep2 recompute+cac zero1": (2, LAYOUT.format(1, 2, 2, 4) + ALL + RECOMPUTE
                                       + " --use-distributed-optimizer"),
    "cp2 selective gqa rope bf16": (2, LAYOUT.format(1, 1, 2, 4) + ALL
                                       + " --recompute-granularity selective --bf16 "
                                         "--group-query-attention --num-query-groups 2 "
                                         "--position-embedding-type rope"),
    "tp2-cp2-ep2 dtd recompute no-cac": (4, LAYOUT.format(2, 2, 2, 4) + ALL + RECOMPUTE
                                            + " --disable-moe-cac"),
    "tp2-sp-cp2-ep2 recompute+cac": (4, LAYOUT.format(2, 2, 2, 4) + ALL + SP + RECOMPUTE),
    "tp2-cp2 no-dtd swiglu": (4, LAYOUT.format(2, 1, 2, 4) + ALL + " --disable-moe-dtd --swiglu"),
    "cp2-dp2-ep4 zero1 tiled": (4, LAYOUT.format(1, 4, 2, 8) + ALL
                                   + " --use-distributed-optimizer --optimizer-tile-size 300"),
    "tp2-sp-cp2-etp1-ep2": (4, LAYOUT.format(2, 2, 2, 4) + ALL + SP
                               + " --expert-tensor-parallel-size 1"),
    "cp4 mla recompute+cac": (4, LAYOUT.format(1, 2, 4, 4) + ALL + MLA + RECOMPUTE),
    "cp2-pp2 untied": (4, LAYOUT.format(1, 1, 2, 4) + ALL + " --pipeline-model-parallel-size 2 "
                                                           "--untie-embeddings-and-output-weights"),
}
# the routing decides the dispatch's sizes: calls, and the bytes outside the dispatch, exact
TOP2 = (4, LAYOUT.format(2, 2, 2, 4) + " --moe-router-topk 2")
DISPATCH = {("all_to_all", "ep"), ("all_gather", "etp"), ("reduce_scatter", "etp"),
            ("all_gather", "tp"), ("all_reduce", "etp")}


# ---- real steps, on every rank (test_planner_sp.step_cases) -------------------------------------
# The padding-free dispatch in the packed layout accelerators run (on CPUs nearly equal counts
# take the tight one, a zero row more).
PACKED = "packed"


@functools.cache
def measured(world: int) -> list:
    cases = {name: flags for name, (w, flags) in CASES.items() if w == world}
    if world == TOP2[0]:
        cases["top2"] = TOP2[1]
    return run(world, step_cases, cases, PACKED)


def _all_cases():
    return [pytest.param(w, name, id=name) for name, (w, _) in CASES.items()]


def _planned(cfg, pp_rank: int) -> dict:
    return {k: (t.calls, t.bytes) for k, t in planner.comm_per_step(cfg, pp_rank).items()}


@pytest.mark.parametrize("world,name", _all_cases())
def test_planned_collectives_equal_the_counted_ones_on_every_rank(world, name):
    cfg = config(CASES[name][1], world)
    for rank, got in enumerate(measured(world)):
        res = got[name]
        assert res["pp_rank"] == cfg.topology.coords(rank).pp
        assert res["counter"] == _planned(cfg, res["pp_rank"]), f"rank {rank}"


@pytest.mark.parametrize("world,name", _all_cases())
def test_parameters_and_optimizer_state_equal_the_real_model(world, name):
    cfg = config(CASES[name][1], world)
    for rank, got in enumerate(measured(world)):
        res, r = got[name], got[name]["pp_rank"]
        assert res["params"] == [(p.name, p.numel) for p in planner.param_table(cfg, r)], rank
        fgs = planner.flat_groups(cfg, r)
        assert [(fg.group, fg.padded) for fg in fgs] == [(g, n) for g, n, _, _ in res["flat"]]
        assert planner.optimizer_state_bytes(cfg, r) == res["state_bytes"]


def test_unbalanced_routing_issues_the_planned_calls():
    """Top-2 of 8: the dispatch's bytes follow the routing (planned as balanced); its calls and
    every other collective's bytes are exact."""
    world, flags = TOP2
    want = _planned(config(flags, world), 0)
    for got in measured(world):
        counted = got["top2"]["counter"]
        assert {k: c for k, (c, _) in counted.items()} == {k: c for k, (c, _) in want.items()}
        assert ({k: v for k, v in counted.items() if k not in DISPATCH}
                == {k: v for k, v in want.items() if k not in DISPATCH})


@pytest.mark.parametrize("world", [2, 4])
def test_the_counter_agrees_with_the_ledger_on_cp_and_dp_cp(world):
    """Our collectives over cp and dp_cp reach the counter under the ledger's names and bytes."""
    for per_rank in measured(world):
        for name, res in per_rank.items():
            counter, ledger = res["counter"], res["ledger"]
            assert not [k for k in counter if k[1].startswith(("ranks", "c10d", "unknown"))]
            for key in ledger:
                if key[1] in ("cp", "dp_cp"):
                    assert ledger[key] == counter[key], (name, key)


# ---- the model, by hand ------------------------------------------------------------------------
def test_context_parallelism_halves_what_a_micro_batch_keeps_but_the_gathered_keys():
    """Dense, CP 2: every tensor kept per token is of half the tokens; each attention layer keeps
    the keys and values gathered over CP (the whole sequence's) and its output's copy."""
    base = "--tensor-model-parallel-size 1 --global-batch-size 4 --num-experts 1"
    one, two = config(base, 2), config(base + " --context-parallel-size 2", 2)
    kept = [planner.memory._walk(c, 0, planner.stages_of(c, 0)[0])[1] for c in (one, two)]
    T, H, e, layers = 2 * 16, 32, 4, 4
    gathered = 2 * T * H * e + T // 2 * H * e  # k and v [b, heads, s, d], the output's copy
    assert kept[1] == kept[0] // 2 + layers * gathered
    # the parameters and their state do not change: ZeRO-1 over DP x CP
    zero = " --use-distributed-optimizer"
    dp2, cp2 = config(base + zero, 2), config(base + zero + " --context-parallel-size 2", 2)
    assert planner.optimizer_state_bytes(dp2) == planner.optimizer_state_bytes(cp2)
    assert [fg.shards for fg in planner.flat_groups(cp2)] == [2] * len(planner.flat_groups(cp2))


def test_context_parallelism_halves_the_flops_and_adds_the_cp_links():
    """Dense, CP 2 against DP 2 on the same two GPUs: half the tokens per micro-batch, twice the
    micro-batches per rank, the same FLOPs per step; the K/V gathers priced on the CP link."""
    base = "--tensor-model-parallel-size 1 --global-batch-size 4 --num-experts 1"
    dp2, cp2 = config(base, 2), config(base + " --context-parallel-size 2", 2)
    # DP 2: 1 micro-batch of T tokens per rank; CP 2: 2 micro-batches of T / 2 tokens each
    assert planner.num_microbatches(dp2) == 1 and planner.num_microbatches(cp2) == 2
    assert planner.flops_per_rank(cp2) == pytest.approx(planner.flops_per_rank(dp2))
    cluster = planner.cluster_preset("a100-40gb", 2)
    t = planner.step_time(cp2, cluster)
    assert t.comm["all_gather/cp"] > 0 and t.comm["reduce_scatter/cp"] > 0
    link = planner.group_links(cp2.topology, cluster)["cp"]
    assert link.size == 2 and link.intra_node


def test_own_capacity_is_the_balanced_share_of_the_kept_tokens():
    cfg = config(LAYOUT.format(1, 2, 2, 4) + " --moe-router-topk 2", 2)  # 8 experts, top-2
    T, C = planner.micro_shapes(cfg, 8)
    assert (T, C) == (32, 8)  # k T / E = 8 at capacity factor 1
    assert planner.shapes.own_capacity(cfg, 8) == 8 // 2
    low = config(LAYOUT.format(1, 2, 2, 4) + " --moe-router-topk 2 "
                 "--moe-expert-capacity-factor 0.5", 2)
    assert planner.shapes.own_capacity(low, 8) == 4 // 2  # the capacity bounds what is kept
    plan = planner.plan_layout(cfg, planner.cluster_preset("a100-40gb", 2))
    assert plan.cp == 2 and any("context parallelism" in n for n in plan.notes)


# ---- the search ---------------------------------------------------------------------------------
def _rows(capsys, *argv) -> list[dict]:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


SMALL = ("--preset 125m --cluster a100-40gb --gpus 8 --micro-batch-size 1 --global-batch-size 8 "
         "--pipeline-model-parallel-size 1 --fp16").split()


def test_the_search_offers_cp_where_the_sequence_allows(capsys):
    rows = _rows(capsys, *SMALL)
    got = {(r["tp"], r["cp"]) for r in rows}
    # 12 heads: TP 1, 2, 4; 2048 tokens: every CP with TP x CP dividing 8
    assert got == {(t, c) for t in (1, 2, 4) for c in (1, 2, 4, 8) if 8 % (t * c) == 0}
    for r in rows:
        assert r["tp"] * r["cp"] * r["dp"] == 8
        assert ("all_gather/cp" in r["comm_bytes"]) == (r["cp"] > 1)
    # 2052 tokens: 2 x CP must divide it, so CP 1 or 2
    rows = _rows(capsys, *SMALL, "--seq-length", "2052", "--max-position-embeddings", "2052")
    assert {r["cp"] for r in rows} == {1, 2}


def test_the_context_parallel_size_flag_restricts_the_search(capsys):
    rows = _rows(capsys, *SMALL, "--context-parallel-size", "2")
    assert rows and {r["cp"] for r in rows} == {2}
    code, out, _ = cli(capsys, *SMALL, "--context-parallel-size", "2")
    header = next(line for line in out.splitlines() if line.lstrip().startswith("TP "))
    assert " CP " in header
    code, out, err = cli(capsys, *SMALL, "--context-parallel-size", "3")
    assert code == 2 and out == "" and err.count("\n") == 1 and "--context-parallel-size" in err
