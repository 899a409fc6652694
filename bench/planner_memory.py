#!/usr/bin/env python
"""The layout planner's memory model against measured memory on CPU: for several configurations,
the predicted activation peak (one micro-batch's forward + backward) and optimizer-step peak
(megatron/plan/memory.py) beside the measured ones, as ratios.

Every configuration runs in a fresh gloo world (bench/optimizations.py's method): the resident
set's high-water mark (VmHWM) is reset before each phase and read after it, with glibc returning
every freed large buffer to the kernel (MALLOC_MMAP_THRESHOLD_), so the growth above the resident
set at the phase's start is the live tensors' peak. Each rank measures its own; the largest over
the ranks is compared with the planner's worst rank. The static part (parameters, gradients,
optimizer state) is exact by construction (tests/test_planner.py) and not repeated here.

    python bench/planner_memory.py          # table
    python bench/planner_memory.py --json   # JSON Lines, one object per configuration
    python bench/planner_memory.py --configs dense-tp2,dense-tp2-sp,dense-tp4,dense-tp4-sp,\
        tp2-ep1,tp2-sp-ep1,tp4-ep1,tp4-sp-ep1,tp2-sp-etp1-ep2   # sequence parallelism, ETP
    python bench/planner_memory.py --configs dense-cp2,cp2-ep1,cp2-ep2,dense-tp2-sp-cp2,\
        tp2-sp-cp2-ep2   # context parallelism

With sequence parallelism (`-sp`) the norms' inputs, dropout masks, residuals and the TP
linears' saved inputs are held at s/TP; `dense-` configurations have no MoE layer
(--num-experts 1), the others the bench's MoE every other layer; `etp1` puts each expert whole
on one rank of the experts' own grid (--expert-tensor-parallel-size 1). With context parallelism
(`cp2`) each rank holds its two chunks of every sequence (s/CP), attention the keys and values
gathered over CP, and the experts each rank's own kept tokens (padding-free; the planner assumes
balanced routing, the measured run routes as it routes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the project, and the tests' gloo harness
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# name -> (world size, flags on top of the model's)
CONFIGS = {
    "tp1-ep2": (2, "--expert-model-parallel-size 2"),
    "tp1-ep2-zero1": (2, "--expert-model-parallel-size 2 --use-distributed-optimizer"),
    "tp1-ep2-tiled": (2, "--expert-model-parallel-size 2 --optimizer-tile-size 262144"),
    "tp1-ep2-dp4-zero1": (4, "--expert-model-parallel-size 2 --use-distributed-optimizer"),
    "tp1-ep4-top1": (4, "--expert-model-parallel-size 4 --moe-router-topk 1"),
    "tp2-ep1-swiglu": (2, "--tensor-model-parallel-size 2 --swiglu"),
    "tp2-ep2-dtd": (4, "--tensor-model-parallel-size 2 --expert-model-parallel-size 2"),
    "tp2-ep2-no-dtd": (4, "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 "
                          "--disable-moe-dtd"),
    "tp2-ep2-recompute": (4, "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 "
                             "--recompute-granularity full --recompute-method uniform "
                             "--disable-moe-cac"),
    "tp2-ep2-recompute-cac": (4, "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 "
                                 "--recompute-granularity full --recompute-method uniform"),
    # sequence parallelism at TP 2 and 4, dense and MoE; the experts' own grid
    "dense-tp2": (2, "--num-experts 1 --tensor-model-parallel-size 2"),
    "dense-tp2-sp": (2, "--num-experts 1 --tensor-model-parallel-size 2 --sequence-parallel"),
    "dense-tp4": (4, "--num-experts 1 --tensor-model-parallel-size 4"),
    "dense-tp4-sp": (4, "--num-experts 1 --tensor-model-parallel-size 4 --sequence-parallel"),
    "tp2-ep1": (2, "--tensor-model-parallel-size 2"),
    "tp2-sp-ep1": (2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    "tp4-ep1": (4, "--tensor-model-parallel-size 4"),
    "tp4-sp-ep1": (4, "--tensor-model-parallel-size 4 --sequence-parallel"),
    "tp2-sp-etp1-ep2": (2, "--tensor-model-parallel-size 2 --sequence-parallel "
                           "--expert-tensor-parallel-size 1 --expert-model-parallel-size 2"),
    # context parallelism: dense and MoE at CP 2, and CP 2 with TP 2 under SP
    "dense-cp2": (2, "--num-experts 1 --context-parallel-size 2"),
    "cp2-ep1": (2, "--context-parallel-size 2"),
    "cp2-ep2": (2, "--context-parallel-size 2 --expert-model-parallel-size 2"),
    "dense-tp2-sp-cp2": (4, "--num-experts 1 --tensor-model-parallel-size 2 --sequence-parallel "
                            "--context-parallel-size 2"),
    "tp2-sp-cp2-ep2": (4, "--tensor-model-parallel-size 2 --sequence-parallel "
                          "--context-parallel-size 2 --expert-model-parallel-size 2"),
}


def model_flags(opts) -> list[str]:
    return (f"--num-layers {opts.layers} --hidden-size {opts.hidden} --num-attention-heads 8 "
            f"--ffn-hidden-size {opts.ffn} --seq-length {opts.seq} "
            f"--micro-batch-size {opts.micro_batch} "
            f"--num-experts {opts.experts} --expert-interval 2 --moe-router-topk {opts.topk} "
            f"--mock-data --vocab-size {opts.vocab - 1} --hidden-dropout 0 --attention-dropout 0 "
            "--lr 1e-4 --train-iters 1").split()


def build(argv: list[str], world: int):
    from megatron import plan as planner
    from megatron.cli.arguments import parse_args
    from megatron.cli.configs import build_config

    args = parse_args(argv)
    # + the NullTokenizer's end-of-document id; the padded dispatch, the one planned (and the one
    # accelerators run in drop mode; CPUs default to the padding-free one)
    return planner.with_padded_dispatch(build_config(args, world, args.vocab_size + 1))


# ---- one configuration, on every rank ------------------------------------------------------------
def measure(argv: list[str]) -> dict:
    from bench.optimizations import memory, reset_peak
    from harness import ted_groups
    from megatron.data.loader import context_part
    from megatron.training.optimizer import Optimizer
    from megatron.training.forward_backward import forward_backward
    from ted_patches.build import build_model

    cfg = build(argv, dist.get_world_size())
    topo = cfg.topology
    groups = ted_groups(topo.tp, topo.ep, topo.pp, topo.etp, topo.sp, topo.cp)
    device = torch.device("cpu")
    model = build_model(cfg.model, cfg.moe, groups, seed=cfg.train.seed, device=device,
                        recompute=cfg.recompute)
    opt = Optimizer(model, groups, cfg.optim)
    t = cfg.train
    gen = torch.Generator().manual_seed(groups.dp.rank)
    data = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_length + 1),
                         generator=gen)
    batch = [context_part(dict(tokens=data[:, :-1], labels=data[:, 1:],
                               position_ids=torch.arange(t.seq_length).expand(
                                   t.micro_batch_size, -1)), groups.cp)]

    def phase(fn) -> int:
        gc.collect()
        before = memory(device)[0]
        reset_peak(device)
        fn()
        return memory(device)[1] - before

    for _ in range(2):  # the first step allocates for good (optimizer state, thread pools)
        opt.zero_grad()
        activations = phase(lambda: forward_backward(model, batch, 1.0))
        # not compared: gloo's reduce-scatter works on copies of the whole buffer (NCCL's, which
        # the planner plans, does not)
        reduction = phase(opt.reduce_gradients)
        step_peak = phase(opt.step)
    dist.barrier()
    return dict(activations=activations, step_peak=step_peak, reduction=reduction)


def predict(argv: list[str], world: int) -> dict:
    from megatron import plan as planner

    cfg = build(argv, world)
    return dict(activations=planner.activation_peak(cfg), step_peak=planner.step_peak(cfg))


def table(rows: list[dict]) -> str:
    head = ("config", "activations MiB pred / meas", "ratio", "step peak MiB pred / meas", "ratio",
            "act + step MiB pred / meas", "ratio")
    out = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    mib = 2**20
    for r in rows:
        cells = [r["config"]]
        for key in ("activations", "step_peak", "sum"):
            p, m = r["predicted"][key], r["measured"][key]
            cells += [f"{p / mib:.1f} / {m / mib:.1f}", f"{p / m:.2f}" if m else "-"]
        out.append(" | ".join(cells))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096,
                   help="the tokenizer's vocabulary (a multiple of 128 x TP: no padding)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated names of: " + ", ".join(CONFIGS))
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    from bench.planner_memory import measure as measure_on_rank  # importable by name in the workers
    from harness import World

    unknown = [n for n in opts.configs.split(",") if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; use {list(CONFIGS)}")
    # freed buffers go back to the kernel at once
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    rows = []
    for name in opts.configs.split(","):
        world, flags = CONFIGS[name]
        argv_cfg = model_flags(opts) + flags.split()
        # fresh processes: honest peaks
        w = World(world, threads=max(1, (os.cpu_count() or 1) // world))
        try:
            per_rank = w.run(measure_on_rank, argv_cfg, timeout=1800)
        finally:
            w.close()
        measured = {k: max(r[k] for r in per_rank)
                    for k in ("activations", "step_peak", "reduction")}
        predicted = predict(argv_cfg, world)
        for d in (predicted, measured):
            d["sum"] = d["activations"] + d["step_peak"]
        row = dict(config=name, world=world, predicted=predicted, measured=measured,
                   ratio={k: predicted[k] / measured[k] if measured[k] else None
                          for k in predicted})
        rows.append(row)
        if opts.json:
            print(json.dumps(row), flush=True)
    if not opts.json:
        print(f"GPT-MoE: {opts.layers} layers, MoE every other, {opts.experts} experts "
              f"top-{opts.topk}, H={opts.hidden} "
              f"FFN={opts.ffn}, {opts.micro_batch}x{opts.seq} tokens per micro-batch, "
              f"vocab {opts.vocab}, fp32; "
              "predicted / measured bytes above the static memory, the largest rank")
        print(table(rows))
        print("ZeRO-1's step peak on CPU adds gloo's own buffer: its all-gather into a tensor "
              "allocates the gathered size (NCCL's, the one planned, works in place)")
        if any("-sp" in r["config"] for r in rows):
            print("-sp rows: gloo's reduce-scatter also works on a copy of its whole input (a "
                  "[b, s, h] beside the output layer's input gradient, the peak); NCCL's, "
                  "planned, does not")


if __name__ == "__main__":
    main()
