"""The TED layout planner (tools/ted_planner.py over megatron/plan/) against real
CPU/gloo training steps: every collective's calls and bytes per (kind, group), as the dispatcher-
level counter (megatron/parallel/counter.py) sees them, TP all-reduces inside megatron-core's
linears included; parameters and optimizer state exactly. Then the time model by hand, and the
command line: its JSON, its plot, its one-line errors."""

import functools
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from harness import run, ted_groups
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
    counter = CollectiveCounter(groups)
    groups.ledger.reset()
    with counter:
        metrics = train_step(model, opt, mbs, groups)
    assert not metrics.skipped
    return dict(
        counter=counter.summary(), ledger=groups.ledger.summary(),
        params=[(n, p.numel()) for n, p in model.named_parameters()],
        flat=[(fg.group.name, fg.param_buf.numel(), fg.param_buf.element_size(),
               fg.grad_buf.element_size())
              for fg in opt.flat_groups],
        state_bytes=opt.state_bytes(),
    )


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
    assert want[("all_reduce", "ep")] == 2 * 2  # 2 MoE layers x 2 micro-batches
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
    assert {(r["tp"], r["ep"]) for r in rows} == {(t, e) for t, e in [
        (1, 1), (1, 2), (1, 4), (1, 8), (1, 16),
        (2, 1), (2, 2), (2, 4), (2, 8), (2, 16),
        (4, 1), (4, 2), (4, 4), (4, 8), (4, 16),
        (8, 1), (8, 2), (8, 4), (8, 8),
        (16, 1), (16, 2), (16, 4)]}
    for r in rows:
        assert {"tp", "ep", "dp", "fits", "memory_bytes", "comm_bytes", "step_seconds",
                "recommended"} <= set(r)
        assert r["tp"] * r["dp"] == 64 and isinstance(r["fits"], bool)
        assert ({"params", "grads", "optimizer", "activations", "step_peak"}
                <= set(r["memory_bytes"]))
        for key in r["comm_bytes"]:
            kind, group = key.split("/")
            assert kind in planner.KINDS and group in planner.GROUPS
    best = [r for r in rows if r["recommended"]]
    assert len(best) == 1 and best[0]["fits"]
    assert best[0]["step_seconds"] == min(r["step_seconds"] for r in rows if r["fits"])


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
