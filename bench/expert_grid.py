#!/usr/bin/env python
"""One fine-grained MoE layer on the experts' own grid (--expert-tensor-parallel-size) against
the experts split over TP, with and without sequence parallelism, on one gloo world.

Fine-grained experts (many, with a small FFN, top-k large) split over TP become slivers: at
TP 2 each rank runs every expert's [H, F/2] half. With ETP 1 and EP spanning the TP ranks each
rank holds half of the experts whole and runs them on its share of the tokens (Megatron-Core's
"MoE parallel folding"). Each repetition times every layout in turn (forward + backward of the
layer between two barriers, rotating the order); a row gives the median, min and max, and the
ratio to the first layout is the median (and range) of the per-repetition ratios. Bytes are what
this rank sends in one forward + backward, from the comm ledger.

    python bench/expert_grid.py            # table
    python bench/expert_grid.py --json     # JSON Lines: one object per layout
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the project, and the tests' gloo harness
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.interleave import interleaved, report, spread  # noqa: E402
from harness import ted_groups, world as local_world  # noqa: E402

# name -> (EP, ETP, SP) at TP = the world size
LAYOUTS = {
    "etp=tp": (1, None, False),
    "etp=tp sp": (1, None, True),
    "etp1 ep=tp": (None, 1, False),
    "etp1 ep=tp sp": (None, 1, True),
}


def _layer(opts, tp: int, ep, etp, sp: bool):
    from megatron.model.config import ModelConfig
    from ted_patches.config import MoEConfig
    from util import MoEOnly

    groups = ted_groups(tp, ep or tp, 1, etp, sp)
    model = ModelConfig(num_layers=1, hidden_size=opts.hidden, num_attention_heads=8,
                        ffn_hidden_size=4 * opts.hidden, vocab_size=128,
                        max_position_embeddings=opts.seq, hidden_dropout=0.0,
                        attention_dropout=0.0, swiglu=opts.swiglu, add_bias_linear=False)
    moe = MoEConfig(num_experts=opts.experts, layers=(0,), topk=opts.topk,
                    capacity_factor=opts.capacity_factor, drop_tokens=True,
                    expert_ffn_hidden_size=opts.hidden // 2, pad_free=opts.pad_free)
    return MoEOnly(model, moe, groups, seed=3), groups


def _input(opts, groups, sp: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(opts.micro_batch, opts.seq, opts.hidden, generator=gen)
    if sp:  # this rank's part of the sequence
        tp = groups.tp
        x = x.view(opts.micro_batch, tp.size, -1, opts.hidden)[:, tp.rank].contiguous()
    return x.requires_grad_(True)


def measure(opts) -> list[dict] | None:
    tp = dist.get_world_size()
    cases = {}
    for name, (ep, etp, sp) in LAYOUTS.items():
        layer, groups = _layer(opts, tp, ep, etp, sp)
        cases[name] = (layer, groups, _input(opts, groups, sp))

    def step(name) -> tuple[float, tuple[int, int]]:
        layer, groups, x = cases[name]
        groups.ledger.reset()
        dist.barrier()
        start = time.perf_counter()
        y, _ = layer.moe(x)
        y.square().mean().backward()
        dist.barrier()
        took = time.perf_counter() - start
        ledger = groups.ledger
        return took, (ledger.nbytes("all_to_all"), ledger.nbytes() - ledger.nbytes("all_to_all"))

    names = list(cases)
    times, sent = interleaved(names, step, opts.reps)
    if dist.get_rank() != 0:
        return None
    base = names[0]
    rows = []
    for name in names:
        ep, etp, sp = LAYOUTS[name]
        rows.append({
            "layout": name, "tp": tp, "etp": etp or tp, "ep": ep or tp, "sp": sp,
            "experts": opts.experts, "topk": opts.topk, "expert_ffn": opts.hidden // 2,
            "hidden": opts.hidden, "tokens": opts.micro_batch * opts.seq,
            **spread(times[name], times[base]),
            "a2a_bytes_per_rank": sent[name][0], "other_bytes_per_rank": sent[name][1],
        })
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'layout':<16}{'TP':>3}{'ETP':>4}{'EP':>3}  {'ms (min-max)':<22}"
            f"{'vs ' + rows[0]['layout']:<22}{'a2a MB':>8}{'other MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layout']:<16}{r['tp']:>3}{r['etp']:>4}{r['ep']:>3}  "
                     f"{r['ms']:6.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}){'':<5}"
                     f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}){'':<9}"
                     f"{r['a2a_bytes_per_rank'] / 2**20:8.2f}"
                     f"{r['other_bytes_per_rank'] / 2**20:9.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="TP = the world size (default 2)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256, help="H; the experts' FFN is H / 2")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--padded", dest="pad_free", action="store_false",
                   help="the padded dispatch (default: padding-free)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", action="store_true", help="JSON Lines instead of a table")
    opts = p.parse_args(argv)
    if opts.seq % opts.world:
        p.error(f"--seq {opts.seq} must be a multiple of --world {opts.world} (the SP rows)")
    rows = local_world(opts.world, threads=opts.threads).run(measure, opts, timeout=3600)[0]
    report(rows, opts.json, f"MoE layer: E={opts.experts} top-{opts.topk} H={opts.hidden} expert "
           f"FFN={opts.hidden // 2} T={opts.micro_batch * opts.seq} per rank, forward + backward, "
           f"{opts.reps} interleaved repetitions on a gloo world of {opts.world}", table)


if __name__ == "__main__":
    main()
