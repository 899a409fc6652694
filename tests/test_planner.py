"""The TED layout planner (tools/ted_planner.py over megatron/plan/) against real
CPU/gloo training steps: every collective's calls and bytes per (kind, group), as the dispatcher-
level counter (megatron/parallel/counter.py) sees them, TP all-reduces inside megatron-core's
linears included; parameters and optimizer state exactly. With pipeline parallelism the same per
pipeline rank against real pipeline steps (P2P sends and receives, the tied embedding's all-reduce,
each stage's parameters and state), then the bubble and in-flight formulas. Then the time model by
hand, and the command line: the layouts it offers, its JSON, its help (runnable examples, every
column explained), its plot, its one-line errors."""

import functools
import importlib.util
import json
import os
import re
import shlex
import sys
from types import SimpleNamespace

import pytest
import torch

from harness import run, ted_groups
from util import planner_record
from megatron.parallel.counter import CollectiveCounter
from megatron.parallel.topology import Group, Topology
from megatron import plan as planner
from megatron.cli.arguments import parse_args
from megatron.cli.configs import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import ted_planner  # noqa: E402

MODEL = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
         "--seq-length 16 --mock-data --vocab-size 120 --make-vocab-size-divisible-by 8 "
         "--hidden-dropout 0 --attention-dropout 0 --lr 1e-3 --train-iters 1 --num-experts 8 "
         "--expert-interval 2 --micro-batch-size 2").split()
LAYOUT = "--tensor-model-parallel-size {} --expert-model-parallel-size {} --global-batch-size {}"
# name -> (world, flags): layouts x top-k x DTD x CAC x recompute x ZeRO-1, and the model variants
# whose collectives differ (precision, SwiGLU, residual MoE, dropout, no biases, untied output).
CASES = {
    "tp2-ep2 top1 dtd": (4, LAYOUT.format(2, 2, 8)),
    "tp2-ep2 top2 no-dtd recompute": (4, LAYOUT.format(2, 2, 8) + " --moe-router-topk 2 "
                                         "--disable-moe-dtd --recompute-granularity full "
                                         "--recompute-method uniform --disable-moe-cac"),
    "tp2-ep2 top1 dtd recompute+cac": (4, LAYOUT.format(2, 2, 8) + " --recompute-granularity full "
                                          "--recompute-method uniform"),
    "tp2-ep2 top2 block recompute dropout": (
        4, LAYOUT.format(2, 2, 8) + " --moe-router-topk 2 --hidden-dropout 0.1 "
                                    "--recompute-granularity full --recompute-method block "
                                    "--recompute-num-layers 3 --disable-moe-cac"),
    "tp1-ep4 top1 recompute+cac": (4, LAYOUT.format(1, 4, 8) + " --recompute-granularity full "
                                      "--recompute-method uniform"),
    "tp4-ep1 fp16 swiglu residual recompute": (
        4, LAYOUT.format(4, 1, 4) + " --fp16 --initial-loss-scale 1024 "
                                    "--swiglu --mlp-type residual --hidden-dropout 0.1 "
                                    "--recompute-granularity full --recompute-method uniform "
                                    "--recompute-num-layers 2"),
    "tp2-ep2-dp4 top2 zero1 tiled recompute+cac": (
        8, LAYOUT.format(2, 2, 16) + " --moe-router-topk 2 "
                                     "--use-distributed-optimizer --optimizer-tile-size 500 "
                                     "--recompute-granularity full --recompute-method uniform "
                                     "--recompute-num-layers 2"),
    "tp1-ep4-dp8 top2 zero1 bf16": (8, LAYOUT.format(1, 4, 16) + " --moe-router-topk 2 "
                                       "--use-distributed-optimizer --bf16"),
    "tp4-ep2 zero1 selective rope rmsnorm": (
        8, LAYOUT.format(4, 2, 8) + " --use-distributed-optimizer "
                                    "--recompute-granularity selective "
                                    "--position-embedding-type rope "
                                    "--normalization RMSNorm --disable-bias-linear "
                                    "--untie-embeddings-and-output-weights"),
}
NO_DROP = (4, LAYOUT.format(2, 2, 8) + " --disable-moe-token-dropping --moe-router-topk 2")


def config(flags: str, world: int):
    """The run's Config, with the padded dispatch (what the planner plans: see
    planner.with_padded_dispatch; CPUs default to the padding-free one)."""
    args = parse_args(MODEL + flags.split())
    return planner.with_padded_dispatch(build_config(args, world,
                                                     args.vocab_size + 1))  # + the EOD id


# ---- real steps, on every rank ------------------------------------------------------------------
def step_case(flags: str) -> dict:
    """One train_step of the configuration under the counter; what the planner must predict."""
    from megatron.training.optimizer import Optimizer
    from megatron.training.forward_backward import train_step
    from ted_patches.build import build_model
    from util import my_microbatches

    cfg = config(flags, torch.distributed.get_world_size())
    groups = ted_groups(cfg.topology.tp, cfg.topology.ep)
    torch.manual_seed(1)  # dropout masks
    model = build_model(cfg.model, cfg.moe, groups, seed=cfg.train.seed, device=torch.device("cpu"),
                        recompute=cfg.recompute)
    opt = Optimizer(model, groups, cfg.optim)
    t = cfg.train
    mbs = my_microbatches(0, groups, t.global_batch_size // t.micro_batch_size,
                          mbs=t.micro_batch_size, seq=t.seq_length, vocab=cfg.model.vocab_size)
    counter = CollectiveCounter(named_groups(groups))
    groups.ledger.reset()
    with counter:
        metrics = train_step(model, opt, mbs, groups)
    assert not metrics.skipped
    return planner_record(model, opt, groups, counter)


def named_groups(groups) -> list:
    """Every group of the layout under the planner's name for it (the experts' TP group and TP x
    EP block are process groups of their own, also where they hold the TP or EP group's ranks;
    so is DP x CP, where the dense gradients are reduced, also at CP 1)."""
    return [g for g in (groups.tp, groups.dp, groups.ep, groups.edp, groups.etp, groups.etp_ep,
                        groups.world, groups.pp, groups.embedding, groups.cp, groups.dp_cp)
            if g is not None and g.pg is not None]


def step_cases(names: list[str]) -> dict:
    return {name: step_case(CASES[name][1]) for name in names}


def functional_case() -> dict:
    """A functional collective (the form selective checkpointing sees) is counted under its
    group."""
    import torch.distributed._functional_collectives as fc

    groups = ted_groups(2, 2)
    counter = CollectiveCounter(groups)
    with counter:
        fc.all_reduce(torch.ones(3), "sum", groups.tp.pg).wait()
        out = fc.all_gather_tensor(torch.ones(5), 0, groups.ep.pg)
        out.wait()
    return counter.summary()


@functools.cache
def measured(world: int) -> dict:
    names = [n for n, (w, _) in CASES.items() if w == world]
    return run(world, step_cases, names)


def _cases_for(world):
    return [pytest.param(world, name, id=name) for name, (w, _) in CASES.items() if w == world]


def _plan_summary(cfg) -> dict:
    return {k: (t.calls, t.bytes) for k, t in planner.comm_per_step(cfg).items()}


@pytest.mark.parametrize("world,name", _cases_for(4) + _cases_for(8))
def test_planned_collectives_equal_the_counted_ones_on_every_rank(world, name):
    cfg = config(CASES[name][1], world)
    want = _plan_summary(cfg)
    assert ("all_reduce", "tp") in want or cfg.topology.tp == 1
    for rank, got in enumerate(measured(world)):
        assert got[name]["counter"] == want, f"rank {rank}"


@pytest.mark.parametrize("world,name", _cases_for(4) + _cases_for(8))
def test_parameters_and_optimizer_state_equal_the_real_model(world, name):
    cfg = config(CASES[name][1], world)
    table = [(p.name, p.numel) for p in planner.param_table(cfg)]
    fgs = planner.flat_groups(cfg)
    memory = planner.memory_per_gpu(cfg)
    for rank, got in enumerate(measured(world)):
        res = got[name]
        assert res["params"] == table, f"rank {rank}"
        assert [(fg.group, fg.padded) for fg in fgs] == [(g, n) for g, n, _, _ in res["flat"]]
        assert memory.params == sum(n * p for _, n, p, _ in res["flat"])
        assert memory.grads == sum(n * g for _, n, _, g in res["flat"])
        assert memory.optimizer == planner.optimizer_state_bytes(cfg) == res["state_bytes"]


@pytest.mark.parametrize("world", [4, 8])
def test_the_counter_agrees_with_the_ledger_where_both_see_a_call(world):
    """The ledger sees the project's own collectives; the counter also megatron-core's TP
    all-reduces (embedding, linears), and nothing else."""
    for per_rank in measured(world):
        for name, res in per_rank.items():
            counter, ledger = res["counter"], res["ledger"]
            assert set(ledger) <= set(counter), name
            for key, (calls, nbytes) in counter.items():
                if key == ("all_reduce", "tp"):
                    assert ledger[key][0] < calls and ledger[key][1] < nbytes, name
                else:
                    assert ledger[key] == (calls, nbytes), (name, key)


def test_no_drop_mode_issues_the_planned_calls():
    """No-drop capacity depends on the routing: the calls are planned exactly (the router's EP
    all-reduce included); the bytes assume the capacity factor's capacity."""
    world, flags = NO_DROP
    cfg = config(flags, world)
    want = {k: calls for k, (calls, _) in _plan_summary(cfg).items()}
    # 2 MoE layers x 2 micro-batches, over the experts' TP x EP block
    assert want[("all_reduce", "etp_ep")] == 2 * 2
    for got in run(world, step_case, flags):
        assert {k: calls for k, (calls, _) in got["counter"].items()} == want


def test_functional_collectives_are_counted_under_their_group():
    got = run(4, functional_case)[0]
    assert got == {("all_reduce", "tp"): (1, 12), ("all_gather", "ep"): (1, 20)}


def test_the_counter_refuses_one_process_group_under_two_names():
    pg = SimpleNamespace(group_name="7")
    with pytest.raises(ValueError, match="share one process group"):
        CollectiveCounter([Group("dp", pg, (0, 1), 0), Group("edp", pg, (0, 1), 0)])


def test_total_parameters_equal_the_one_process_model():
    from ted_patches.build import build_model

    cfg = config(LAYOUT.format(1, 1, 2) + " --mlp-type residual --swiglu", 1)
    model = build_model(cfg.model, cfg.moe, ted_groups(1, 1), seed=cfg.train.seed,
                        device=torch.device("cpu"), recompute=cfg.recompute)
    assert planner.total_parameters(cfg) == sum(p.numel() for p in model.parameters())


# ---- pipeline parallelism: each pipeline rank against a real pipeline step -----------------------
PIPE = "--pipeline-model-parallel-size {} --global-batch-size {} "
# name -> (world, flags): every schedule's placement, tied and untied embeddings, uneven and
# virtual stages, TP, EP, ZeRO-1 and recompute with CAC inside a stage
PP_CASES = {
    "tp2-pp2 1f1b tied": (4, PIPE.format(2, 4) + "--tensor-model-parallel-size 2"),
    "pp2-ep2 1f1b untied zero1 recompute+cac": (
        4, PIPE.format(2, 8) + "--expert-model-parallel-size 2 --use-distributed-optimizer "
                               "--untie-embeddings-and-output-weights --recompute-granularity "
                               "full --recompute-method uniform --recompute-num-layers 3"),
    "pp4 interleaved uneven tied": (
        4, PIPE.format(4, 8) + "--num-layers 10 --num-virtual-stages-per-pipeline-rank 2 "
                               "--decoder-first-pipeline-num-layers 2 "
                               "--decoder-last-pipeline-num-layers 2"),
    "pp4 zbv tied": (4, PIPE.format(4, 8) + "--num-layers 8 --pipeline-schedule zbv"),
    "pp2-ep2 gpipe bf16": (4, PIPE.format(2, 8) + "--expert-model-parallel-size 2 "
                                                  "--pipeline-schedule gpipe --bf16"),
}


def counted_steps(flags: str, layout=None) -> dict:
    """Two train_steps, the second under the counter (a pipeline's stages exchange 4-byte
    handshakes in their first step only); what the planner must predict. `layout`: the
    padding-free dispatch's (Dispatcher.layout; None: the rule CPUs pick)."""
    from megatron.training.forward_backward import train_step
    from megatron.training.optimizer import Optimizer
    from megatron.training.pipeline import Pipeline
    from ted_patches.build import build_model
    from ted_patches.dispatcher import Dispatcher
    from util import my_microbatches

    cfg = config(flags, torch.distributed.get_world_size())
    topo = cfg.topology
    groups = ted_groups(topo.tp, topo.ep, topo.pp, topo.etp, topo.sp, topo.cp)
    torch.manual_seed(1)  # dropout masks
    model = build_model(cfg.model, cfg.moe, groups, seed=cfg.train.seed,
                        device=torch.device("cpu"), recompute=cfg.recompute, stages=cfg.stages)
    opt = Optimizer(model, groups, cfg.optim)
    t = cfg.train
    n = t.global_batch_size // t.micro_batch_size
    pipe = None
    if cfg.stages is not None:
        pipe = Pipeline(model, cfg.stages, groups, n // groups.dp.size, t.micro_batch_size,
                        t.seq_length, torch.device("cpu"))
    counter = CollectiveCounter(named_groups(groups))
    Dispatcher.layout = layout
    try:
        for step in range(2):
            mbs = my_microbatches(step, groups, n, mbs=t.micro_batch_size, seq=t.seq_length,
                                  vocab=cfg.model.vocab_size)
            if step:
                groups.ledger.reset()
                with counter:
                    assert not train_step(model, opt, mbs, groups, pipe).skipped
            else:
                train_step(model, opt, mbs, groups, pipe)
    finally:
        Dispatcher.layout = None
    return planner_record(model, opt, groups, counter)


def pipeline_step_cases(names: list[str]) -> dict:
    return {name: counted_steps(PP_CASES[name][1]) for name in names}


@functools.cache
def measured_pipeline(world: int) -> list:
    return run(world, pipeline_step_cases, [n for n, (w, _) in PP_CASES.items() if w == world])


def _pp_cases():
    return [pytest.param(w, name, id=name) for name, (w, _) in PP_CASES.items()]


@pytest.mark.parametrize("world,name", _pp_cases())
def test_each_pipeline_ranks_parameters_and_state_equal_the_real_stage(world, name):
    cfg = config(PP_CASES[name][1], world)
    for rank, got in enumerate(measured_pipeline(world)):
        res, r = got[name], got[name]["pp_rank"]
        assert r == cfg.topology.coords(rank).pp
        assert res["params"] == [(p.name, p.numel) for p in planner.param_table(cfg, r)], rank
        fgs = planner.flat_groups(cfg, r)
        assert [(fg.group, fg.padded) for fg in fgs] == [(g, n) for g, n, _, _ in res["flat"]]
        memory = planner.memory_per_gpu(cfg, pp_rank=r)
        assert memory.params == sum(n * p for _, n, p, _ in res["flat"])
        assert memory.grads == sum(n * g for _, n, _, g in res["flat"])
        assert memory.optimizer == planner.optimizer_state_bytes(cfg, r) == res["state_bytes"]
    # the layout's memory is its heaviest pipeline rank's
    heaviest = planner.memory_per_gpu(cfg)
    assert heaviest.total == max(m.total for m in planner.stage_memory(cfg))


@pytest.mark.parametrize("world,name", _pp_cases())
def test_each_pipeline_ranks_collectives_and_p2p_equal_the_counted_ones(world, name):
    cfg = config(PP_CASES[name][1], world)
    for rank, got in enumerate(measured_pipeline(world)):
        res = got[name]
        want = {k: (t.calls, t.bytes) for k, t in
                planner.comm_per_step(cfg, res["pp_rank"]).items()}
        assert res["counter"] == want, f"rank {rank}"
        assert ("send", "pp") in want


def test_the_tied_embeddings_copy_and_its_all_reduce_live_on_the_first_and_last_stage():
    tied = config(PP_CASES["pp4 interleaved uneven tied"][1], 4)
    for r in range(4):  # stage 7 (the last) on rank 3, stage 0 on rank 0
        assert planner.embedding_copy(tied, r) == (r == 3)
        assert planner.embedding_all_reduce(tied, r) == (r in (0, 3))
        has = ("all_reduce", "embedding") in planner.comm_per_step(tied, r)
        assert has == (r in (0, 3))
    v = config(PP_CASES["pp4 zbv tied"][1], 4)  # the V: rank 0 holds the first and last stage
    assert not any(planner.embedding_all_reduce(v, r) for r in range(4))
    assert [len(planner.rank_layers(v, r)) for r in range(4)] == [2, 2, 2, 2]
    # the V's middle pair exchanges in memory: rank 3 sends only backward (stage 3) and forward
    # (stage 4) once each per micro-batch, as rank 0 does
    micro = [planner.per_microbatch(v, r)[("send", "pp")].calls for r in range(4)]
    assert micro == [3, 6, 6, 3]


def _stage_cfg(schedule: str, pp: int, m: int, virtual: int = 1, layers: int = 8):
    args = parse_args(MODEL + f"--num-layers {layers} --pipeline-model-parallel-size {pp} "
                      f"--pipeline-schedule {schedule} --num-virtual-stages-per-pipeline-rank "
                      f"{virtual} --global-batch-size {2 * m}".split())
    return build_config(args, pp, args.vocab_size + 1)


def test_bubble_fractions_are_megatrons():
    for P, m in ((2, 2), (4, 4), (4, 8), (8, 16)):
        for schedule in ("1f1b", "gpipe"):
            assert (planner.bubble_fraction(_stage_cfg(schedule, P, m), m)
                    == pytest.approx((P - 1) / (m + P - 1)))
        for V in (2, 4):
            cfg = _stage_cfg("interleaved", P, m, V, layers=P * V * 2)
            assert planner.bubble_fraction(cfg, m) == pytest.approx((P - 1) / (V * m + P - 1))
        for schedule in ("zbv", "dualpipev"):  # assumed: close to zero bubble
            cfg = _stage_cfg(schedule, P, max(m, 2 * P), 2, layers=4 * P)
            assert planner.bubble_fraction(cfg, m) == 0.0
    assert planner.bubble_fraction(config(LAYOUT.format(1, 1, 4), 1), 2) == 0.0


def test_in_flight_micro_batches_follow_each_schedule():
    P, m = 4, 8
    assert [planner.in_flight(_stage_cfg("1f1b", P, m), r, m) for r in range(P)] == [4, 3, 2, 1]
    assert [planner.in_flight(_stage_cfg("1f1b", P, 2 * 2), r, 2) for r in range(P)] == [
        2, 2, 2, 1]
    assert [planner.in_flight(_stage_cfg("gpipe", P, m), r, m) for r in range(P)] == [8] * 4
    V = 2  # Megatron: (P - r - 1) * 2 + (V - 1) * P warm-up, + 1
    cfg = _stage_cfg("interleaved", P, m, V)
    assert [planner.in_flight(cfg, r, m) for r in range(P)] == [11, 9, 7, 5]
    assert [planner.in_flight(_stage_cfg("zbv", P, m, 2), r, m) for r in range(P)] == [8] * 4
    # rank 0 holds the most activations under 1F1B; the last stage the output layer
    mems = planner.stage_memory(_stage_cfg("1f1b", P, m))
    assert mems[0].activations > mems[1].activations > mems[2].activations


def test_the_step_time_includes_the_bubble_of_the_slowest_stage():
    cluster = planner.cluster_preset("a100-40gb", 4)
    for schedule, virtual in (("1f1b", 1), ("interleaved", 2), ("zbv", 2)):
        cfg = _stage_cfg(schedule, 4, 8, virtual)
        m, f = 8, planner.bubble_fraction(cfg, 8)
        times = [planner.step_time(cfg, cluster, pp_rank=r) for r in range(4)]
        links = planner.group_links(cfg.topology, cluster)
        busy = []
        for r, t in enumerate(times):
            link = {**links, "pp": planner.p2p_link(cfg, cluster, r)}
            micro = planner.per_microbatch(cfg, r)
            busy.append(t.compute + m * sum(planner.collective_seconds(k, v, link[g])
                                            for (k, g), v in micro.items()))
        for b, t in zip(busy, times):  # every rank waits for the slowest, then the bubble
            assert t.bubble == pytest.approx(max(busy) - b + max(busy) * f / (1 - f))
        assert planner.step_time(cfg, cluster).total == max(t.total for t in times)
        if schedule != "zbv":
            assert min(t.bubble for t in times) >= max(busy) * f / (1 - f) > 0


def test_p2p_crosses_nodes_where_the_stages_ranks_do():
    cluster = planner.cluster_preset("a100-40gb", 16)  # two nodes of 8
    args = parse_args(MODEL + "--pipeline-model-parallel-size 2 --global-batch-size 32".split())
    cfg = build_config(args, 16, args.vocab_size + 1)  # stage 0 on ranks 0-7, stage 1 on 8-15
    link = planner.p2p_link(cfg, cluster, 0)
    assert not link.intra_node and link.ring_bandwidth == cluster.inter_bandwidth / 8
    args = parse_args(MODEL + "--pipeline-model-parallel-size 4 --global-batch-size 32".split())
    cfg = build_config(args, 16, args.vocab_size + 1)  # stages 0, 1 on node 0; 2, 3 on node 1
    assert planner.p2p_link(cfg, cluster, 0).intra_node
    assert not planner.p2p_link(cfg, cluster, 1).intra_node
    assert planner.p2p_link(cfg, cluster, 1).ring_bandwidth == cluster.inter_bandwidth / 4


# ---- the time model, by hand ---------------------------------------------------------------------
def test_links_use_intra_node_figures_only_for_groups_inside_a_node():
    cluster = planner.cluster_preset("summit-v100-16gb", 12)  # two 6-GPU nodes
    links = planner.group_links(Topology(12, tp=2, ep=3), cluster)
    assert links["tp"].intra_node and links["ep"].intra_node  # ranks (0,1); (0,2,4)
    assert not links["dp"].intra_node and not links["edp"].intra_node  # (0,2,..,10); (0,6)
    # every node carries two DP rings (TP ranks 0 and 1): each gets half the node's injection
    assert links["dp"].ring_bandwidth == cluster.inter_bandwidth / 2
    assert links["edp"].peers_on_node == 1


def test_alpha_beta_times():
    link = planner.Link(size=4, intra_node=True, ring_bandwidth=1e9, latency=1e-5, peers_on_node=4,
                        a2a_inter_bandwidth=1e9)
    t = planner.Traffic(calls=2, bytes=8e9)
    assert planner.collective_seconds("all_reduce", t, link) == pytest.approx(2 * 3 * (2e-5 + 2.0))
    assert planner.collective_seconds("reduce_scatter", t, link) == pytest.approx(3 * (2e-5 + 2.0))
    assert planner.collective_seconds("all_gather", t, link) == pytest.approx(3 * (2e-5 + 8.0))
    assert (planner.collective_seconds("all_to_all", t, link)
            == pytest.approx(3 * 2e-5 + 8e9 * 3 / 4 / 1e9))
    off = planner.Link(size=4, intra_node=False, ring_bandwidth=1e9, latency=1e-5, peers_on_node=2,
                       a2a_inter_bandwidth=0.5e9)
    assert (planner.collective_seconds("all_to_all", t, off)
            == pytest.approx(3 * 2e-5 + 8e9 * 2 / 4 / 0.5e9))


def test_dtd_and_cac_cut_the_planned_all_to_all_bytes():
    base = LAYOUT.format(2, 2, 8) + " --recompute-granularity full --recompute-method uniform"
    a2a = {}
    for name, extra in (("both", ""), ("no-dtd", " --disable-moe-dtd"),
                        ("no-cac", " --disable-moe-cac")):
        a2a[name] = planner.comm_per_step(config(base + extra, 4))[("all_to_all", "ep")]
    assert a2a["no-dtd"].bytes == 2 * a2a["both"].bytes  # TP = 2: 1/TP of the bytes with DTD
    # the recompute replays both all-to-alls
    assert a2a["no-cac"].calls == a2a["both"].calls * 6 // 4


# ---- the command line ----------------------------------------------------------------------------
CLI = ("--preset 1.3b --cluster a100-40gb --gpus 64 --micro-batch-size 1 --global-batch-size 64 "
       "--fp16").split()


def cli(capsys, *argv):
    code = ted_planner.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_one_object_per_layout_and_one_recommended(capsys):
    code, out, _ = cli(capsys, *CLI, "--use-distributed-optimizer", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    # 24 layers: PP in (1, 2, 4, 8); 16 heads and 16 experts: TP, EP up to 16 (the classic TED
    # layouts: the experts split over TP, no SP; tests/test_planner_sp.py checks the others)
    assert {(r["tp"], r["pp"], r["ep"]) for r in rows if r["etp"] == r["tp"] and not r["sp"]} == {
        (t, p, e) for p in (1, 2, 4, 8) for t in (1, 2, 4, 8, 16) if 64 % (t * p) == 0
        for e in (1, 2, 4, 8, 16) if 64 // (t * p) % e == 0}
    for r in rows:
        assert {"tp", "pp", "ep", "dp", "fits", "memory_bytes", "comm_bytes", "step_seconds",
                "bubble_seconds", "microbatches", "recommended"} <= set(r)
        assert r["tp"] * r["cp"] * r["pp"] * r["dp"] == 64 and isinstance(r["fits"], bool)
        assert ({"params", "grads", "optimizer", "activations", "step_peak"}
                <= set(r["memory_bytes"]))
        for key in r["comm_bytes"]:
            kind, group = key.split("/")
            assert kind in planner.KINDS and group in planner.GROUPS
        assert ("send/pp" in r["comm_bytes"]) == (r["pp"] > 1)
    best = [r for r in rows if r["recommended"]]
    assert len(best) == 1 and best[0]["fits"]
    assert best[0]["step_seconds"] == min(r["step_seconds"] for r in rows if r["fits"])


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_the_search_offers_exactly_the_valid_pipeline_layouts(capsys, schedule):
    """PP divides the layers (x the virtual stages) and the GPUs; the micro-batches per step
    (global batch / (micro x DP)) meet the schedule's rule: 1F1B at least PP, interleaved a
    multiple of PP. A global batch of half the GPUs leaves some layouts out by that rule."""
    extra = ["--global-batch-size", "32", "--pipeline-schedule", schedule]
    V = 2 if schedule == "interleaved" else 1
    if V > 1:
        extra += ["--num-virtual-stages-per-pipeline-rank", "2"]
    code, out, _ = cli(capsys, *CLI, *extra, "--json")
    assert code == 0
    got = {(r["tp"], r["pp"], r["ep"]): r for r in map(json.loads, out.splitlines())
           if r["etp"] == r["tp"] and not r["sp"] and r["cp"] == 1}  # the classic TED layouts
    want = set()
    for p in range(1, 65):
        for t in (1, 2, 4, 8, 16):
            if 64 % (t * p) or 24 % (p * V) or (V > 1 and p == 1):
                continue
            dp = 64 // (t * p)
            if 32 % dp:
                continue
            m = 32 // dp
            if (m % p if V > 1 else m < p):
                continue
            want |= {(t, p, e) for e in (1, 2, 4, 8, 16) if dp % e == 0}
    assert set(got) == want and any(p > 1 for _, p, _ in want)
    for (t, p, e), r in got.items():
        assert r["microbatches"] * r["dp"] == 32 and r["virtual_stages"] == V
        assert r["schedule"] == ("" if p == 1 else schedule)
        m = r["microbatches"]
        f = (p - 1) / (V * m + p - 1) if p > 1 else 0.0
        assert r["bubble_fraction"] == pytest.approx(f)


def test_pipeline_size_one_restricts_the_search_to_no_pipeline(capsys):
    code, out, _ = cli(capsys, *CLI, "--pipeline-model-parallel-size", "1", "--json")
    assert code == 0 and {json.loads(line)["pp"] for line in out.splitlines()} == {1}
    code, out, _ = cli(capsys, *CLI, "--pipeline-model-parallel-size", "4", "--json")
    assert code == 0 and {json.loads(line)["pp"] for line in out.splitlines()} == {4}


def _help_examples() -> list[list[str]]:
    block = ted_planner.__doc__.split("examples:\n", 1)[1].split("\n\n", 1)[0]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[2:] for line in joined.strip().splitlines()]


def test_help_examples_run(capsys, tmp_path):
    examples = _help_examples()
    assert len(examples) >= 4 and all("..." not in argv for argv in examples)
    for argv in examples:
        if "--plot" in argv:
            if importlib.util.find_spec("matplotlib") is None:
                continue
            argv[argv.index("--plot") + 1] = str(tmp_path / "plan.png")
        code, out, err = cli(capsys, *argv)
        assert code == 0 and out and not err, (argv, err)


def test_help_explains_every_column(capsys):
    with pytest.raises(SystemExit):
        ted_planner.planner_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "columns" in text
    code, out, _ = cli(capsys, *CLI, "--tensor-model-parallel-size", "2")
    header = next(line for line in out.splitlines() if line.lstrip().startswith("TP "))
    names = header.split("  ")
    for name in (n.strip() for n in names if n.strip()):
        name = name.split(" (")[0]  # "largest comm (GB/rank/step)"
        assert re.search(rf"^ +{re.escape(name)}\b|, {re.escape(name)}\b", text, re.M), name


def test_table_marks_what_does_not_fit_and_the_recommendation(capsys):
    code, out, _ = cli(capsys, *CLI, "--tensor-model-parallel-size", "2")
    assert code == 0
    assert "recommended (*): TP=2" in out and " NO " in out
    assert len([l for l in out.splitlines() if l.startswith("* ")]) == 1


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plan.png"
    code, _, _ = cli(capsys, *CLI, "--expert-model-parallel-size", "8", "--plot", str(path))
    assert code == 0 and path.read_bytes()[:4] == b"\x89PNG"


def test_the_plot_has_a_title_and_a_memory_axis_clipped_at_one_and_a_half_gpus(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    opts, args, given = ted_planner.parse(CLI + ["--expert-model-parallel-size", "8",
                                                 "--gpu-memory-gib", "16"])
    cluster = ted_planner.cluster_from(opts)
    plans = ted_planner.plan_all(args, cluster, given)
    assert max(p.memory.total for p in plans) > 1.5 * cluster.memory_bytes  # one is clipped
    fig = ted_planner.plot(plans, planner.recommend(plans), cluster, str(tmp_path / "p.png"))
    memory_axis = fig.axes[0]
    assert "on 64 x a100-40gb" in memory_axis.get_title()
    assert memory_axis.get_ylim()[1] == pytest.approx(1.5 * cluster.memory_bytes / 2**30)
    assert any(t.get_text().isdigit() for t in memory_axis.texts)  # the clipped bars' sizes
    plt.close(fig)


def test_plot_without_matplotlib_is_one_error_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = cli(capsys, *CLI, "--plot", str(tmp_path / "plan.png"))
    assert code == 2 and err.count("\n") == 1 and "--plot needs matplotlib" in err


@pytest.mark.parametrize("argv,flag", [
    (["--preset", "1.3b", "--gpus", "0"], "--gpus"),
    (["--preset", "1.3b"], "--gpus"),
    (["--preset", "nope", "--gpus", "8"], "--preset"),
    (["--preset", "1.3b", "--gpus", "8", "--cluster", "tpu"], "--cluster"),
    (["--preset", "1.3b", "--gpus", "7", "--global-batch-size", "1024"], "--gpus 7"),
    (["--preset", "1.3b", "--gpus", "8", "--compute-efficiency", "1.5"], "--compute-efficiency"),
    (["--preset", "1.3b", "--gpus", "8", "--gpu-memory-gib", "-1"], "--gpu-memory-gib"),
    (["--gpus", "8"], "--num-layers"),
    (["--preset", "1.3b", "--gpus", "8", "--tensor-model-parallel-size", "3"],
     "--tensor-model-parallel-size 3"),
])
def test_bad_input_is_one_error_line_naming_the_flag(capsys, argv, flag):
    """main() returns the script's exit status (sys.exit(main())) and raises nothing."""
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and flag in err, err
    assert err.startswith("ted_planner.py: error:")


def test_paper_figures_are_printed():
    text = ted_planner.paper()
    assert ("6.7B base, 16 experts" in text and "without DTD+CAC" in text
            and "<- recommended" in text)
    assert "largest base with 16 experts: TED" in text
