#!/usr/bin/env python
"""Our TED MoE layer against DeepSpeed's `deepspeed.moe.layer.MoE`, per layout, on gloo.

For every (TP, EP, DP) one local gloo world runs, on every rank and side by side in the same
loop: our layer with DTD on (and off when TP > 1), DeepSpeed's layer with the same hidden size,
experts, top-k, capacity factor and tokens per rank (where it runs: its TP path fails on gloo as
shipped), our experts alone on this rank's local shapes (the limit: the layer's share of time in
them), and the same expert MLPs as a loop of nn.Linear. Each timed iteration is forward +
backward between two barriers; the table shows medians.

    python bench/moe_layer.py                # default layouts, table
    python bench/moe_layer.py --json         # JSON Lines, one object per (layout, impl, DTD)

Bytes are what this rank sends in one forward + backward: ours from the comm ledger
(megatron.parallel.comm), DeepSpeed's from its all-to-all calls seen by a dispatch mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the project, and the tests' gloo harness
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from harness import ted_groups, world as local_world  # noqa: E402

DEFAULT_LAYOUTS = "1,1,1 1,2,2 1,4,4 2,2,2 2,2,4"


class AllToAllCounter(TorchDispatchMode):
    """Counts the bytes this rank hands to c10d all-to-alls (DeepSpeed's; ours use the ledger)."""

    def __init__(self):
        super().__init__()
        self.calls = self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "alltoall" in str(func):
            self.calls += 1
            self.nbytes += args[1].numel() * args[1].element_size()
        return func(*args, **(kwargs or {}))


def _timed(step) -> float:
    dist.barrier()
    start = time.perf_counter()
    step()
    dist.barrier()
    return (time.perf_counter() - start) * 1000


def _model_config(opts):
    """The model around the layer: only its hidden and FFN sizes and init matter here."""
    from megatron.model import ModelConfig

    return ModelConfig(num_layers=1, hidden_size=opts.hidden, num_attention_heads=1, ffn_hidden_size=opts.ffn,
                       vocab_size=128, max_position_embeddings=8, hidden_dropout=0.0, attention_dropout=0.0)


def _our_layer(opts, groups, dtd: bool):
    from megatron.model.params import init_parameters
    from ted_patches.config import MoEConfig
    from ted_patches.moe_layer import MoELayer

    mcfg = _model_config(opts)
    cfg = MoEConfig(num_experts=opts.experts, layers=(0,), topk=opts.topk, capacity_factor=opts.capacity_factor,
                    eval_capacity_factor=opts.capacity_factor, dtd=dtd)
    holder = torch.nn.Module()
    holder.moe = MoELayer(mcfg, cfg, groups)
    init_parameters(holder, 1234, groups)
    return holder.moe


def measure(tp: int, ep: int, opts) -> list[dict] | None:
    """On every rank of a world of TP x DP; rank 0 returns the rows."""
    groups = ted_groups(tp, ep)
    torch.manual_seed(100 + dist.get_rank() // tp)  # the TP ranks of a group share their input
    x = torch.randn(opts.tokens, opts.hidden, requires_grad=True)  # as inside a model: input grads are needed
    probe = torch.randn(opts.tokens, opts.hidden)

    def step_of(layer):
        def step():
            for p in [x, *layer.parameters()]:
                p.grad = None
            out = layer(x.view(1, -1, opts.hidden))
            y, aux = out[0], out[1]
            aux_loss = aux.loss if hasattr(aux, "loss") else aux
            ((y.view_as(probe) * probe).sum() + 0.01 * aux_loss).backward()
        return step

    impls = {f"ours-dtd={dtd}": step_of(_our_layer(opts, groups, dtd)) for dtd in ([True, False] if tp > 1 else [True])}
    ds_layer = None
    if tp == 1:
        import deepspeed_reference

        ds_layer = deepspeed_reference.build_moe(hidden=opts.hidden, ffn=opts.ffn, experts=opts.experts, ep=ep,
                                                topk=opts.topk, capacity_factor=opts.capacity_factor, drop_tokens=True)
        impls["deepspeed"] = step_of(ds_layer)
    gemm_steps, gemm_shape = _gemm_steps(opts, groups)
    impls.update(gemm_steps)

    bytes_ = {}
    for name, step in impls.items():  # one untimed pass each: warm-up and byte counts
        groups.ledger.reset()
        with AllToAllCounter() as counter:
            step()
        bytes_[name] = dict(a2a=counter.nbytes if name == "deepspeed" else groups.ledger.nbytes("all_to_all", "ep"),
                            ag=groups.ledger.nbytes("all_gather", "tp"), rs=groups.ledger.nbytes("reduce_scatter", "tp"),
                            ar=groups.ledger.nbytes("all_reduce", "tp"))
    times = {name: [] for name in impls}
    for _ in range(opts.warmup + opts.iters):  # interleaved: every implementation sees the same noise
        for name, step in impls.items():
            times[name].append(_timed(step))
    ms = {name: statistics.median(t[opts.warmup:]) for name, t in times.items()}
    if dist.get_rank() != 0:
        return None
    rows = []
    for name in impls:
        if name.startswith("gemms"):
            continue
        impl, dtd = ("deepspeed", False) if name == "deepspeed" else ("ours", name.endswith("True"))
        rows.append(dict(tp=tp, ep=ep, dp=groups.dp.size, topk=opts.topk, impl=impl, dtd=dtd and tp > 1,
                         a2a_bytes_per_rank=bytes_[name]["a2a"], tp_allgather_bytes_per_rank=bytes_[name]["ag"],
                         tp_reduce_scatter_bytes_per_rank=bytes_[name]["rs"],
                         tp_allreduce_bytes_per_rank=bytes_[name]["ar"], ms_fwd_bwd=round(ms[name], 2),
                         ms_expert_gemms=round(ms["gemms"], 2),
                         ms_expert_linear_loop=round(ms["gemms-linear-loop"], 2), expert_gemm_shape=gemm_shape))
    if tp > 1:
        rows.append(dict(tp=tp, ep=ep, dp=groups.dp.size, topk=opts.topk, impl="deepspeed", dtd=False,
                         a2a_bytes_per_rank=None, tp_allgather_bytes_per_rank=None,
                         tp_reduce_scatter_bytes_per_rank=None, tp_allreduce_bytes_per_rank=None, ms_fwd_bwd=None,
                         ms_expert_gemms=round(ms["gemms"], 2),
                         ms_expert_linear_loop=round(ms["gemms-linear-loop"], 2), note="DeepSpeed's TP path does not run on gloo as shipped (its token all-gather "
                              "passes an N-D input to a 1-D output, which gloo rejects)"))
    return rows


def _gemm_steps(opts, groups):
    """This rank's expert computation alone, fwd + bwd, on its local shapes: our batched experts
    (the layer's own GroupedExperts) and, for comparison, a loop of nn.Linear (DeepSpeed's way)."""
    from megatron.model.params import init_parameters
    from ted_patches.experts import GroupedExperts
    from ted_patches.router import token_capacity

    e_local = opts.experts // groups.ep.size
    capacity = token_capacity(opts.tokens, opts.experts, opts.topk, opts.capacity_factor, 4)
    capacity = -(-capacity // groups.tp.size) * groups.tp.size
    n = groups.ep.size * capacity  # tokens per local expert: a capacity block from every EP peer
    f = opts.ffn // groups.tp.size
    mcfg = _model_config(opts)
    holder = torch.nn.Module()
    holder.experts = GroupedExperts(mcfg, e_local, opts.ffn, groups)
    init_parameters(holder, 1, groups)
    linears = [torch.nn.Sequential(torch.nn.Linear(opts.hidden, f), torch.nn.GELU(), torch.nn.Linear(f, opts.hidden))
               for _ in range(e_local)]
    x = torch.randn(e_local, n, opts.hidden, requires_grad=True)
    grad = torch.randn(e_local, n, opts.hidden)

    def batched():
        for t in [x, *holder.parameters()]:
            t.grad = None
        y, bias = holder.experts(x)
        (y + bias[:, None, :]).backward(grad)

    def linear_loop():
        for t in [x, *(p for m in linears for p in m.parameters())]:
            t.grad = None
        torch.stack([m(x[i]) for i, m in enumerate(linears)]).backward(grad)

    return {"gemms": batched, "gemms-linear-loop": linear_loop}, [e_local, n, opts.hidden, f]


def table(rows: list[dict]) -> str:
    head = ("layout (TP,EP,DP)", "impl", "DTD", "a2a B/rank", "TP AG B/rank", "TP RS B/rank", "TP AR B/rank",
            "fwd+bwd ms", "vs DS", "experts alone ms", "share", "nn.Linear loop ms")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    ds = {(r["tp"], r["ep"], r["dp"]): r["ms_fwd_bwd"] for r in rows if r["impl"] == "deepspeed"}
    for r in rows:
        layout = f"({r['tp']},{r['ep']},{r['dp']})"
        if r["ms_fwd_bwd"] is None:
            lines.append(" | ".join([layout, r["impl"], "-", "n/a", "n/a", "n/a", "n/a", "does not run", "-",
                                     f"{r['ms_expert_gemms']:.1f}", "-", f"{r['ms_expert_linear_loop']:.1f}"]))
            continue
        base = ds.get((r["tp"], r["ep"], r["dp"]))
        ratio = f"{r['ms_fwd_bwd'] / base:.2f}" if base and r["impl"] == "ours" else "-"
        lines.append(" | ".join([layout, r["impl"], "on" if r["dtd"] else "off", f"{r['a2a_bytes_per_rank']:,}",
                                 f"{r['tp_allgather_bytes_per_rank']:,}", f"{r['tp_reduce_scatter_bytes_per_rank']:,}",
                                 f"{r['tp_allreduce_bytes_per_rank']:,}", f"{r['ms_fwd_bwd']:.1f}", ratio,
                                 f"{r['ms_expert_gemms']:.1f}", f"{r['ms_expert_gemms'] / r['ms_fwd_bwd']:.0%}",
                                 f"{r['ms_expert_linear_loop']:.1f}"]))
    notes = {r["note"] for r in rows if r.get("note")}
    return "\n".join(lines + [f"note: {n}" for n in notes])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help='space-separated "TP,EP,DP" triples')
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="JSON Lines instead of a table")
    opts = p.parse_args(argv)
    from bench.moe_layer import measure as measure_on_rank  # importable by name in the workers

    cores = os.cpu_count() or 1
    rows = []
    for triple in opts.layouts.split():
        tp, ep, dp = (int(v) for v in triple.split(","))
        world = tp * dp
        threads = max(1, cores // world)
        if world == 1:
            torch.set_num_threads(threads)
            layout_rows = measure_on_rank(tp, ep, opts)
        else:
            layout_rows = local_world(world, threads).run(measure_on_rank, tp, ep, opts, timeout=1800)[0]
        rows += layout_rows
        if opts.json:
            for r in layout_rows:
                print(json.dumps(r), flush=True)
    if not opts.json:
        print(f"MoE layer fwd+bwd: H={opts.hidden} FFN={opts.ffn} E={opts.experts} top-{opts.topk} "
              f"cf={opts.capacity_factor} {opts.tokens} tokens/rank, fp32, gloo, {cores} cores, "
              f"median of {opts.iters}")
        print(table(rows))


if __name__ == "__main__":
    main()
