#!/usr/bin/env python
"""Our TED MoE layer (padded and padding-free) against DeepSpeed's `deepspeed.moe.layer.MoE`,
per layout, capacity factor and routing skew, on gloo.

For every (TP, EP, DP) one local gloo world runs. For every case (capacity factor 1.0, 1.25,
2.0 and no-drop; each with a plain and a skewed router, where one expert gets 4x its share of
the assignments) every rank builds, with the same gate weights and input: our layer padded,
our layer padding-free, both again with DTD off where TP > 1 (rows with `dtd` false: the
all-to-all carries TP times the bytes), DeepSpeed's layer (where it runs: its TP path fails on
gloo as shipped),
the floors: our experts alone on the rows each path computes (the padded buffer
[E_l, TP * EP * C, H]; the real rows, grouped), and the rest: each of our layers with its
experts replaced by the identity (router, dispatch and combine alone, forward and backward).
Each repetition times every one of them in turn (forward + backward between two barriers), so
drift on a shared machine hits all alike; a row
reports the median, min and max over repetitions, and its ratios to DeepSpeed and to the padded
path are the medians (and ranges) of the per-repetition ratios. The order rotates from one
repetition to the next, so no implementation always runs after the same one.

    python bench/moe_layer.py                # the default layouts and every case, a table
    python bench/moe_layer.py --json         # JSON Lines, one object per (layout, case, impl)
    python bench/moe_layer.py --profile      # torch.profiler tables at (1,1,1): where the time goes

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
DEFAULT_CFS = "1.0 1.25 2.0 none"
SKEW_FACTOR = 4  # the skewed expert's assignments / its fair share (K * T / E)
DS_TP_NOTE = ("DeepSpeed's TP path does not run on gloo as shipped (its token all-gather passes an "
              "N-D input to a 1-D output, which gloo rejects)")


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

    return ModelConfig(num_layers=1, hidden_size=opts.hidden, num_attention_heads=1,
                       ffn_hidden_size=opts.ffn, vocab_size=128, max_position_embeddings=8,
                       hidden_dropout=0.0, attention_dropout=0.0)


def _our_layer(opts, groups, cf, pad_free: bool, skew: bool, dtd: bool = True, **router):
    """`router`: MoEConfig's router fields (group-limited rows)."""
    from megatron.model.params import init_parameters
    from ted_patches.config import MoEConfig
    from ted_patches.moe_layer import MoELayer

    cfg = MoEConfig(num_experts=opts.experts, layers=(0,), topk=opts.topk,
                    capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0,
                    drop_tokens=cf is not None, pad_free=pad_free, dtd=dtd, **router)
    holder = torch.nn.Module()
    holder.moe = MoELayer(_model_config(opts), cfg, groups)
    init_parameters(holder, 1234, groups)
    if skew:  # feature 0 speaks to expert 0 alone (the skewed tokens carry it: see _inputs)
        with torch.no_grad():
            holder.moe.router.weight[:, 0] = 0.0
            holder.moe.router.weight[0, 0] = 1.0
    return holder.moe


def _inputs(opts, groups, skew: bool):
    """This rank's tokens (shared by its TP group) and a fixed output probe. Skewed: the first
    SKEW_FACTOR * K * T / E tokens carry feature 0 = 10, which makes expert 0 their first choice."""
    gen = torch.Generator().manual_seed(100 + dist.get_rank() // groups.tp.size)
    x = torch.randn(opts.tokens, opts.hidden, generator=gen)
    probe = torch.randn(opts.tokens, opts.hidden, generator=gen)
    if skew:
        x[: min(opts.tokens, round(SKEW_FACTOR * opts.topk * opts.tokens / opts.experts)), 0] = 10.0
    return x.requires_grad_(True), probe  # as inside a model: input gradients are needed


def _ds_layer(opts, groups, cf, gate_weight):
    import deepspeed_reference

    layer = deepspeed_reference.build_moe(hidden=opts.hidden, ffn=opts.ffn, experts=opts.experts,
                                          ep=groups.ep.size, topk=opts.topk,
                                          capacity_factor=cf or 1.0, drop_tokens=cf is not None)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(gate_weight)  # the same routing as ours
    return layer


def _step_of(layer, x, probe, hidden):
    def step():
        for p in [x, *layer.parameters()]:
            p.grad = None
        out = layer(x.view(1, -1, hidden))
        y, aux = out[0], out[1]
        aux_loss = aux.loss if hasattr(aux, "loss") else aux
        # the gradient of (y * probe).sum() + 0.01 * aux, fed straight in as the floor's is (no loss
        # arithmetic of the benchmark's own counted as the layer's)
        torch.autograd.backward([y, aux_loss], [probe.view_as(y), torch.tensor(0.01)])
    return step


def _without_experts(layer, step):
    """`step` with our experts replaced by the identity (no GEMMs): what is left is the router,
    dispatch and combine, forward and backward, timed on their own."""
    experts = layer.experts

    def identity(x, *args, **kwargs):
        return x

    def run():
        experts.forward = experts.forward_packed = identity
        try:
            step()
        finally:
            del experts.forward, experts.forward_packed
    return run


def _expert_shapes(layer, step):
    """Run `step` once, recording what our experts were given: ("padded", [E_l, N, H]) or
    ("packed", counts)."""
    seen = {}
    experts = layer.experts
    forward, packed = experts.forward, experts.forward_packed

    def spy_forward(x, fc2_bias=None):
        seen["shape"] = ("padded", list(x.shape))
        return forward(x, fc2_bias)

    def spy_packed(x, counts, fc2_bias=None, backend=None):
        seen["shape"] = ("packed", list(counts))
        return packed(x, counts, fc2_bias, backend)

    experts.forward, experts.forward_packed = spy_forward, spy_packed
    try:
        step()
    finally:
        del experts.forward, experts.forward_packed
    return seen["shape"]


def _gemm_step(experts, shape, hidden):
    """The experts alone, forward + backward, on the rows one path computes."""
    kind, dims = shape
    if kind == "padded":
        x, grad = torch.randn(*dims, requires_grad=True), torch.randn(*dims)
    else:
        x, grad = torch.randn(sum(dims), hidden, requires_grad=True), torch.randn(sum(dims), hidden)

    def step():
        for t in [x, *experts.parameters()]:
            t.grad = None
        if kind == "padded":  # as the layer runs them: the fc2 bias inside the GEMM
            y = experts(x, experts.b2)
        else:
            y = experts.forward_packed(x, dims, experts.b2)
        y.backward(grad)
    return step


def _summary(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return dict(median=statistics.median(ts), min=min(ts), max=max(ts), iqr=q[2] - q[0])


# our layer padded and padding-free (DTD on where TP > 1), the same with DTD off (TP > 1 only),
# DeepSpeed's (TP 1 only)
IMPLS = ("padded", "pad-free", "padded dtd-off", "pad-free dtd-off", "deepspeed")


def _name(pad_free: bool, dtd: bool) -> str:
    return ("pad-free" if pad_free else "padded") + ("" if dtd else " dtd-off")


def _layer_of(layers: dict, name: str):
    pad_free = name.startswith("pad-free")
    return layers[pad_free, "off"] if name.endswith("dtd-off") else layers[pad_free]


def measure(tp: int, ep: int, opts) -> list[dict] | None:
    """On every rank of a world of TP x DP; rank 0 returns the rows."""
    _allocator(opts)
    groups = ted_groups(tp, ep)
    rows = []
    for cf in opts.cfs:
        for skew in opts.skews:
            rows += (_group_limited_case(groups, opts, cf, skew) if opts.group_limited
                     else _measure_case(groups, opts, cf, skew))
    return rows if dist.get_rank() == 0 else None


def _allocator(opts) -> None:
    """As pretrain_gpt_moe.py does on CPUs (for every implementation alike), unless --raw-malloc."""
    from megatron.launch.initialize import keep_freed_memory_mapped

    if not opts.raw_malloc:
        keep_freed_memory_mapped()


def _measure_case(groups, opts, cf, skew: bool) -> list[dict]:
    tp, ep = groups.tp.size, groups.ep.size
    x, probe = _inputs(opts, groups, skew)
    layers = {pf: _our_layer(opts, groups, cf, pf, skew) for pf in (False, True)}
    steps = {"padded": _step_of(layers[False], x, probe, opts.hidden),
             "pad-free": _step_of(layers[True], x, probe, opts.hidden)}
    if tp == 1:
        steps["deepspeed"] = _step_of(_ds_layer(opts, groups, cf, layers[False].router.weight),
                                      x, probe, opts.hidden)
    else:  # DTD off beside on: the all-to-all carries TP times the bytes (the paper's saving)
        for pf in (False, True):
            layers[pf, "off"] = _our_layer(opts, groups, cf, pf, skew, dtd=False)
            steps[_name(pf, False)] = _step_of(layers[pf, "off"], x, probe, opts.hidden)
    info, shapes = {}, {}
    # one untimed pass each: warm-up, bytes, expert shapes
    for name in IMPLS:
        if name not in steps:
            continue
        groups.ledger.reset()
        with AllToAllCounter() as counter:
            if name == "deepspeed":
                steps[name]()
            else:
                shapes[name] = _expert_shapes(_layer_of(layers, name), steps[name])
        info[name] = dict(a2a=(counter.nbytes if name == "deepspeed"
                               else groups.ledger.nbytes("all_to_all", "ep")),
                          ag=groups.ledger.nbytes("all_gather", "tp"),
                          rs=groups.ledger.nbytes("reduce_scatter", "tp"),
                          ar=groups.ledger.nbytes("all_reduce", "tp"))
    steps["gemms-padded"] = _gemm_step(layers[False].experts, shapes["padded"], opts.hidden)
    steps["gemms-pad-free"] = _gemm_step(layers[True].experts, shapes["pad-free"], opts.hidden)
    for name in [n for n in IMPLS if n in steps and n != "deepspeed"]:
        steps["rest-" + name] = _without_experts(_layer_of(layers, name), steps[name])
    with torch.no_grad():
        _, aux = layers[False](x.view(1, -1, opts.hidden))
    dropped = aux.dropped
    times = {name: [] for name in steps}
    names = list(steps)
    # interleaved: every implementation sees the same noise, each in every position in turn
    for rep in range(opts.warmup + opts.iters):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(_timed(steps[name]))
    times = {name: t[opts.warmup:] for name, t in times.items()}
    if dist.get_rank() != 0:
        return []

    def ratio(a, b):
        r = [p / q for p, q in zip(times[a], times[b])]
        return round(statistics.median(r), 3), round(min(r), 3), round(max(r), 3)

    out = []
    for name in [n for n in IMPLS if n in steps or n == "deepspeed"]:
        pad_free = name.startswith("pad-free")
        floor = "gemms-pad-free" if pad_free else "gemms-padded"
        kind, dims = shapes.get(name, shapes["pad-free" if pad_free else "padded"])
        row = dict(impl="deepspeed" if name == "deepspeed" else "ours", tp=tp, ep=ep,
                   dp=groups.dp.size, topk=opts.topk, capacity_factor=cf, pad_free=pad_free,
                   skew=skew, dtd=tp > 1 and name in ("padded", "pad-free"),
                   tokens_per_rank=opts.tokens, dropped=round(dropped, 4),
                   expert_rows=dims[0] * dims[1] if kind == "padded" else sum(dims),
                   reps=opts.iters)
        if name not in steps:
            out.append(dict(row, ms_fwd_bwd=None, ms_expert_gemms=None, a2a_bytes_per_rank=None,
                            note=DS_TP_NOTE))
            continue
        t, g = _summary(times[name]), _summary(times[floor])
        row.update(ms_fwd_bwd=round(t["median"], 2), ms_fwd_bwd_min=round(t["min"], 2),
                   ms_fwd_bwd_max=round(t["max"], 2),
                   ms_fwd_bwd_iqr=round(t["iqr"], 2), ms_expert_gemms=round(g["median"], 2),
                   ms_expert_gemms_min=round(g["min"], 2), ms_expert_gemms_max=round(g["max"], 2),
                   overhead_vs_gemms=ratio(name, floor)[0] - 1,
                   ms_router_dispatch_combine=None, router_dispatch_combine_vs_gemms=None,
                   a2a_bytes_per_rank=info[name]["a2a"],
                   tp_allgather_bytes_per_rank=info[name]["ag"],
                   tp_reduce_scatter_bytes_per_rank=info[name]["rs"],
                   tp_allreduce_bytes_per_rank=info[name]["ar"])
        row["overhead_vs_gemms"] = round(row["overhead_vs_gemms"], 3)
        if name != "deepspeed":
            rest = "rest-" + name
            row["ms_router_dispatch_combine"] = round(_summary(times[rest])["median"], 2)
            row["router_dispatch_combine_vs_gemms"] = ratio(rest, floor)[0]
        if "deepspeed" in steps and name != "deepspeed":
            (row["ratio_vs_deepspeed"], row["ratio_vs_deepspeed_min"],
             row["ratio_vs_deepspeed_max"]) = ratio(name, "deepspeed")
        if pad_free:
            (row["ratio_vs_padded"], row["ratio_vs_padded_min"],
             row["ratio_vs_padded_max"]) = ratio(name, _name(False, row["dtd"] or tp == 1))
        out.append(row)
    return out


def _destinations(layer, x) -> dict:
    """What one forward's routing sends over EP: the kept (token, expert) assignments (one row
    each in our all-to-all), the distinct (token, EP rank) pairs among them (what a dispatcher
    sending a token once per destination rank would carry), and the most EP ranks one token
    reaches."""
    with torch.no_grad():
        routing = layer.router(x.detach())
    local = layer.cfg.num_experts // layer.groups.ep.size
    token, rank = routing.token_N, routing.expert_N // local
    pairs_TR = torch.zeros(routing.num_tokens, layer.groups.ep.size, dtype=torch.bool)
    pairs_TR[token, rank] = True
    return dict(assignments=int(token.numel()), pairs=int(pairs_TR.sum()),
                max_ranks=int(pairs_TR.sum(1).max()))


def _group_limited_case(groups, opts, cf, skew: bool) -> list[dict]:
    """--group-limited g: our layer with the experts in EP groups (--moe-router-num-groups = EP,
    each group one EP rank's experts) and each token limited to g of them, beside unlimited
    routing; padded and padding-free, DTD on (and off where TP > 1): the all-to-all's bytes per
    rank, and what one row per (token, destination rank) would send instead."""
    tp, ep = groups.tp.size, groups.ep.size
    x, probe = _inputs(opts, groups, skew)
    limited = dict(router_num_groups=ep, router_group_topk=opts.group_limited)
    rows = []
    variants = [("unlimited", {}, False), (f"group-limited g={opts.group_limited}", limited, False),
                (f"group-limited g={opts.group_limited}", limited, True)]
    for routing, router, per_assignment in variants:
        for pad_free in ((True,) if per_assignment else (False, True)):
            for dtd in ((True, False) if tp > 1 else (True,)):
                layer = _our_layer(opts, groups, cf, pad_free, skew, dtd=dtd, **router)
                if per_assignment:  # the same routing, one row per (token, expert)
                    layer.dispatcher.per_rank = False
                step = _step_of(layer, x, probe, opts.hidden)
                groups.ledger.reset()
                step()
                a2a = groups.ledger.nbytes("all_to_all", "ep")
                sent = _destinations(layer, x)
                ts = [_timed(step) for _ in range(opts.warmup + opts.iters)][opts.warmup:]
                rows.append(dict(
                    impl="ours", routing=routing, tp=tp, ep=ep, dp=groups.dp.size,
                    # what the padding-free path sends one row for (ted_patches/per_rank.py)
                    row_per=("(token, EP rank)" if pad_free and layer.dispatcher.per_rank
                             else "(token, expert)"),
                    topk=opts.topk, experts=opts.experts, capacity_factor=cf, pad_free=pad_free,
                    skew=skew, dtd=dtd and tp > 1, tokens_per_rank=opts.tokens,
                    ms_fwd_bwd=round(_summary(ts)["median"], 2), a2a_bytes_per_rank=a2a,
                    assignments_sent=sent["assignments"], token_rank_pairs=sent["pairs"],
                    max_ep_ranks_per_token=sent["max_ranks"],
                    # per-assignment rows: what one row per (token, rank) would carry
                    a2a_bytes_per_rank_one_row_per_destination=(
                        round(a2a * sent["pairs"] / sent["assignments"])
                        if pad_free and not layer.dispatcher.per_rank and sent["assignments"]
                        else None),
                    reps=opts.iters))
    return rows


def profile_tables(opts, rows: int = 25) -> str:
    """torch.profiler tables (self CPU time) of one layer forward + backward at (1,1,1), for each
    implementation and the first capacity factor; the experts' GEMMs are the bmm / mm / addmm
    rows."""
    from torch.profiler import ProfilerActivity, profile

    _allocator(opts)
    groups = ted_groups(1, 1)
    cf = opts.cfs[0]
    x, probe = _inputs(opts, groups, False)
    layers = {pf: _our_layer(opts, groups, cf, pf, False) for pf in (False, True)}
    steps = {"ours padded": _step_of(layers[False], x, probe, opts.hidden),
             "ours pad-free": _step_of(layers[True], x, probe, opts.hidden),
             "deepspeed": _step_of(_ds_layer(opts, groups, cf, layers[False].router.weight), x,
                                   probe, opts.hidden)}
    out = []
    for name, step in steps.items():
        for _ in range(opts.warmup + 1):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(opts.iters):
                step()
        out.append(f"== {name}: cf {cf}, {opts.iters} forward + backward, "
                   f"{torch.get_num_threads()} threads ==")
        out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    head = ("layout (TP,EP,DP)", "cf", "skew", "impl", "rows", "a2a B/rank", "fwd+bwd ms (min-max)",
            "experts ms", "overhead", "route+dispatch+combine ms (/ experts)", "vs DS (min-max)",
            "vs padded (min-max)")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        layout = f"({r['tp']},{r['ep']},{r['dp']})"
        cf = "no-drop" if r["capacity_factor"] is None else f"{r['capacity_factor']:g}"
        impl = ("deepspeed" if r["impl"] == "deepspeed"
                else ("ours pad-free" if r["pad_free"] else "ours padded")
                + ("" if r["dtd"] or r["tp"] == 1 else ", DTD off"))
        if r["ms_fwd_bwd"] is None:
            lines.append(" | ".join([layout, cf, "on" if r["skew"] else "off", impl, "-", "-",
                                     "does not run", "-", "-", "-", "-", "-"]))
            continue

        def rng(key):
            return (f"{r[key]:.2f} ({r[key + '_min']:.2f}-{r[key + '_max']:.2f})" if key in r
                    else "-")

        lines.append(" | ".join([
            layout, cf, "on" if r["skew"] else "off", impl, f"{r['expert_rows']:,}",
            f"{r['a2a_bytes_per_rank']:,}",
            f"{r['ms_fwd_bwd']:.1f} ({r['ms_fwd_bwd_min']:.1f}-{r['ms_fwd_bwd_max']:.1f})",
            f"{r['ms_expert_gemms']:.1f}",
            f"{r['overhead_vs_gemms']:+.1%}",
            "-" if r["ms_router_dispatch_combine"] is None else
            f"{r['ms_router_dispatch_combine']:.2f} ({r['router_dispatch_combine_vs_gemms']:.1%})",
            rng("ratio_vs_deepspeed"), rng("ratio_vs_padded")]))
    notes = {r["note"] for r in rows if r.get("note")}
    return "\n".join(lines + [f"note: {n}" for n in notes])


def group_table(rows: list[dict]) -> str:
    head = ("layout (TP,EP,DP)", "cf", "skew", "routing", "path", "one row per", "DTD",
            "max EP ranks/token", "a2a B/rank", "estimate at one row per (token, rank)",
            "fwd+bwd ms")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        cf = "no-drop" if r["capacity_factor"] is None else f"{r['capacity_factor']:g}"
        dedup = r["a2a_bytes_per_rank_one_row_per_destination"]
        lines.append(" | ".join([
            f"({r['tp']},{r['ep']},{r['dp']})", cf, "on" if r["skew"] else "off", r["routing"],
            "pad-free" if r["pad_free"] else "padded", r["row_per"], "on" if r["dtd"] else "off",
            str(r["max_ep_ranks_per_token"]), f"{r['a2a_bytes_per_rank']:,}",
            "-" if dedup is None else f"{dedup:,}", f"{r['ms_fwd_bwd']:.1f}"]))
    return "\n".join(lines)


def _cf(value: str):
    return None if value.lower() in ("none", "no-drop", "nodrop") else float(value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help='space-separated "TP,EP,DP" triples')
    p.add_argument("--capacity-factors", default=DEFAULT_CFS,
                   help='space-separated; "none": no-drop mode')
    p.add_argument("--skew", default="off on", help='"off", "on" or "off on"')
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--iters", type=int, default=7,
                   help="timed repetitions of each implementation")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed repetitions first (after one warm-up pass each)")
    p.add_argument("--raw-malloc", action="store_true",
                   help="leave glibc's malloc returning freed memory to the kernel "
                        "(pretrain_gpt_moe.py stops that on CPUs: "
                        "megatron.launch.initialize.keep_freed_memory_mapped)")
    p.add_argument("--group-limited", type=int, default=None, metavar="G",
                   help="instead of the comparison: unlimited vs group-limited routing (the EP "
                        "ranks as groups, each token limited to G of them): a2a bytes per rank "
                        "and what one row per (token, destination rank) would send")
    p.add_argument("--fine-grained", action="store_true",
                   help="Megatron-Core's fine-grained MoE point: 64 experts, FFN = hidden / 4, "
                        "top-8 (overrides --experts, --ffn, --topk)")
    p.add_argument("--json", action="store_true", help="JSON Lines instead of a table")
    p.add_argument("--profile", action="store_true",
                   help="profiler tables at (1,1,1) instead of the timings")
    opts = p.parse_args(argv)
    opts.cfs = [_cf(v) for v in opts.capacity_factors.split()]
    opts.skews = [{"off": False, "on": True}[v] for v in opts.skew.split()]
    if opts.fine_grained:
        opts.experts, opts.ffn, opts.topk = 64, opts.hidden // 4, 8
    from bench.moe_layer import measure as measure_on_rank  # importable by name in the workers

    cores = os.cpu_count() or 1
    if opts.profile:
        torch.set_num_threads(cores)
        print(profile_tables(opts))
        return
    rows = []
    for triple in opts.layouts.split():
        tp, ep, dp = (int(v) for v in triple.split(","))
        world = tp * dp
        threads = max(1, cores // world)
        if world == 1:
            torch.set_num_threads(threads)
            layout_rows = measure_on_rank(tp, ep, opts)
        else:
            layout_rows = local_world(world, threads).run(measure_on_rank, tp, ep, opts,
                                                          timeout=3600)[0]
        rows += layout_rows
        if opts.json:
            for r in layout_rows:
                print(json.dumps(r), flush=True)
    if not opts.json:
        print(f"MoE layer fwd+bwd: H={opts.hidden} FFN={opts.ffn} E={opts.experts} "
              f"top-{opts.topk} {opts.tokens} tokens/rank, fp32, gloo, {cores} cores; "
              f"{opts.iters} interleaved repetitions (median, min-max); skew: one expert gets "
              f"{SKEW_FACTOR}x its share")
        print(group_table(rows) if opts.group_limited else table(rows))


if __name__ == "__main__":
    main()
