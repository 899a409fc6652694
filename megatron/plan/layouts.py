"""The layout search: one (TP, SP, CP, PP, EP, ETP, DP) layout's plan (memory, communication, step
time, whether it fits), the recommendation among layouts, and the GPT-3-style model presets. With a
pipeline the memory is the pipeline rank that needs the most (`memory.pp_rank`), the
communication and time the rank that finishes its step last (`time.pp_rank`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron.plan.comm import Traffic, comm_per_step
from megatron.plan.memory import Memory, memory_per_gpu
from megatron.plan.params import sequence_parallel, total_parameters
from megatron.plan import pipeline
from megatron.plan.shapes import num_microbatches, pads
from megatron.plan.time import Cluster, StepTime, step_time
from megatron.training.config import Config


# ---- one layout ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutPlan:
    tp: int
    ep: int
    dp: int
    edp: int
    memory: Memory
    comm: dict[tuple[str, str], Traffic]
    time: StepTime
    fits: bool
    total_params: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    pp: int = 1
    schedule: str = ""  # the pipeline schedule ("" without a pipeline)
    virtual: int = 1  # stages (model chunks) per pipeline rank
    microbatches: int = 1  # per step and data-parallel rank
    bubble: float = 0.0  # the schedule's idle share of the step (megatron/plan/pipeline.py)
    etp: int = 0  # the experts' TP size (0: = tp)
    sp: bool = False  # sequence parallelism (at TP > 1)
    cp: int = 1  # context parallelism: the ranks splitting each sequence

    def __post_init__(self):
        if not self.etp:
            object.__setattr__(self, "etp", self.tp)

    def as_json(self, recommended: bool) -> dict:
        return dict(
            tp=self.tp, sp=self.sp, cp=self.cp, pp=self.pp, ep=self.ep, etp=self.etp, dp=self.dp,
            edp=self.edp, fits=self.fits,
            schedule=self.schedule, virtual_stages=self.virtual, microbatches=self.microbatches,
            bubble_fraction=self.bubble, memory_pp_rank=self.memory.pp_rank,
            time_pp_rank=self.time.pp_rank, bubble_seconds=self.time.bubble,
            memory_bytes=self.memory.as_dict(),
            comm_bytes={f"{k}/{g}": t.bytes for (k, g), t in self.comm.items()},
            comm_calls={f"{k}/{g}": t.calls for (k, g), t in self.comm.items()},
            step_seconds=self.time.total, compute_seconds=self.time.compute,
            comm_seconds={k: v for k, v in self.time.comm.items()},
            total_params=self.total_params, recommended=recommended,
        )


def plan_layout(cfg: Config, cluster: Cluster) -> LayoutPlan:
    topo = cfg.topology
    time = step_time(cfg, cluster)
    comm = comm_per_step(cfg, time.pp_rank)
    memory = memory_per_gpu(cfg, cluster.reserved_bytes)
    notes = []
    if cfg.moe is not None and not cfg.moe.drop_tokens:
        notes.append("no-drop mode: capacity assumed from --moe-expert-capacity-factor "
                     f"{cfg.moe.capacity_factor}")
    if cfg.moe is not None and getattr(cfg.moe, "check_tp_routing", 0):
        notes.append("--check-tp-routing: its every-N-th TP all-reduce of a routing checksum is "
                     "not planned")
    if getattr(topo, "cp", 1) > 1 and cfg.moe is not None:
        notes.append("context parallelism: each rank's own kept tokens go to the experts "
                     "padding-free, planned with balanced routing (min(C, T k / E) / CP rows per "
                     "expert and rank)")
    elif not pads(cfg):
        notes.append("padding-free dispatch: planned as the padded one (the kept tokens' sizes "
                     "depend on the routing; the padded sizes bound them)")
    if cfg.stages is not None and cfg.stages.schedule in ("zbv", "dualpipev"):
        notes.append(f"--pipeline-schedule {cfg.stages.schedule}: planned with no bubble and "
                     "1F1B's peak activations (optimistic: megatron/plan/pipeline.py)")
    notes = tuple(notes)
    m = num_microbatches(cfg)
    stages = cfg.stages
    return LayoutPlan(topo.tp, topo.ep, topo.dp, topo.edp, memory, comm, time,
                      memory.total <= cluster.memory_bytes, total_parameters(cfg), notes,
                      pp=topo.pp, schedule=stages.schedule if stages else "",
                      virtual=stages.virtual if stages else 1, microbatches=m,
                      bubble=pipeline.bubble_fraction(cfg, m), etp=topo.etp,
                      sp=sequence_parallel(cfg), cp=getattr(topo, "cp", 1))


def recommend(plans: list[LayoutPlan]) -> Optional[LayoutPlan]:
    """The fastest layout that fits (ties: less TP, then less PP, then less EP, less ETP, no SP,
    less CP)."""
    fitting = [p for p in plans if p.fits]
    return (min(fitting, key=lambda p: (p.time.total, p.tp, p.pp, p.ep, p.etp, p.sp, p.cp))
            if fitting else None)


# ---- model presets -------------------------------------------------------------------------------
# GPT-3-style bases as Megatron-DeepSpeed's MoE example scripts (examples_deepspeed/MoE) define
# them: (layers, hidden, heads), sequence 2048, GPT-2's vocabulary (50257 ids: --vocab-size 50256
# plus the end-of-document id, as the NullTokenizer counts). The paper's bases are 1.3B, 2.7B and
# 6.7B; each preset puts 16 experts in every other layer (--expert-interval 2).
BASES = {
    "125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16), "1.3b": (24, 2048, 16),
    "2.7b": (32, 2560, 32), "6.7b": (32, 4096, 32), "13b": (40, 5120, 40), "175b": (96, 12288, 96),
}
GPT2_VOCAB = 50257


def preset_flags(name: str, experts: int = 16) -> list[str]:
    """pretrain_gpt_moe.py flags of a preset base with `experts` experts every other layer."""
    layers, hidden, heads = BASES[name]
    return (f"--num-layers {layers} --hidden-size {hidden} --num-attention-heads {heads} "
            f"--seq-length 2048 --max-position-embeddings 2048 --num-experts {experts} "
            f"--expert-interval 2 --vocab-size {GPT2_VOCAB - 1}").split()
