"""Pipeline parallelism in the plan: what each pipeline rank holds (megatron/parallel/stages.py's
StagePlan), how many micro-batches' activations its schedule keeps in flight, what crosses a
stage boundary, and the bubble. Without a pipeline (cfg.stages None) there is one rank, 0,
holding every layer and both ends.

In-flight activations at a rank's peak (`in_flight`), in units of one stage's (one chunk's)
activations of one micro-batch:
    1f1b          min(P - r, m)                      rank 0 the most (Megatron's warm-up + 1)
    gpipe         m                                  every forward before any backward
    interleaved   min(2 (P - r - 1) + (V - 1) P + 1, V m)
                  Megatron-LM's get_forward_backward_func (interleaved): its warm-up count
                  (P - r - 1) * 2 + (V - 1) * P virtual micro-batches, plus the steady state's one
    zbv,          min(2P, 2m) chunks on every rank: assumed. ZB-V (Qi et al., "Zero Bubble
    dualpipev     Pipeline Parallelism", ICLR 2024, sec. 6) keeps 1F1B's peak, P micro-batches of
                  a rank's layers = 2P of its two chunks; DualPipe (DeepSeek-V3 report, Table 2)
                  keeps PP + 1 micro-batches, which its V form halves per chunk: about 2P chunks

The bubble (`bubble_fraction`), the share of the step a rank idles:
    1f1b, gpipe   (P - 1) / (m + P - 1)              Narayanan et al. 2021 (Megatron-LM, sec 2.2)
    interleaved   (P - 1) / (V m + P - 1)            the same paper's interleaved schedule
    zbv,          0: assumed. Both are built to reach close to zero bubble when the forward, the
    dualpipev     input-gradient and the weight-gradient passes take similar time (ZB-V, sec. 6;
                  DualPipe's (P/2 - 1)(F&B + B - 3W) in the DeepSeek-V3 report): the residue is
                  ignored, so these two are planned optimistically.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.parallel.stages import SCHEDULE_PLACEMENT, StagePlan
from megatron.plan.cache import per_config
from megatron.training.config import Config


@dataclass(frozen=True)
class Stage:
    """One stage as a rank runs it: its layers, whether it holds the embedding (`first`) or the
    final norm, output layer and loss (`last`), and which neighbours live on another rank (those
    exchange by P2P over the PP group; a V's middle pair exchanges in memory)."""

    index: int
    layers: tuple[int, ...]
    first: bool
    last: bool
    recv_prev: bool  # the input arrives from another rank (and its gradient goes back)
    send_next: bool  # the output goes to another rank (and its gradient comes back)


def pp_size(cfg: Config) -> int:
    return cfg.topology.pp


def pp_ranks(cfg: Config) -> range:
    return range(pp_size(cfg))


def _plan(cfg: Config) -> StagePlan:
    if cfg.stages is not None:
        return cfg.stages
    return StagePlan(cfg.model.num_layers, 1)


def stages_of(cfg: Config, pp_rank: int = 0) -> list[Stage]:
    """The stages pipeline rank `pp_rank` runs, in its chunk order."""
    return list(_stages_of(cfg, pp_rank))


@per_config
def _stages_of(cfg: Config, pp_rank: int) -> tuple[Stage, ...]:
    plan = _plan(cfg)
    S, P = plan.num_stages, plan.pp
    owner = {s: r for r in range(P) for s in plan.stages_of(r)}
    return tuple(Stage(s, tuple(plan.stage_layers(s)), s == 0, s == S - 1,
                       s > 0 and owner[s - 1] != pp_rank, s < S - 1 and owner[s + 1] != pp_rank)
                 for s in plan.stages_of(pp_rank))


def rank_layers(cfg: Config, pp_rank: int = 0) -> list[int]:
    """The global layer indices pipeline rank `pp_rank` holds (all of them without a pipeline)."""
    return sorted(i for st in stages_of(cfg, pp_rank) for i in st.layers)


def holds_first(cfg: Config, pp_rank: int = 0) -> bool:
    return any(st.first for st in stages_of(cfg, pp_rank))


def holds_last(cfg: Config, pp_rank: int = 0) -> bool:
    return any(st.last for st in stages_of(cfg, pp_rank))


def embedding_copy(cfg: Config, pp_rank: int = 0) -> bool:
    """Whether this rank holds the tied word embedding's copy: the last stage, when the first
    lives on another rank (GPTModel's `pipeline_copy`)."""
    tied = not cfg.model.untie_embeddings_and_output_weights
    return tied and holds_last(cfg, pp_rank) and not holds_first(cfg, pp_rank)


def embedding_all_reduce(cfg: Config, pp_rank: int = 0) -> bool:
    """Whether this rank sums the tied embedding's gradient over the embedding group (first and
    last stage on different ranks)."""
    tied = not cfg.model.untie_embeddings_and_output_weights
    return (tied and pp_size(cfg) > 1 and holds_first(cfg, pp_rank) != holds_last(cfg, pp_rank))


def checkpoint_chunks(cfg: Config, pp_rank: int = 0) -> list[list[int]]:
    """Full recompute's chunks as rank `pp_rank` runs them: each global chunk cut to the rank's
    stages (GPTModel._segments checkpoints a chunk cut at a stage boundary on each side)."""
    out = []
    for st in stages_of(cfg, pp_rank):
        for chunk in cfg.recompute.full_chunks(cfg.model.num_layers):
            cut = [i for i in chunk if i in st.layers]
            if cut:
                out.append(cut)
    return out


def in_flight(cfg: Config, pp_rank: int, m: int) -> int:
    """Micro-batches (virtual micro-batches: one chunk's, with several chunks per rank) whose
    activations rank `pp_rank` holds at its peak (the module docstring's table)."""
    plan = _plan(cfg)
    P, V, r = plan.pp, plan.virtual, pp_rank
    if P == 1:
        return 1
    if plan.schedule == "1f1b":
        return min(P - r, m)
    if plan.schedule == "gpipe":
        return m
    if plan.schedule == "interleaved":
        return min(2 * (P - r - 1) + (V - 1) * P + 1, V * m)
    assert SCHEDULE_PLACEMENT[plan.schedule] == "v", plan.schedule
    return min(2 * P, 2 * m)


def bubble_fraction(cfg: Config, m: int) -> float:
    """The share of the step a pipeline rank idles (the module docstring's table)."""
    plan = _plan(cfg)
    P, V = plan.pp, plan.virtual
    if P == 1 or SCHEDULE_PLACEMENT[plan.schedule] == "v":
        return 0.0
    if plan.schedule == "interleaved":
        return (P - 1) / (V * m + P - 1)
    return (P - 1) / (m + P - 1)


def stage_indices(cfg: Config, pp_rank: int = 0) -> list[int]:
    return [st.index for st in stages_of(cfg, pp_rank)]
