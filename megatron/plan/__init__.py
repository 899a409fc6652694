"""The TED layout planner's model: per-GPU memory, per-step communication and step time of one
(TP, SP, CP, PP, EP, ETP, DP) layout, computed from the same `Config` that pretrain_gpt_moe.py
trains: sequence parallelism (--sequence-parallel), context parallelism (--context-parallel-size:
each rank T / CP tokens, keys and values gathered over CP, each rank's own kept tokens sent to the
experts padding-free, planned with balanced routing) and the experts' own grid
(--expert-tensor-parallel-size, ETP x EP x expert-DP = the ranks of a stage) as the code runs them.

Three parts, each a statement about this code base rather than about transformers in general:

- parameters and optimizer state (params.py): every parameter the model creates, packed into the
  optimizer's flat groups exactly as megatron/training/optimizer.py packs them;
- communication (comm.py): every collective one training step issues, calls and bytes
  per (kind, group), checked by the tests against real CPU/gloo training steps, exactly;
- activations and the optimizer step's temporaries (memory.py): what autograd keeps for backward
  in this code, plus the largest transient of the forward, the backward and the optimizer step.

With pipeline parallelism (pipeline.py) each pipeline rank is planned for its own stages: its
parameters and state, the activations its schedule keeps in flight, its P2P sends and receives;
the layout's memory is the rank that needs the most.

Time (time.py) is compute plus every collective by an alpha-beta model, serialized, plus the
pipeline's bubble. Callers
use the package as one namespace: `from megatron import plan as planner`, then `planner.X`.

pipeline.py       what each pipeline rank holds, in-flight micro-batches, bubble_fraction
params.py         ParamEntry, param_table, FlatSpec, flat_groups, parameter/gradient/state bytes,
                  sequence_parallel
shapes.py         one micro-batch's shapes (T, C), micro-batches, the padded dispatch, the
                  capacity slices over TP and the rows the experts compute
comm.py           Traffic, comm_per_step, per_microbatch: the collectives of one step
memory.py         Memory, memory_per_gpu, stage_memory, step_peak, activation_peak, ...
time.py           flops_per_rank, Cluster and its presets, Link, p2p_link, collective_seconds,
                  step_time
layouts.py        LayoutPlan, plan_layout, recommend, the model presets (BASES, preset_flags)
"""

from megatron.plan.comm import GROUPS, KINDS, Traffic, comm_per_step, per_microbatch
from megatron.plan.layouts import (
    BASES,
    GPT2_VOCAB,
    LayoutPlan,
    plan_layout,
    preset_flags,
    recommend,
)
from megatron.plan.memory import (
    Memory,
    activation_candidates,
    activation_peak,
    cac_stash_bytes,
    memory_per_gpu,
    stage_memory,
    step_peak,
)
from megatron.plan.params import (
    FlatSpec,
    ParamEntry,
    experts_in,
    flat_groups,
    grad_bytes,
    optimizer_state_bytes,
    param_bytes,
    param_table,
    qkv_size,
    query_groups,
    sequence_parallel,
    total_parameters,
)
from megatron.plan.pipeline import (
    bubble_fraction,
    embedding_all_reduce,
    embedding_copy,
    in_flight,
    rank_layers,
    stages_of,
)
from megatron.plan.shapes import (
    expert_rows,
    micro_shapes,
    num_microbatches,
    pads,
    slices,
    with_padded_dispatch,
)
from megatron.plan.time import (
    DEFAULT_ASSUMPTIONS,
    GIB,
    NODE_PRESETS,
    Cluster,
    Link,
    StepTime,
    cluster_preset,
    collective_seconds,
    flops_per_rank,
    group_links,
    p2p_link,
    step_time,
)

__all__ = [
    # pipeline.py
    "stages_of", "rank_layers", "embedding_copy", "embedding_all_reduce", "in_flight",
    "bubble_fraction",
    # params.py
    "ParamEntry", "param_table", "query_groups", "qkv_size", "experts_in", "total_parameters",
    "FlatSpec", "flat_groups", "param_bytes", "grad_bytes", "optimizer_state_bytes",
    "sequence_parallel",
    # shapes.py
    "with_padded_dispatch", "pads", "micro_shapes", "num_microbatches", "slices", "expert_rows",
    # comm.py
    "KINDS", "GROUPS", "Traffic", "comm_per_step", "per_microbatch",
    # memory.py
    "Memory", "memory_per_gpu", "stage_memory", "step_peak", "cac_stash_bytes", "activation_peak",
    "activation_candidates",
    # time.py
    "flops_per_rank", "Cluster", "GIB", "NODE_PRESETS", "DEFAULT_ASSUMPTIONS", "cluster_preset",
    "Link", "group_links", "p2p_link", "collective_seconds", "StepTime", "step_time",
    # layouts.py
    "LayoutPlan", "plan_layout", "recommend", "BASES", "GPT2_VOCAB", "preset_flags",
]
