#!/usr/bin/env python
"""Context parallelism against data parallelism on one gloo world: a GPT-MoE's forward + backward
on long sequences, per token.

Both layouts use the same ranks (EP over them). Data-parallel: each rank runs its own sequences
of length s. Context-parallel (--context-parallel-size = the world): the ranks split each sequence,
each holding 2 of its 2 x CP chunks (s / CP tokens), and exchange keys and values over CP in every
attention layer; the router decides over the whole sequence. Each repetition times every layout
in turn (forward + backward of one micro-batch between two barriers, rotating the order); a row
gives the median and range of the step time, the time per thousand tokens this rank processes,
and the ratio of that to the data-parallel row (median and range of the per-repetition ratios).
Bytes are what this rank sends in one forward + backward, per kind of collective (comm ledger).

    python bench/context_parallel.py            # table
    python bench/context_parallel.py --json     # JSON Lines: one object per layout
"""

from __future__ import annotations

import argparse
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

from bench.interleave import interleaved, report, spread  # noqa: E402
from harness import ted_groups, world as local_world  # noqa: E402


def _model(opts, cp: int):
    from megatron.model.config import ModelConfig
    from ted_patches.build import build_model
    from ted_patches.config import MoEConfig

    world = dist.get_world_size()
    groups = ted_groups(1, world, 1, None, False, cp)
    cfg = ModelConfig(num_layers=opts.layers, hidden_size=opts.hidden,
                      num_attention_heads=opts.heads, ffn_hidden_size=4 * opts.hidden,
                      vocab_size=opts.vocab, max_position_embeddings=opts.seq,
                      position_embedding_type="rope", hidden_dropout=0.0, attention_dropout=0.0,
                      swiglu=True, normalization="RMSNorm", add_bias_linear=False)
    moe = MoEConfig(num_experts=opts.experts, layers=tuple(range(1, opts.layers, 2)),
                    topk=opts.topk, drop_tokens=False, pad_free=True)
    return build_model(cfg, moe, groups, seed=3), groups


def _batch(opts, groups) -> dict:
    """This rank's micro-batch: its own sequences (DP) or its chunks of shared ones (CP)."""
    from megatron.data.loader import context_part

    seed = 11 if groups.cp.size > 1 else 11 + groups.dp.rank
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, opts.vocab, (opts.micro_batch, opts.seq + 1), generator=gen)
    batch = {"tokens": data[:, :-1], "labels": data[:, 1:],
             "position_ids": torch.arange(opts.seq).expand(opts.micro_batch, -1),
             "loss_mask": torch.ones(opts.micro_batch, opts.seq)}
    return context_part(batch, groups.cp)


def measure(opts) -> list[dict] | None:
    world = dist.get_world_size()
    layouts = {"dp": 1, "cp": world}
    cases = {}
    for name, cp in layouts.items():
        model, groups = _model(opts, cp)
        cases[name] = (model, groups, _batch(opts, groups))

    def step(name) -> tuple[float, dict]:
        model, groups, batch = cases[name]
        model.zero_grad(set_to_none=True)
        groups.ledger.reset()
        dist.barrier()
        start = time.perf_counter()
        model(**batch).loss.backward()
        dist.barrier()
        took = time.perf_counter() - start
        sent = {f"{kind} {group}": n for (kind, group), (_, n) in groups.ledger.summary().items()}
        return took, sent

    names = list(cases)
    times, sent = interleaved(names, step, opts.reps)
    if dist.get_rank() != 0:
        return None
    tokens = {n: opts.micro_batch * opts.seq // layouts[n] for n in names}
    per_k = {n: [t / tokens[n] * 1e3 for t in times[n]] for n in names}
    return [{"layout": name, "world": world, "cp": layouts[name], "ep": world,
             "dp": world // layouts[name], "seq": opts.seq, "micro_batch": opts.micro_batch,
             "hidden": opts.hidden, "layers": opts.layers, "experts": opts.experts,
             "topk": opts.topk, "tokens_per_rank": tokens[name], **spread(times[name]),
             "ms_per_1k_tokens": statistics.median(per_k[name]),
             **{k: v for k, v in spread(per_k[name], per_k["dp"]).items() if "ratio" in k},
             "bytes_per_rank": sent[name]} for name in names]


def table(rows: list[dict]) -> str:
    head = (f"{'layout':<8}{'CP':>3}{'DP':>3}{'tokens':>8}  {'ms (min-max)':<24}"
            f"{'ms / 1k tok':>12}  {'vs dp (range)':<18}sent per rank (MB)")
    lines = [head, "-" * len(head)]
    for r in rows:
        sent = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(r["bytes_per_rank"].items()))
        lines.append(f"{r['layout']:<8}{r['cp']:>3}{r['dp']:>3}{r['tokens_per_rank']:>8}  "
                     f"{r['ms']:7.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}){'':<6}"
                     f"{r['ms_per_1k_tokens']:>12.1f}  "
                     f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}){'':<4}{sent}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="CP (and EP) = the world size")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2, help="MoE in every other layer")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", action="store_true", help="JSON Lines instead of a table")
    opts = p.parse_args(argv)
    if opts.seq % (2 * opts.world):
        p.error(f"--seq {opts.seq} must be a multiple of 2 x --world {opts.world}")
    rows = local_world(opts.world, threads=opts.threads).run(measure, opts, timeout=3600)[0]
    report(rows, opts.json, f"GPT-MoE forward + backward: {opts.layers} layers, H={opts.hidden}, "
           f"E={opts.experts} top-{opts.topk}, seq {opts.seq}, micro-batch {opts.micro_batch}, "
           f"{opts.reps} interleaved repetitions on a gloo world of {opts.world}", table)


if __name__ == "__main__":
    main()
