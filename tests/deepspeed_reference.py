"""DeepSpeed's MoE layer (`deepspeed.moe.layer.MoE`, the paper's reference code) on CPU/gloo, as the
benchmark baseline and the tests' oracle.

Deterministic settings: use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False
(the last two default to random choices). With EP > 1 DeepSpeed needs `deepspeed.init_distributed`
(which, on an initialized torch.distributed, only wraps the default group) and
`set_deepspeed_parallelism()` to create its 'ep_size_N' groups; its JIT build of a shared-memory
op that the MoE layer never uses (~30 s on first use) is stubbed for that one call. Importing
deepspeed sets two environment variables; they are restored.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch

_ENV = ("DS_ACCELERATOR", "PYTORCH_NVML_BASED_CUDA_CHECK")


def import_deepspeed():
    """(deepspeed, MoE class) with the accelerator resolved to CPU; raises ImportError if absent."""
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip accelerator auto-detection
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.moe.layer import MoE

        get_accelerator()  # resolved and cached now, while DS_ACCELERATOR is set
        return deepspeed, MoE
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_distributed() -> None:
    """deepspeed.init_distributed on an already initialized torch.distributed, without its JIT
    build."""
    deepspeed, _ = import_deepspeed()
    import deepspeed.comm.comm as ds_comm

    if ds_comm.is_initialized():
        return
    # `import deepspeed.comm.torch as m` would bind the torch package (deepspeed.comm re-exports the
    # name `torch`): take the module object itself.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend="gloo")
    finally:
        ds_torch.build_shm_op = build


def build_moe(*, hidden: int, ffn: int, experts: int, ep: int, topk: int, capacity_factor: float,
              drop_tokens: bool, min_capacity: int = 4):
    """DeepSpeed's MoE with GELU experts Linear(H, F) -> GELU -> Linear(F, H), deterministic."""
    _, MoE = import_deepspeed()
    expert = torch.nn.Sequential(torch.nn.Linear(hidden, ffn), torch.nn.GELU(),
                                 torch.nn.Linear(ffn, hidden))
    moe = MoE(hidden_size=hidden, expert=expert, num_experts=experts, ep_size=ep, k=topk,
              capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
              min_capacity=min_capacity, use_residual=False, noisy_gate_policy=None,
              drop_tokens=drop_tokens, use_rts=False, use_tutel=False,
              enable_expert_tensor_parallelism=False, top2_2nd_expert_sampling=False)
    if ep > 1:
        init_distributed()
        with contextlib.redirect_stdout(sys.stderr):  # it prints a notice: keep stdout for results
            # creates (once per process) and sets the 'ep_size_{ep}' group
            moe.set_deepspeed_parallelism()
    return moe


def ep_rank(moe) -> int:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(moe.expert_group_name) if moe.ep_size > 1 else 0


@torch.no_grad()
def load_weights(moe, weights: dict) -> None:
    """Global weights keyed as nn.Linear stores them: wg [E, H], w1 [E, F, H], b1 [E, F],
    w2 [E, H, F], b2 [E, H]; this rank's experts are global ids ep_rank * E_l + i."""
    layer = moe.deepspeed_moe
    layer.gate.wg.weight.copy_(weights["wg"])
    local = layer.experts.deepspeed_experts
    first = ep_rank(moe) * len(local)
    for i, ex in enumerate(local):
        ex[0].weight.copy_(weights["w1"][first + i])
        ex[0].bias.copy_(weights["b1"][first + i])
        ex[2].weight.copy_(weights["w2"][first + i])
        ex[2].bias.copy_(weights["b2"][first + i])
