"""Process-group start-up: torchrun or Slurm environment -> torch.distributed -> TED groups.

The layout is validated (by building a `Topology`) before anything here runs, so a bad layout
fails before the first collective; `launch_env` and `check_rendezvous_env` check the launcher's
variables at the same time. The join and the watchdog live in faults.py.
"""

from __future__ import annotations

import ctypes
import os
import random
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron.parallel.topology import TEDGroups, Topology, groups_from_parallel_state
from megatron.launch import faults
from megatron.launch.faults import EXIT_BAD_LAUNCH, LaunchError, Watchdog

# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*(APEX|Apex|apex).*not (found|installed).*")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    """Rank and world from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/...);
    one process without either. Raises LaunchError (status 2) on values that cannot work."""
    env = os.environ
    if "RANK" in env or "WORLD_SIZE" in env:
        if "RANK" not in env or "WORLD_SIZE" not in env:
            given, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
            raise LaunchError(f"{given} is set but {missing} is not: set both (torchrun does), or "
                              "neither for one process", EXIT_BAD_LAUNCH)
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return LaunchEnv(0, 1, 0)
    rank, world, local = (_env_int(name, 0) for name in names)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LaunchError(f"{names[0]}={rank} with {names[1]}={world} and {names[2]}={local}: the "
                          f"rank must be in 0..{max(world - 1, 0)}, the world >= 1 and the local "
                          "rank >= 0", EXIT_BAD_LAUNCH, rank_specific=True)
    return LaunchEnv(rank, world, local)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not an integer", EXIT_BAD_LAUNCH,
                          rank_specific=True) from None


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def check_rendezvous_env(env: LaunchEnv) -> None:
    """Before anything starts: a multi-process run needs MASTER_ADDR and a usable MASTER_PORT."""
    if env.world_size == 1 or under_torchrun():
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise LaunchError(f"MASTER_ADDR and MASTER_PORT must be set for {env.world_size} ranks "
                          "(torchrun sets them; under srun export them in the batch script, as "
                          "examples/pretrain_gpt_moe.sbatch does)", EXIT_BAD_LAUNCH)
    port = _env_int("MASTER_PORT", 0)
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1..65535)", EXIT_BAD_LAUNCH)


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


_watchdog: Watchdog | None = None


def initialize_distributed(
    topology: Topology, backend: str | None = None, timeout_minutes: float = 10
) -> tuple[TEDGroups, torch.device]:
    """Start torch.distributed (unless already started) and build the TED groups through
    megatron-core's parallel_state. Returns the groups and this rank's device.

    With several ranks, every rank first joins rank 0 (faults.py: rank 0 says which ranks it
    still waits for; LaunchError at the timeout) and a watchdog then stops every rank within
    seconds of one dying. Raises LaunchError on a launch fault."""
    env = launch_env()
    if env.world_size != topology.world_size:
        raise ValueError(f"launcher world size {env.world_size} != layout world size "
                         f"{topology.world_size}")
    backend = backend or default_backend()
    device = device_for(backend, env.local_rank)
    if device.type == "cpu":
        # megatron-core's TP linears ask for CUDA_DEVICE_MAX_CONNECTIONS=1 (the order of CUDA
        # streams), once per rank: nothing to order on a CPU. GPU runs keep the warning.
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    if not dist.is_initialized():
        _init_world(env, backend, timedelta(minutes=timeout_minutes))
    return init_ted_groups(topology, backend, timeout_minutes), device


def _init_world(env: LaunchEnv, backend: str, timeout: timedelta) -> None:
    global _watchdog
    if env.world_size == 1:  # a plain `python pretrain_gpt_moe.py` run
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend, rank=0, world_size=1, timeout=timeout)
        return
    check_rendezvous_env(env)
    if under_torchrun():  # the agent started every worker and holds the store: join afterwards
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
        _watchdog = Watchdog(_join_after_init(env, timeout.total_seconds())).start()
        return
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = []

    def start_store() -> int:
        store.append(dist.TCPStore(addr, 0, env.world_size, True, timeout=timeout,
                                   wait_for_workers=False))
        return store[0].port

    if env.rank == 0:
        joined = faults.gather_ranks(faults.listen(port), env.world_size, timeout.total_seconds(),
                                     start_store)
    else:
        joined = faults.join_rank0(addr, port, env.rank, env.world_size, timeout.total_seconds())
        store.append(dist.TCPStore(addr, joined.store_port, env.world_size, False, timeout=timeout))
    # before init_process_group: a death during it is caught too
    _watchdog = Watchdog(joined).start()
    dist.init_process_group(backend, store=store[0], rank=env.rank, world_size=env.world_size,
                            timeout=timeout)


def _join_after_init(env: LaunchEnv, timeout_s: float) -> faults.Joined:
    """Under torchrun: rank 0's watchdog address goes out by one broadcast, then the join."""
    listener = faults.listen(0) if env.rank == 0 else None
    where = [f"{_reachable_address()}:{listener.getsockname()[1]}" if listener else None]
    dist.broadcast_object_list(where, src=0)
    if env.rank == 0:
        return faults.gather_ranks(listener, env.world_size, timeout_s)
    host, port = where[0].rsplit(":", 1)
    return faults.join_rank0(host, int(port), env.rank, env.world_size, timeout_s)


def _reachable_address() -> str:
    """An address of this host the other ranks can reach: the one it uses towards MASTER_ADDR."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def init_ted_groups(topology: Topology, backend: str = "gloo",
                    timeout_minutes: int = 10) -> TEDGroups:
    """(Re)build megatron-core's parallel_state groups for `topology` on the running world and wrap
    them. Earlier groups stay valid: parallel_state only drops its references to them."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        context_parallel_size=topology.cp,
        expert_model_parallel_size=topology.ep,
        expert_tensor_parallel_size=topology.etp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=backend != "gloo",  # gloo already is the main backend
    )
    return groups_from_parallel_state(topology)


def finish_distributed(status: int = 0) -> None:
    """This rank ends on purpose (status 0: done; otherwise a stop every rank takes together):
    tell the watchdog first, so the peers do not take this exit for a death, then tear down."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.finish(status)
        _watchdog = None
    destroy_distributed()


def await_fault_verdict() -> None:
    """A collective raised: wait briefly for the watchdog to name a dead peer (it then ends this
    process); returns when it names none."""
    if _watchdog is not None:
        _watchdog.await_verdict()


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# glibc's malloc gives every freed block above its mmap threshold (dynamic, from 128 KiB) back to
# the kernel, and trims the heap top above 128 KiB; PyTorch's CPU allocator keeps no cache, so every
# step's multi-MiB activations and buffers are page-faulted in afresh. Measured here (bench/
# moe_layer.py, (1,1,1), 2 threads): that doubled the MoE layer's router + dispatch + combine and
# cost the whole layer 5-8%, DeepSpeed's alike. Keeping freed memory mapped removes it: blocks up to
# 32 MiB (glibc's largest threshold) come from the heap, trimmed only above 1 GiB free.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_KEEP_MAPPED = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30}


def keep_freed_memory_mapped() -> bool:
    """On a CPU process with glibc's malloc: stop it returning freed memory to the kernel (see
    above). Left alone where the user already chose (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
    set, or another allocator preloaded, e.g. jemalloc or tcmalloc). True when applied."""
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"):
        return False
    if any(os.environ.get(v) for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return all(mallopt(param, value) == 1 for param, value in _KEEP_MAPPED.items())


def set_seed(seed: int) -> None:
    """The same seed on every rank (Megatron's default): replicated activations draw identical
    dropout masks on the TP ranks; TP-split ones use megatron.model.rng.TPRandom."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
