#!/usr/bin/env python
"""The paper's optimizations, each on and off, side by side in one run, on a GPT-MoE with many
experts: activation recompute with and without communication-aware checkpointing (CAC), ZeRO-1
(--use-distributed-optimizer) and the tiled optimizer step.

Every configuration runs in a fresh gloo world (fresh processes), so the peak resident memory it
reports is its own: the kernel's high-water mark (VmHWM) is reset before the measured step and
read after it, with glibc returning every freed large buffer to the kernel at once
(MALLOC_MMAP_THRESHOLD_), so resident memory follows the live tensors. On a GPU (one process,
EP = 1) torch.cuda.max_memory_allocated is used instead.

    python bench/optimizations.py                     # table
    python bench/optimizations.py --json              # JSON Lines, one object per configuration
    python bench/optimizations.py --optimizer-only --dtype bfloat16 --experts 64
        # the optimizer step alone on random half-precision gradients: the upcast peak the
        # tiled step removes (forward/backward in bf16 are ~70x slower than fp32 on CPUs)
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

CONFIGS = {  # name -> (recompute, cac, zero1, tiled)
    "baseline": (False, False, False, False),
    "recompute": (True, False, False, False),
    "recompute+cac": (True, True, False, False),
    "zero1": (False, False, True, False),
    "tiled": (False, False, False, True),
    "all": (True, True, True, True),
}
# --overlap-grad-reduce / --overlap-param-gather against the same buckets reduced after backward
OVERLAP = {"zero1+buckets": False, "zero1+overlap": True}
CONFIGS.update({name: (False, False, True, False) for name in OVERLAP})


# ---- memory readings -----------------------------------------------------------------------------
def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size
            f.write("5")


def memory(device) -> tuple[int, int]:
    """(current, peak since reset) bytes: CUDA allocator, or this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    kib = lambda key: int(fields[key].split()[0]) * 1024  # noqa: E731
    return kib("VmRSS"), kib("VmHWM")


# ---- one configuration, on every rank ------------------------------------------------------------
def run_config(name: str, opts) -> dict | None:
    from megatron.model import ModelConfig
    from megatron.model.config import RecomputeConfig
    from harness import ted_groups
    from megatron.training.optimizer import Optimizer, OptimizerConfig
    from megatron.training.forward_backward import forward_backward, reduce_losses
    from ted_patches.build import build_model
    from ted_patches.config import MoEConfig, moe_layer_indices

    recompute, cac, zero1, tiled = CONFIGS[name]
    device = torch.device("cuda" if opts.gpu else "cpu")
    groups = ted_groups(opts.tp, opts.ep)
    mcfg = ModelConfig(num_layers=opts.layers, hidden_size=opts.hidden, num_attention_heads=8,
                       ffn_hidden_size=opts.ffn, vocab_size=opts.vocab,
                       max_position_embeddings=opts.seq, hidden_dropout=0.0,
                       attention_dropout=0.0)
    moe = MoEConfig(num_experts=opts.experts,
                    layers=moe_layer_indices(opts.layers, expert_interval=2), topk=2,
                    capacity_factor=1.0)
    recompute_cfg = (RecomputeConfig("full", "uniform", 1, cac=cac) if recompute
                     else RecomputeConfig())
    model = build_model(mcfg, moe, groups, seed=7, device=device, recompute=recompute_cfg)
    model.to(dtype=getattr(torch, opts.dtype))
    overlap = OVERLAP.get(name)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-4, use_distributed_optimizer=zero1,
                                                   tile_size=opts.tile if tiled else 0,
                                                   bucket_size=(opts.bucket if overlap is not None
                                                                else None),
                                                   overlap_grad_reduce=bool(overlap),
                                                   overlap_param_gather=bool(overlap)))
    gen = torch.Generator(device=device).manual_seed(groups.dp.rank)
    data = torch.randint(0, opts.vocab, (opts.micro_batch, opts.seq + 1), generator=gen,
                         device=device)
    batch = [dict(tokens=data[:, :-1], labels=data[:, 1:],
                  position_ids=torch.arange(opts.seq, device=device).expand(opts.micro_batch, -1))]

    def forward_backward_reduce():
        opt.zero_grad()
        if opts.optimizer_only:
            for fg in opt.flat_groups:
                fg.grad_buf.normal_(0.0, 1e-3, generator=gen)
        else:
            forward_backward(model, batch, opt.scaler.scale, opt.before_last_backward)
        opt.reduce_gradients()

    forward_backward_reduce()  # warm-up: the first step's allocations are not the steady state
    opt.step()
    times, peaks, extras = [], [], []
    for _ in range(opts.steps):
        _sync(device)
        reset_peak(device)
        groups.ledger.reset()
        start = time.perf_counter()
        forward_backward_reduce()
        _sync(device)
        peak_fwd_bwd = memory(device)[1]
        before_step = memory(device)[0]
        reset_peak(device)  # the optimizer step's own high-water mark
        opt.step()  # an overlapped parameter gather finishes in the next forward, as in training
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
        peak_step = memory(device)[1]
        peaks.append(max(peak_fwd_bwd, peak_step))
        extras.append(peak_step - before_step)
    opt.wait_params()
    summary = groups.ledger.summary()
    moe_layers = len(moe.layers)
    result = dict(
        config=name, tp=opts.tp, ep=opts.ep, dp=groups.dp.size, experts=opts.experts,
        dtype=opts.dtype,
        a2a_per_moe_layer_per_step=groups.ledger.count("all_to_all", "ep") / moe_layers,
        collectives_per_step={f"{k}/{g}": n for (k, g), (n, _) in sorted(summary.items())},
        comm_bytes_per_rank=sum(b for _, b in summary.values()),
        a2a_bytes_per_rank=groups.ledger.nbytes("all_to_all", "ep"),
        optimizer_state_bytes_per_rank=opt.state_bytes(),
        optimizer_step_peak_extra_bytes=int(statistics.median(extras)),
        peak_bytes=int(statistics.median(peaks)),
        ms_step=round(statistics.median(times), 1),
    )
    # all ranks finish together
    reduce_losses(torch.zeros(2, dtype=torch.float64, device=device), groups)
    return result if dist.get_rank() == 0 else None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict]) -> str:
    base = rows[0]
    head = ("config", "a2a/MoE layer/step", "collectives per step", "comm MB/rank",
            "opt state MB/rank", "opt step peak extra MB", "peak MB (vs baseline)", "ms/step",
            "vs baseline")
    out = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        coll = ", ".join(f"{k} {n}" for k, n in r["collectives_per_step"].items())
        out.append(" | ".join([
            r["config"], f"{r['a2a_per_moe_layer_per_step']:g}", coll,
            f"{r['comm_bytes_per_rank'] / 2**20:.1f}",
            f"{r['optimizer_state_bytes_per_rank'] / 2**20:.1f}",
            f"{r['optimizer_step_peak_extra_bytes'] / 2**20:.1f}",
            f"{r['peak_bytes'] / 2**20:.0f} "
            f"({(r['peak_bytes'] - base['peak_bytes']) / 2**20:+.0f})",
            f"{r['ms_step']:.0f}", f"{r['ms_step'] / base['ms_step']:.2f}",
        ]))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--dp", type=int, default=4,
                   help="DP / EP = expert-DP, the experts' ZeRO-1 group")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tile", type=int, default=1 << 20, help="elements per tile for the tiled step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bucket", type=int, default=1 << 20,
                   help="elements per gradient bucket in the overlap configs")
    p.add_argument("--configs", default=None,
                   help="comma-separated; default: all (without the recompute ones with "
                        "--optimizer-only)")
    p.add_argument("--optimizer-only", action="store_true",
                   help="skip forward/backward: random gradients, then the optimizer step (its "
                        "memory and time)")
    p.add_argument("--gpu", action="store_true",
                   help="one process on the GPU (forces TP = EP = DP = 1)")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    from bench.optimizations import run_config as run_on_rank  # importable by name in the workers
    from harness import World

    if opts.configs is None:
        # --optimizer-only: no forward, so the configurations that differ only in recompute go
        names = [n for n, (recompute, _, zero1, tiled) in CONFIGS.items()
                 if not (opts.optimizer_only
                         and (n in OVERLAP or (recompute and not (zero1 or tiled))))]
        opts.configs = ",".join(names)
    if opts.gpu:
        opts.tp = opts.ep = opts.dp = 1
    # Large buffers straight from mmap and back to the kernel on free: the resident set then follows
    # the live tensors (glibc otherwise keeps freed buffers and the peaks blur). Read by each worker
    # process at start-up.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    world = opts.tp * opts.dp
    rows = []
    for name in opts.configs.split(","):
        if world == 1:
            row = run_on_rank(name, opts)
        else:
            # fresh processes: honest peaks
            w = World(world, threads=max(1, (os.cpu_count() or 1) // world))
            try:
                row = w.run(run_on_rank, name, opts, timeout=1800)[0]
            finally:
                w.close()
        rows.append(row)
        if opts.json:
            print(json.dumps(row), flush=True)
    if not opts.json:
        print(f"GPT-MoE: {opts.layers} layers, MoE every other, {opts.experts} experts top-2, "
              f"H={opts.hidden} FFN={opts.ffn}, {opts.micro_batch}x{opts.seq} tokens/rank, "
              f"{opts.dtype}, TP={opts.tp} EP={opts.ep} DP={opts.dp}, tile {opts.tile:,} "
              f"elements; rank 0, medians of {opts.steps} steps")
        print(table(rows))


if __name__ == "__main__":
    main()
