"""Process-group start-up: torchrun or Slurm environment -> torch.distributed -> TED groups.

The layout is validated (by building a `Topology`) before anything here runs, so a bad layout
fails on every rank before the first collective.
"""

from __future__ import annotations

import os
import random
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron.parallel.topology import TEDGroups, Topology, groups_from_parallel_state

# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*(APEX|Apex|apex).*not (found|installed).*")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    """Rank and world from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return LaunchEnv(0, 1, 0)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":  # modulo: a launcher may show each task only its own GPU
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(
    topology: Topology, backend: str | None = None, timeout_minutes: int = 10
) -> tuple[TEDGroups, torch.device]:
    """Start torch.distributed (unless already started) and build the TED groups through
    megatron-core's parallel_state. Returns the groups and this rank's device."""

    env = launch_env()
    if env.world_size != topology.world_size:
        raise ValueError(f"launcher world size {env.world_size} != layout world size {topology.world_size}")
    backend = backend or default_backend()
    device = device_for(backend, env.local_rank)
    if not dist.is_initialized():
        if env.world_size == 1:  # a plain `python pretrain_gpt_moe.py` run
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("MASTER_ADDR and MASTER_PORT must be set (torchrun sets them; under Slurm "
                               "export them in the batch script)")
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    return init_ted_groups(topology, backend, timeout_minutes), device


def init_ted_groups(topology: Topology, backend: str = "gloo", timeout_minutes: int = 10) -> TEDGroups:
    """(Re)build megatron-core's parallel_state groups for `topology` on the running world and wrap
    them. Earlier groups stay valid: parallel_state only drops its references to them."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=topology.tp,
        expert_model_parallel_size=topology.ep,
        expert_tensor_parallel_size=topology.tp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=backend != "gloo",  # gloo already is the main backend
    )
    return groups_from_parallel_state(topology)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """The same seed on every rank (Megatron's default): replicated activations draw identical
    dropout masks on the TP ranks; TP-split ones use megatron.model.rng.TPRandom."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
