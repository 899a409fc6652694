"""The TED rank layout and the explicit process-group object handed to every layer.

Layout (megatron-core's orders "tp-cp-ep-dp-pp" and, for the experts, "tp-ep-dp-pp" with its own
expert TP size ETP: Megatron-Core's "MoE parallel folding"). Within one pipeline stage:
    local = tp + TP * (cp + CP * dp)             dense view: attention, norms, dense MLPs
    local = etp + ETP * (ep + EP * edp)          expert view: the experts' grid
With ETP = TP (the default) cp + CP * dp = ep + EP * edp: the EP group holds ranks with the SAME
TP rank (all-to-all moves whole TP shards) and the expert-DP group the ranks that own the same
experts and the same TP shard. With ETP != TP the EP group may span attention TP ranks (ETP 1 at
TP 2: the two TP ranks hold different experts, each whole). Context parallelism (CP) splits each
sequence over CP ranks that hold the same parameters: for the experts they are data-parallel
ranks like any other (the EP group may span them).

`Topology` is pure arithmetic (testable without processes). `TEDGroups` wraps the process
groups that megatron-core's parallel_state built; layers receive it explicitly and never read
parallel_state globals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

import torch.distributed as dist

from megatron.parallel.fields import FieldError


class LayoutError(FieldError):
    """An invalid (TP, EP, DP) layout or a model that does not fit it. Raised before any collective.
    The sizes a layout must divide are named by their callers ({field} templates or plain text)."""


def valid_layouts(world_size: int, tp_divides: Mapping[str, int] = {},
                  ep_divides: Mapping[str, int] = {}, cp: int = 1):
    """Every (TP, EP) the run could use: TP divides the world / CP and each size split over TP
    (heads, hidden, FFN), EP divides the data-parallel size (x CP) and each size split over EP
    (experts)."""
    return [
        (tp, ep)
        for tp in range(1, world_size + 1)
        if world_size % (tp * cp) == 0 and all(v % tp == 0 for v in tp_divides.values())
        for ep in range(1, world_size // tp + 1)
        if (world_size // tp) % ep == 0 and all(v % ep == 0 for v in ep_divides.values())
    ]


def check_layout(world_size: int, tp: int, ep: int, *, pp: int = 1, etp: Optional[int] = None,
                 cp: int = 1, tp_divides: Mapping[str, int] = {},
                 ep_divides: Mapping[str, int] = {}, etp_divides: Mapping[str, int] = {}) -> None:
    """Raise a LayoutError naming the first flag that breaks the layout. The suggestion offers
    only sizes that are valid for the whole layout: TP sizes that work with this EP, EP sizes
    that work with this TP (the one place every layout suggestion is made). With pipeline
    parallelism each of the `pp` stages holds world / pp ranks, laid out as a world of its own;
    context parallelism (`cp`) splits each sequence over CP of a stage's ranks."""
    if tp < 1 or ep < 1 or pp < 1 or cp < 1 or world_size < 1:
        raise LayoutError(f"--tensor-model-parallel-size ({tp}), --expert-model-parallel-size "
                          f"({ep}), --pipeline-model-parallel-size ({pp}), "
                          f"--context-parallel-size ({cp}) and the world size ({world_size}) "
                          "must be >= 1")

    def fail(problem: str, valid: list[int]):
        hint = f"use one of {valid}" if valid else "no size fits the other flags: change them"
        raise LayoutError(f"{problem}; {hint}")

    if etp is None or etp == tp:  # the experts share the dense TP group
        tp_divides, etp_divides = {**tp_divides, **etp_divides}, {}
    if world_size % pp:
        fail(f"world size {world_size} is not divisible by --pipeline-model-parallel-size {pp}",
             [p for p in range(1, world_size + 1)
              if world_size % p == 0
              and valid_layouts(world_size // p, tp_divides, ep_divides, cp)])
    stage = world_size // pp
    world = f"world size {world_size}" if pp == 1 else f"{stage} ranks per pipeline stage"
    if stage % cp:
        fail(f"{world} is not divisible by --context-parallel-size {cp}",
             [c for c in range(1, stage + 1) if stage % (c * tp) == 0])
    layouts = valid_layouts(stage, tp_divides, ep_divides, cp)
    tp_valid = [t for t, e in layouts if e == ep] or sorted({t for t, _ in layouts})
    ep_valid = [e for t, e in layouts if t == tp]
    if stage % (tp * cp):
        by = f"--tensor-model-parallel-size {tp}" + (
            f" x --context-parallel-size {cp}" if cp > 1 else "")
        fail(f"{world} is not divisible by {by}", tp_valid)
    for flag, value in tp_divides.items():
        if value % tp:
            fail(f"{flag} {value} is not divisible by --tensor-model-parallel-size {tp}", tp_valid)
    dp = stage // tp  # data-parallel x context-parallel ranks: the experts' EP x expert-DP
    if etp is not None and etp != tp:  # the experts' own grid: EP need not divide DP
        _check_expert_grid(world, stage, tp, ep, etp, ep_divides, etp_divides)
        return
    if dp % ep:
        where = f"world {world_size}" if pp == 1 else f"world {world_size} / PP {pp}"
        size = (f"data-parallel size {dp} (= {where} / TP {tp})" if cp == 1 else
                f"data-parallel x context-parallel size {dp} (= {where} / TP {tp})")
        fail(f"{size} is not divisible by --expert-model-parallel-size {ep}", ep_valid)
    for flag, value in ep_divides.items():
        if value % ep:
            fail(f"{flag} {value} is not divisible by --expert-model-parallel-size {ep}", ep_valid)


def _check_expert_grid(world: str, stage: int, tp: int, ep: int, etp: int,
                       ep_divides: Mapping[str, int], etp_divides: Mapping[str, int]) -> None:
    """The experts' own grid (ETP x EP x expert-DP = the ranks of a stage), as Megatron-Core
    allows it: ETP need not divide TP."""
    def fits(e: int) -> bool:
        return (e >= 1 and stage % (e * ep) == 0
                and all(v % e == 0 for v in etp_divides.values()))

    valid = [e for e in range(1, stage + 1) if fits(e)]
    hint = f"use one of {valid}" if valid else "no size fits the other flags: change them"
    for flag, value in ep_divides.items():
        if value % ep:
            ep_valid = [e for e in range(1, stage + 1)
                        if stage % (etp * e) == 0 and all(v % e == 0 for v in ep_divides.values())]
            raise LayoutError(f"{flag} {value} is not divisible by --expert-model-parallel-size "
                              f"{ep}; use one of {ep_valid}")
    if etp < 1 or stage % (etp * ep):
        raise LayoutError(f"{world} is not divisible by --expert-tensor-parallel-size {etp} x "
                          f"--expert-model-parallel-size {ep}; {hint}")
    for flag, value in etp_divides.items():
        if value % etp:
            raise LayoutError(f"{flag} {value} is not divisible by --expert-tensor-parallel-size "
                              f"{etp}; {hint}")


@dataclass(frozen=True)
class Topology:
    world_size: int
    tp: int = 1
    ep: int = 1
    pp: int = 1
    etp: Optional[int] = None  # the experts' TP size (None: = tp)
    sp: bool = False  # sequence parallelism (Megatron's --sequence-parallel; no effect at TP 1)
    cp: int = 1  # context parallelism: each sequence split over CP ranks

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        check_layout(self.world_size, self.tp, self.ep, pp=self.pp, etp=self.etp, cp=self.cp)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def stage_size(self) -> int:
        return self.world_size // self.pp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert shard."""
        return self.stage_size // (self.etp * self.ep)

    @property
    def folded(self) -> bool:
        """The experts' grid differs from the dense one (ETP != TP)."""
        return self.etp != self.tp

    # -- rank <-> coordinates ------------------------------------------------------------
    def coords(self, rank: int) -> "Coords":
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tp, cp = rank % self.tp, rank // self.tp % self.cp
        dp, pp = rank // (self.tp * self.cp) % self.dp, rank // self.stage_size
        local = rank % self.stage_size
        return Coords(tp=tp, dp=dp, ep=local // self.etp % self.ep,
                      edp=local // (self.etp * self.ep), pp=pp, etp=local % self.etp, cp=cp)

    def rank(self, tp: int = 0, dp: Optional[int] = None, ep: int = 0, edp: int = 0,
             pp: int = 0, cp: int = 0) -> int:
        """Rank of the given coordinates; `dp` or the pair (`ep`, `edp`) names the data-parallel
        slot (megatron-core's order: TP fastest, then CP, then DP with EP inside CP x DP, then
        PP). The pair form is the expert grid's with etp = tp (see `expert_rank`)."""
        if dp is None:
            return self.expert_rank(etp=tp, ep=ep, edp=edp, pp=pp)
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def expert_rank(self, etp: int = 0, ep: int = 0, edp: int = 0, pp: int = 0) -> int:
        """Rank of the given coordinates in the experts' grid (ETP fastest, then EP, expert-DP)."""
        return etp + self.etp * (ep + self.ep * (edp + self.edp * pp))

    # -- group tables (lists of rank lists, each ordered by rank in group) ------------------
    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(tp=t, dp=d, pp=p, cp=c) for t in range(self.tp)]
                for p in range(self.pp) for d in range(self.dp) for c in range(self.cp)]

    def dp_groups(self) -> list[list[int]]:
        """Data-parallel replicas holding the same part of the same sequences (same CP rank)."""
        return [[self.rank(tp=t, dp=d, pp=p, cp=c) for d in range(self.dp)]
                for p in range(self.pp) for c in range(self.cp) for t in range(self.tp)]

    def cp_groups(self) -> list[list[int]]:
        """The ranks that split one sequence (megatron-core's context-parallel group)."""
        return [[self.rank(tp=t, dp=d, pp=p, cp=c) for c in range(self.cp)]
                for p in range(self.pp) for d in range(self.dp) for t in range(self.tp)]

    def dp_cp_groups(self) -> list[list[int]]:
        """Every rank holding the same dense parameter shard (DP x CP: where their gradients are
        reduced; megatron-core's data-parallel group with context parallelism)."""
        return [[self.rank(tp=t, dp=d, pp=p, cp=c) for d in range(self.dp) for c in range(self.cp)]
                for p in range(self.pp) for t in range(self.tp)]

    def ep_groups(self) -> list[list[int]]:
        return [[self.expert_rank(t, e, x, p) for e in range(self.ep)]
                for p in range(self.pp) for x in range(self.edp) for t in range(self.etp)]

    def edp_groups(self) -> list[list[int]]:
        return [[self.expert_rank(t, e, x, p) for x in range(self.edp)]
                for p in range(self.pp) for e in range(self.ep) for t in range(self.etp)]

    def etp_groups(self) -> list[list[int]]:
        return [[self.expert_rank(t, e, x, p) for t in range(self.etp)]
                for p in range(self.pp) for x in range(self.edp) for e in range(self.ep)]

    def etp_ep_groups(self) -> list[list[int]]:
        """The experts' TP x EP block (megatron-core's expert tensor-and-model-parallel group)."""
        return [[self.expert_rank(t, e, x, p) for e in range(self.ep) for t in range(self.etp)]
                for p in range(self.pp) for x in range(self.edp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(tp=t, dp=d, pp=p, cp=c) for p in range(self.pp)]
                for d in range(self.dp) for c in range(self.cp) for t in range(self.tp)]

    def embedding_groups(self) -> list[list[int]]:
        """The first and last rank of each pipeline group (Megatron's embedding group: the tied
        word embedding's two copies sum their gradients here)."""
        return [sorted({g[0], g[-1]}) for g in self.pp_groups()]

    def describe(self) -> str:
        pp = f" PP={self.pp}" if self.pp > 1 else ""
        etp = f" expert-TP={self.etp}" if self.folded else ""
        sp = " SP" if self.sp and self.tp > 1 else ""
        cp = f" CP={self.cp}" if self.cp > 1 else ""
        return (f"TP={self.tp}{sp}{cp}{pp} EP={self.ep}{etp} DP={self.dp} expert-DP={self.edp} "
                f"(world {self.world_size})")


@dataclass(frozen=True)
class Coords:
    tp: int
    dp: int
    ep: int
    edp: int
    pp: int = 0
    etp: int = 0
    cp: int = 0


@dataclass(frozen=True)
class Group:
    """One process group with its name, this rank's place in it, and the ledger its collectives
    write to. Our collectives over a group of size 1 are identities that issue nothing."""

    name: str
    pg: dist.ProcessGroup
    ranks: tuple[int, ...]
    rank: int
    ledger: "object" = dataclasses.field(compare=False, repr=False, default=None)

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class TEDGroups:
    """Everything a layer needs to know about parallelism: the topology, this rank's coordinates,
    and the groups. Built once per process by `megatron.launch.initialize`."""

    topology: Topology
    coords: Coords
    tp: Group
    dp: Group
    ep: Group
    edp: Group
    world: Group
    pp: Optional[Group] = None  # the pipeline (None: a layout without one, e.g. a unit test's)
    embedding: Optional[Group] = None  # first and last pipeline stage (tied embedding copies)
    etp: Optional[Group] = None  # the experts' TP group (None: the same as tp)
    etp_ep: Optional[Group] = None  # the experts' TP x EP block (None: ep when ETP = TP = 1)
    cp: Optional[Group] = None  # context parallelism: the ranks splitting a sequence (None: 1)
    dp_cp: Optional[Group] = None  # DP x CP: dense gradients are reduced here (None: = dp)

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        if self.dp_cp is None:
            object.__setattr__(self, "dp_cp", self.dp)
        if self.cp is None:
            me = self.world.rank if self.world is not None else 0
            object.__setattr__(self, "cp", Group("cp", None, (me,), 0, self.tp.ledger))

    @property
    def ledger(self):
        return self.tp.ledger

    def tp_of(self, expert: bool) -> Group:
        """The TP group a parameter is split over: the experts' for expert parameters."""
        return self.etp if expert else self.tp

    @property
    def sequence_parallel(self) -> bool:
        """Activations outside attention and the MLPs are split over TP by sequence position (so
        each TP rank also routes its own tokens in the MoE layers)."""
        return self.topology.sp and self.tp.size > 1


def groups_from_parallel_state(topology: Topology, ledger=None) -> TEDGroups:
    """Wrap the groups megatron-core's `initialize_model_parallel` made, checking them against
    the topology's own tables so the two can never disagree silently."""
    from megatron.core import parallel_state as ps

    from megatron.parallel.comm import CommLedger

    ledger = ledger if ledger is not None else CommLedger()
    rank = dist.get_rank()
    wanted = {
        "tp": (ps.get_tensor_model_parallel_group(), topology.tp_groups()),
        "dp": (ps.get_data_parallel_group(), topology.dp_groups()),
        "cp": (ps.get_context_parallel_group(), topology.cp_groups()),
        "dp_cp": (ps.get_data_parallel_group(with_context_parallel=True),
                  topology.dp_cp_groups()),
        "ep": (ps.get_expert_model_parallel_group(), topology.ep_groups()),
        "edp": (ps.get_expert_data_parallel_group(), topology.edp_groups()),
        "pp": (ps.get_pipeline_model_parallel_group(), topology.pp_groups()),
        "etp": (ps.get_expert_tensor_parallel_group(), topology.etp_groups()),
        "etp_ep": (ps.get_expert_tensor_and_model_parallel_group(), topology.etp_ep_groups()),
    }
    if any(rank in g for g in topology.embedding_groups()):  # first or last pipeline stage
        wanted["embedding"] = (ps.get_embedding_group(), topology.embedding_groups())
    groups = {}
    for name, (pg, table) in wanted.items():
        ranks = tuple(dist.get_process_group_ranks(pg))
        mine = next(g for g in table if rank in g)
        if list(ranks) != mine:
            raise RuntimeError(f"parallel_state {name} group {ranks} != topology's {mine}")
        groups[name] = Group(name, pg, ranks, ranks.index(rank), ledger)
    world = Group("world", dist.group.WORLD, tuple(range(topology.world_size)), rank, ledger)
    return TEDGroups(topology, topology.coords(rank), world=world, **groups)
