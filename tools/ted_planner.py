#!/usr/bin/env python
"""TED layout planner: every valid (TP, SP, CP, PP, EP, ETP, DP) of a GPT-MoE on a cluster,
ranked, with per-GPU memory, per-step communication and an estimated step time (megatron/plan/).

examples:
    python tools/ted_planner.py --preset 6.7b --cluster summit-v100-16gb --gpus 128 \\
        --micro-batch-size 4 --global-batch-size 1024 --fp16 --use-distributed-optimizer \\
        --recompute-granularity full --recompute-method uniform
    python tools/ted_planner.py --gpus 64 --cluster a100-40gb --num-layers 24 --hidden-size 2048 \\
        --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048 \\
        --num-experts 16 --expert-interval 2 --vocab-size 50256 --micro-batch-size 1 \\
        --global-batch-size 512 --bf16 --json
    python tools/ted_planner.py --preset 13b --gpus 64 --micro-batch-size 1 \\
        --global-batch-size 512 --fp16 --use-distributed-optimizer \\
        --recompute-granularity full --recompute-method uniform --pipeline-model-parallel-size 1
    python tools/ted_planner.py --preset 1.3b --cluster a100-40gb --gpus 32 \\
        --micro-batch-size 1 --global-batch-size 256 --bf16 --pipeline-schedule interleaved \\
        --num-virtual-stages-per-pipeline-rank 2 --plot plan.png
    python tools/ted_planner.py --preset 2.7b --cluster h100-80gb --gpus 64 \\
        --micro-batch-size 2 --global-batch-size 512 --bf16 --tensor-model-parallel-size 4 \\
        --sequence-parallel --expert-tensor-parallel-size 1 --pipeline-model-parallel-size 1
    python tools/ted_planner.py --paper      # the model's figures for the paper's two claims

The model is given by pretrain_gpt_moe.py's own flags (all of them: what it would train is what
is planned), or a --preset base with 16 experts every other layer, the flags that follow
overriding it. --tensor-model-parallel-size / --pipeline-model-parallel-size /
--expert-model-parallel-size / --expert-tensor-parallel-size / --context-parallel-size, when
given, restrict the layouts to
those sizes (e.g. --pipeline-model-parallel-size 1: no pipeline); --sequence-parallel restricts
them to sequence parallelism at TP > 1, --no-sequence-parallel to none. Without them every TP,
every experts' grid (ETP x EP dividing the GPUs of a stage: Megatron-Core's MoE parallel folding,
ETP = TP the classic TED layout), SP on and off at TP > 1, every CP whose 2 x CP chunks divide the
sequence (and TP x CP the GPUs of a stage), and every PP that divides the layers and
the GPUs is tried, with the schedule --pipeline-schedule names (default 1f1b) and its rule on the
micro-batches per step (global batch / (micro batch x DP): 1f1b needs at least PP, interleaved a
multiple of PP). --json prints one JSON object per layout; --plot FILE.png draws memory and step
time per layout (needs matplotlib; the memory axis is clipped at 1.5 x the GPU memory, taller
bars marked with their size). Bad input: one `error:` line, exit status 2.

columns (memory in GiB per GPU: the pipeline rank that needs the most; time in seconds per step):
    TP, PP, EP, DP  tensor-, pipeline-, expert- and data-parallel sizes (GPUs = TP x CP x PP x DP)
    SP              sequence parallelism (--sequence-parallel): "y" where the hidden state
                    outside attention and the MLPs is split over TP
    CP              context parallelism (--context-parallel-size): the ranks splitting each
                    sequence (keys and values all-gathered over them in every attention layer)
    ETP             the experts' own TP size (--expert-tensor-parallel-size; default TP)
    EDP             expert-data-parallel size, GPUs / (PP x ETP x EP): the replicas of each
                    expert shard
    m               micro-batches per step and DP rank: global batch / (micro batch x DP)
    params, grads   this GPU's parameters and gradients (ZeRO-1 padding included)
    optim           fp32 master weights and Adam moments (sharded over DP / EDP with ZeRO-1)
    activ           the activation peak: what the micro-batches in flight keep for backward
                    (with a pipeline, as many as its schedule keeps on that rank) plus the
                    largest transient of a forward or backward
    step pk         the optimizer step's peak temporaries (upcast tiles, ZeRO-1's gathered
                    buffer); live at another time than activ, so total counts the larger
    total           params + grads + optim + max(activ, step pk) + the runtime's reserve
    fits            total <= the GPU's memory
    step s          compute s + comm s + bubble s, of the pipeline rank that finishes last
    compute s       FLOPs at the assumed efficiency of the peak
    comm s          every collective and P2P send, serialized (alpha-beta model)
    bubble s        pipeline idle time: the schedule's bubble ((P-1)/(m+P-1) of the step for
                    1f1b and gpipe, (P-1)/(V m+P-1) interleaved, 0 assumed for zbv and
                    dualpipev) plus waiting for a slower stage
    largest comm    the three largest (kind/group: GB sent per rank per step)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# Runnable as `python tools/ted_planner.py` from anywhere: the repo root holds megatron/training.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

from megatron.cli import arguments  # noqa: E402
from megatron import plan as planner  # noqa: E402
from megatron.cli.arguments import ConfigError, build_parser  # noqa: E402
from megatron.cli.configs import build_config, tokenizer_kwargs  # noqa: E402

PROG = "ted_planner.py"
GIB = 2**30
LAYOUT_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                "--expert-model-parallel-size", "--expert-tensor-parallel-size",
                "--sequence-parallel", "--context-parallel-size")


class UsageError(Exception):
    """Bad planner input: the message names the flag."""


def _one_line_error(message: str):
    raise UsageError(message)


def planner_parser() -> argparse.ArgumentParser:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog=PROG, description=head, epilog=rest, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = _one_line_error
    p.add_argument("--preset", choices=list(planner.BASES),
                   help="a GPT-3-style base (the paper's: 1.3b, 2.7b, 6.7b) with 16 experts every "
                        "other layer")
    p.add_argument("--cluster", choices=list(planner.NODE_PRESETS), default="summit-v100-16gb",
                   help="node type (constants and sources in megatron/plan/time.py)")
    p.add_argument("--gpus", type=int, help="GPUs in the run (nodes are filled in rank order)")
    p.add_argument("--gpus-per-node", type=int, help="override the node preset")
    p.add_argument("--gpu-memory-gib", type=float, help="memory per GPU, GiB")
    p.add_argument("--intra-node-bandwidth-gbs", type=float, help="per GPU, per direction, GB/s")
    p.add_argument("--intra-node-latency-us", type=float, help="per collective step, microseconds")
    p.add_argument("--inter-node-bandwidth-gbs", type=float,
                   help="per node (all its NICs), per direction, GB/s")
    p.add_argument("--inter-node-latency-us", type=float, help="per collective step, microseconds")
    p.add_argument("--peak-tflops", type=float,
                   help="peak dense FLOP/s per GPU at the training precision, TFLOP/s")
    p.add_argument("--compute-efficiency", type=float,
                   help="fraction of the peak the GEMMs reach (assumed: 0.5)")
    p.add_argument("--reserved-gib", type=float, help="per GPU for the runtime itself (assumed: 1)")
    p.add_argument("--no-sequence-parallel", action="store_true",
                   help="plan only layouts without sequence parallelism (--sequence-parallel: "
                        "only with it, at TP > 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per layout")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw memory and step time per layout (matplotlib)")
    p.add_argument("--paper", action="store_true",
                   help="the model's figures for the paper's claims (6.7B base, 16 experts, "
                        "128 V100-16GB)")
    return p


# ---- flags -> configurations --------------------------------------------------------------------
def parse(argv: list[str]):
    """(planner options, pretrain_gpt_moe.py's namespace, which layout flags were given)."""
    opts, rest = planner_parser().parse_known_args(argv)
    if opts.paper:
        return opts, None, set()
    given = set()
    for flag in LAYOUT_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            given.add(flag)
    if opts.no_sequence_parallel:
        if "--sequence-parallel" in given:
            raise UsageError("--sequence-parallel and --no-sequence-parallel contradict each "
                             "other: give one")
        given.add("--no-sequence-parallel")
    model_argv = (planner.preset_flags(opts.preset) if opts.preset else []) + rest
    args = pretrain_args(model_argv)
    if args.global_batch_size is None and opts.gpus:
        # one global batch for every layout (pretrain's default, micro x DP, would differ per
        # layout and make their step times incomparable): micro x GPUs
        args.global_batch_size = args.micro_batch_size * opts.gpus
    return opts, args, given


def pretrain_args(argv: list[str]) -> argparse.Namespace:
    """pretrain_gpt_moe.py's parser on the model's flags, the ones a plan does not need filled."""
    fill = {"--train-iters": "1", "--lr": "1e-4", "--micro-batch-size": "1"}
    argv = ([a for flag, value in fill.items() if flag not in argv for a in (flag, value)]
            + list(argv))
    if "--data-path" not in argv and "--mock-data" not in argv:
        argv.append("--mock-data")
    p = build_parser()
    p.prog, p.error = PROG, _one_line_error
    args = p.parse_args(argv)
    # the peers' spellings, as parse_args maps them
    resolve = getattr(arguments, "resolve_peer_args", None)
    if resolve is not None:
        try:
            args.notices = resolve(args, argv, p)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return args


# flag -> (Cluster field, unit, lowest allowed, whether the lowest itself is allowed)
CLUSTER_FLAGS = {
    "--gpus-per-node": ("gpus_per_node", 1, 1, True),
    "--gpu-memory-gib": ("memory_bytes", GIB, 0, False),
    "--intra-node-bandwidth-gbs": ("intra_bandwidth", 1e9, 0, False),
    "--intra-node-latency-us": ("intra_latency", 1e-6, 0, True),
    "--inter-node-bandwidth-gbs": ("inter_bandwidth", 1e9, 0, False),
    "--inter-node-latency-us": ("inter_latency", 1e-6, 0, True),
    "--peak-tflops": ("peak_flops", 1e12, 0, False),
    "--compute-efficiency": ("efficiency", 1, 0, False),
    "--reserved-gib": ("reserved_bytes", GIB, 0, True),
}


def cluster_from(opts) -> planner.Cluster:
    if opts.gpus is None:
        raise UsageError("--gpus is required: the number of GPUs to plan for")
    if opts.gpus < 1:
        raise UsageError(f"--gpus must be >= 1 (got {opts.gpus})")
    overrides = {}
    for flag, (key, unit, lowest, inclusive) in CLUSTER_FLAGS.items():
        value = getattr(opts, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if (value < lowest or (value == lowest and not inclusive)
                or (key == "efficiency" and value > 1)):
            rule = "in (0, 1]" if key == "efficiency" else f"{'>=' if inclusive else '>'} {lowest}"
            raise UsageError(f"{flag} must be {rule} (got {value})")
        scaled = value * unit
        overrides[key] = (int(scaled) if key in ("gpus_per_node", "memory_bytes", "reserved_bytes")
                          else scaled)
    return planner.cluster_preset(opts.cluster, opts.gpus, **overrides)


def vocabulary(args) -> int:
    from megatron.data.tokenizer import build_tokenizer

    try:
        return build_tokenizer(**tokenizer_kwargs(args)).vocab_size
    except (ConfigError, ValueError, TypeError, FileNotFoundError, OSError) as e:
        hint = (" (give --vocab-size N, or --tokenizer-type with its files)"
                if args.vocab_size is None else "")
        raise UsageError(f"tokenizer: {e}{hint}") from None


def _sizes(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grid_layouts(stage: int, args, given: set[str]):
    """(TP, SP, CP, ETP, EP) of one pipeline stage's `stage` ranks, the flags given restricting
    them: TP x CP dividing the stage, 2 x CP the sequence; the experts' grid ETP x EP dividing
    the stage too (expert-DP the rest); SP on and off at TP > 1."""
    def pick(flag: str, value: int, sizes: list[int]) -> list[int]:
        return [value] if flag in given else sizes

    sp_choices = ((True,) if "--sequence-parallel" in given else
                  (False,) if "--no-sequence-parallel" in given else (False, True))
    for tp in pick("--tensor-model-parallel-size", args.tensor_model_parallel_size,
                   _sizes(stage)):
        for etp in pick("--expert-tensor-parallel-size", args.expert_tensor_parallel_size or tp,
                        _sizes(stage)):
            for ep in pick("--expert-model-parallel-size", args.expert_model_parallel_size,
                           _sizes(stage)):
                if stage % tp or etp < 1 or stage % (etp * ep):
                    continue
                for cp in pick("--context-parallel-size", args.context_parallel_size,
                               [c for c in _sizes(stage // tp)
                                if args.seq_length % (2 * c) == 0]):
                    for sp in sorted({s and tp > 1 for s in sp_choices}):
                        yield tp, sp, cp, etp, ep


def layout_configs(args, world: int, given: set[str]) -> tuple[list, list[str]]:
    """The Config of every layout build_config accepts (what pretrain_gpt_moe.py would run: PP
    dividing the layers and the GPUs, the schedule's rule on the micro-batches, the model's
    sizes dividing by TP, EP and ETP), and why the others were refused."""
    vocab = vocabulary(args)
    configs, refused = [], []
    for pp in range(1, world + 1):
        if world % pp or ("--pipeline-model-parallel-size" in given
                          and pp != args.pipeline_model_parallel_size):
            continue
        # build_config refuses what the model's sizes rule out
        for tp, sp, cp, etp, ep in grid_layouts(world // pp, args, given):
            layout = argparse.Namespace(**vars(args))
            layout.tensor_model_parallel_size, layout.expert_model_parallel_size = tp, ep
            layout.pipeline_model_parallel_size, layout.context_parallel_size = pp, cp
            layout.expert_tensor_parallel_size, layout.sequence_parallel = etp, sp
            try:
                configs.append(build_config(layout, world, vocab))
            except ConfigError as e:
                refused.append(f"TP={tp}{' SP' if sp else ''} CP={cp} PP={pp} EP={ep} "
                               f"ETP={etp}: {e}")
    return configs, refused


def plan_all(args, cluster: planner.Cluster, given: set[str]) -> list[planner.LayoutPlan]:
    configs, refused = layout_configs(args, cluster.gpus, given)
    if not configs and given:  # the sizes asked for: build_config says which flag is wrong and why
        build_config(args, cluster.gpus, vocabulary(args))
    if not configs:
        reason = refused[0] if refused else "no TP and EP sizes divide it"
        raise UsageError(f"--gpus {cluster.gpus}: no (TP, PP, EP, DP) layout fits the model and "
                         f"batch ({reason})")
    return [planner.plan_layout(cfg, cluster) for cfg in configs]


def ranked(plans: list[planner.LayoutPlan]) -> list[planner.LayoutPlan]:
    """Fitting layouts fastest first, then the others by memory."""
    return sorted(plans, key=lambda p: (not p.fits, p.time.total if p.fits else p.memory.total,
                                        p.tp, p.pp, p.ep, p.etp, p.sp, p.cp))


# ---- output -------------------------------------------------------------------------------------
def table(plans: list[planner.LayoutPlan], best, cluster: planner.Cluster, args) -> str:
    p0 = plans[0]
    lines = [
        f"{p0.total_params / 1e9:.2f}B parameters ({args.num_layers} layers, "
        f"hidden {args.hidden_size}, {' / '.join(map(str, args.num_experts or [1]))} experts); "
        f"{cluster.gpus} x {cluster.name} ({cluster.gpus_per_node} per node, "
        f"{cluster.memory_bytes / GIB:.0f} GiB, {cluster.peak_flops / 1e12:.0f} "
        f"TFLOP/s at efficiency {cluster.efficiency}); GiB per GPU (with PP: the pipeline rank "
        "needing the most), seconds and GB per rank per step (the rank finishing last)",
    ]
    schedules = sorted({p.schedule for p in plans if p.pp > 1})
    if schedules:
        lines.append(f"pipeline schedule: {', '.join(schedules)}; m = micro-batches per step and "
                     "DP rank")
    for note in sorted({n for p in plans for n in p.notes}):
        lines.append(f"note: {note}")
    head = ("", "TP", "SP", "CP", "PP", "EP", "ETP", "DP", "EDP", "m", "params", "grads", "optim",
            "activ",
            "step pk", "total", "fits", "step s", "compute s", "comm s", "bubble s",
            "largest comm (GB/rank/step)")
    rows = [head]
    for p in ranked(plans):
        m = p.memory
        comm = sorted(((f"{k}/{g}", t.bytes) for (k, g), t in p.comm.items()),
                      key=lambda kv: -kv[1])[:3]
        rows.append((
            "*" if p is best else "", str(p.tp), "y" if p.sp else "-", str(p.cp), str(p.pp),
            str(p.ep),
            str(p.etp), str(p.dp), str(p.edp), str(p.microbatches),
            *(f"{v / GIB:.2f}" for v in (m.params, m.grads, m.optimizer, m.activations,
                                         m.step_peak, m.total)),
            "yes" if p.fits else "NO", f"{p.time.total:.3f}", f"{p.time.compute:.3f}",
            f"{sum(p.time.comm.values()):.3f}", f"{p.time.bubble:.3f}",
            ", ".join(f"{k} {b / 1e9:.2f}" for k, b in comm),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    left = (0, len(head) - 1)  # the marker and the text column; numbers right-aligned
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
    if best is None:
        pipe = ("allow pipeline parallelism (leave out --pipeline-model-parallel-size), "
                if all(p.pp == 1 for p in plans) else "")
        lines.append("no layout fits: turn on --recompute-granularity full, "
                     f"--use-distributed-optimizer, --optimizer-tile-size, {pipe}or use more or "
                     "larger GPUs")
    else:
        lines.append(f"recommended (*): {describe(best)}, {best.memory.total / GIB:.2f} GiB per "
                     f"GPU, {best.time.total:.3f} s per step")
    return "\n".join(lines)


def describe(p: planner.LayoutPlan) -> str:
    pipe = ""
    if p.pp > 1:
        chunks = f", {p.virtual} stages per rank" if p.virtual > 1 else ""
        pipe = (f" ({p.schedule}{chunks}, {p.microbatches} micro-batches, bubble "
                f"{100 * p.bubble:.1f}%)")
    sp = " SP" if p.sp else ""
    sp += f" CP={p.cp}" if p.cp > 1 else ""
    return f"TP={p.tp}{sp} PP={p.pp} EP={p.ep} ETP={p.etp} DP={p.dp} (expert-DP {p.edp}){pipe}"


def plot(plans: list[planner.LayoutPlan], best, cluster: planner.Cluster, path: str):
    """Draw the plans to `path`; returns the matplotlib figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    plans = ranked(plans)
    labels = [f"{p.tp}{'s' if p.sp else ''}x{p.pp}x{p.ep}x{p.dp}"
              + (f" e{p.etp}" if p.etp != p.tp else "") + (f" c{p.cp}" if p.cp > 1 else "")
              + ("*" if p is best else "")
              for p in plans]
    x = range(len(plans))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(plans) + 2), 7), sharex=True)
    bottom_of = [0.0] * len(plans)
    for key in ("params", "grads", "optimizer", "peak", "reserved"):
        values = [(max(p.memory.activations, p.memory.step_peak) if key == "peak"
                   else getattr(p.memory, key)) / GIB
                  for p in plans]
        top.bar(x, values, bottom=bottom_of,
                label="activations / step peak" if key == "peak" else key)
        bottom_of = [a + b for a, b in zip(bottom_of, values)]
    device = cluster.memory_bytes / GIB
    top.axhline(device, color="black", linestyle="--", label="GPU memory")
    # clipped at 1.5 x the GPU memory, so one huge layout does not flatten the others; the taller
    # bars carry their size
    ceiling = 1.5 * device
    top.set_ylim(0, ceiling)
    for i, height in enumerate(bottom_of):
        if height > ceiling:
            top.text(i, ceiling * 0.98, f"{height:.0f}", ha="center", va="top", rotation=90,
                     fontsize="x-small")
    top.set_ylabel("GiB per GPU (clipped at 1.5 x)")
    top.set_title(f"{plans[0].total_params / 1e9:.1f}B parameters on {cluster.gpus} x "
                  f"{cluster.name}: memory per GPU and step time per layout")
    top.legend(fontsize="small")
    compute = [p.time.compute for p in plans]
    comm = [sum(p.time.comm.values()) for p in plans]
    bubble = [p.time.bubble for p in plans]
    bottom.bar(x, compute, label="compute")
    bottom.bar(x, comm, bottom=compute, label="communication")
    below = [a + b for a, b in zip(compute, comm)]
    if any(bubble):
        bottom.bar(x, bubble, bottom=below, label="pipeline bubble")
    for i, p in enumerate(plans):
        if not p.fits:
            bottom.text(i, below[i] + bubble[i], "OOM", ha="center", va="bottom",
                        fontsize="x-small")
    bottom.set_ylabel("seconds per step")
    bottom.set_xticks(list(x), labels, rotation=60, fontsize="small")
    bottom.set_xlabel("TP x PP x EP x DP (s: SP; eN: expert TP N; cN: CP N; * recommended)")
    bottom.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise UsageError(f"--plot {path}: {e.strerror or e}") from None
    return fig


# ---- the paper's claims --------------------------------------------------------------------------
PAPER_SWITCHES = ("--micro-batch-size 4 --global-batch-size 1024 --fp16 "
                  "--use-distributed-optimizer --recompute-granularity full "
                  "--recompute-method uniform --recompute-num-layers 1 --moe-router-topk 1 "
                  "--optimizer-tile-size 178956971").split()


def paper(cluster_name: str = "summit-v100-16gb", gpus: int = 128) -> str:
    """What the model says of the paper's claims, on the paper's setup (nothing here is fitted):
    the speedup of DTD + CAC at the recommended layout over the same layout without them, and the
    largest base (16 experts) that fits with TED against expert + data parallelism (TP = 1)."""
    cluster = planner.cluster_preset(cluster_name, gpus)
    lines = [f"setup: {gpus} x {cluster_name}; switches: {' '.join(PAPER_SWITCHES)}"]

    def plans_for(base: str, extra=(), tp=None):
        args = pretrain_args(planner.preset_flags(base) + PAPER_SWITCHES + list(extra))
        # the paper's layouts: no pipeline, the experts split over TP, no sequence or context
        # parallelism
        given = {"--pipeline-model-parallel-size", "--expert-tensor-parallel-size",
                 "--no-sequence-parallel", "--context-parallel-size"}
        if tp is not None:
            args.tensor_model_parallel_size = tp
            given.add("--tensor-model-parallel-size")
        configs, _ = layout_configs(args, gpus, given)
        return [planner.plan_layout(c, cluster) for c in configs]

    with_opt = plans_for("6.7b")
    best = planner.recommend(with_opt)
    if best is None:
        lines.append("6.7B: no layout fits")
    else:
        lines.append(f"6.7B base, 16 experts ({best.total_params / 1e9:.1f}B parameters): "
                     f"recommended TP={best.tp} EP={best.ep} DP={best.dp}")
        for tp in sorted({p.tp for p in with_opt if p.fits}):
            on = min((p for p in with_opt if p.fits and p.tp == tp), key=lambda p: p.time.total)
            off = next(p for p in plans_for("6.7b", ["--disable-moe-dtd", "--disable-moe-cac"],
                                            tp=tp)
                       if (p.tp, p.ep) == (on.tp, on.ep))
            comm_on, comm_off = sum(on.time.comm.values()), sum(off.time.comm.values())
            lines.append(f"  TP={on.tp} EP={on.ep}: {off.time.total:.3f} s per step without "
                         f"DTD+CAC, {on.time.total:.3f} s with: "
                         f"{100 * (off.time.total / on.time.total - 1):+.1f}% "
                         f"(communication {comm_off:.3f} -> {comm_on:.3f} s, "
                         f"compute {on.time.compute:.3f} s; {'fits' if off.fits else 'OOM'} "
                         "without)" + ("  <- recommended" if on is best else ""))
    ted, ep_dp = None, None
    for base in planner.BASES:
        plans = plans_for(base)
        fits_ted = any(p.fits for p in plans)
        fits_ep = any(p.fits for p in plans if p.tp == 1)
        total = plans[0].total_params if plans else 0
        lines.append(f"  {base:>5} base + 16 experts ({total / 1e9:6.1f}B): "
                     f"TED {'fits' if fits_ted else 'OOM'}, "
                     f"expert+data (TP=1) {'fits' if fits_ep else 'OOM'}")
        ted = base if fits_ted else ted
        ep_dp = base if fits_ep else ep_dp
    if ted and ep_dp:
        ratio = _base_params(ted) / _base_params(ep_dp)
        lines.append(f"largest base with 16 experts: TED {ted}, expert+data+ZeRO-1 {ep_dp}: "
                     f"{ratio:.1f}x the base parameters")
    else:
        lines.append(f"largest base with 16 experts: TED {ted}, expert+data+ZeRO-1 {ep_dp}")
    return "\n".join(lines)


def _base_params(base: str) -> float:
    """Parameters of the dense base (one expert per MoE layer), as the base's name counts them."""
    args = pretrain_args(planner.preset_flags(base, experts=1))
    return planner.total_parameters(build_config(args, 1, vocabulary(args)))


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts, args, given = parse(argv)
        if opts.paper:
            print(paper(opts.cluster, opts.gpus or 128))
            return 0
        cluster = cluster_from(opts)
        plans = plan_all(args, cluster, given)
        best = planner.recommend(plans)
        if opts.plot:
            fig = plot(plans, best, cluster, opts.plot)  # raises first if matplotlib is absent
            import matplotlib.pyplot as plt

            plt.close(fig)
        if opts.json:
            for p in ranked(plans):
                print(json.dumps(p.as_json(p is best)))
        else:
            print(table(plans, best, cluster, args))
    except (UsageError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
