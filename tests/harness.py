"""The multi-process test harness: local gloo worlds for tests and benchmarks (bench/ puts tests/
on sys.path to use it). A world of N ranks is started once and runs many cases (one function
call on every rank each).

Workers are forked from a forkserver that has already imported torch and megatron-core, so a
world costs no per-rank import time (megatron-core's import alone takes ~4 s). A case is any
importable function `fn(*args, **kwargs)`; `World.run` calls it on every rank and returns the
per-rank results. Inside a case, `ted_groups(tp, ep)` gives the TED groups of that layout
(built once per world and layout, through the same code path as training).

A failing rank or a case that hangs past its timeout kills the world (the next `world(n)`
starts a fresh one) and raises with the failing rank's traceback: nothing can hang.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import sys
import traceback
from multiprocessing.connection import wait

import torch

from megatron.launch.initialize import free_port

_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.parallel_state",
            "megatron.core.tensor_parallel"]
_WORLDS: dict[tuple[int, int], "World"] = {}
# per layout: (its TEDGroups, the process groups building it created), most recently used last
_GROUPS: dict[tuple, tuple] = {}
# Layouts whose groups a world keeps alive at once: megatron-core makes some twenty process groups
# per layout (more with CP), each gloo group holding threads and sockets, so a world that runs
# many layouts would hold hundreds of threads per rank; the least recently used beyond these are
# destroyed (a case may use up to this many layouts together).
_LIVE_LAYOUTS = 4


def ted_groups(tp: int = 1, ep: int = 1, pp: int = 1, etp=None, sp: bool = False, cp: int = 1):
    """The TEDGroups of layout (tp, ep, pp, expert TP etp, sequence parallelism sp, context
    parallelism cp) on this process's world (cached per layout). In the calling process itself
    this starts a one-rank world: the single-process reference."""
    import dataclasses

    import torch.distributed as dist

    from megatron.launch.initialize import init_ted_groups
    from megatron.parallel.topology import Topology

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    key = (tp, ep, pp, etp or tp, cp)
    if key in _GROUPS:
        _GROUPS[key] = _GROUPS.pop(key)  # most recently used
    else:
        while len(_GROUPS) >= _LIVE_LAYOUTS:
            _, created = _GROUPS.pop(next(iter(_GROUPS)))  # the least recently used
            for pg in created:  # every rank evicts the same layout at the same call
                dist.destroy_process_group(pg)
        before = set(dist.distributed_c10d._world.pg_map)
        groups = init_ted_groups(Topology(dist.get_world_size(), tp, ep, pp, etp, cp=cp))
        _GROUPS[key] = (groups, set(dist.distributed_c10d._world.pg_map) - before)
    groups = _GROUPS[key][0]
    groups.ledger.reset()
    if sp:  # the same groups; the layers communicate differently
        groups = dataclasses.replace(groups, topology=dataclasses.replace(groups.topology, sp=True))
    return groups


def _worker(rank: int, size: int, port: int, path: list[str], threads: int, conn) -> None:
    import torch.distributed as dist

    sys.path[:] = path
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        module, name, args, kwargs = msg
        try:
            fn = importlib.import_module(module)
            for part in name.split("."):
                fn = getattr(fn, part)
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion failures, to the parent
            conn.send(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class World:
    def __init__(self, size: int, threads: int = 1):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        port = free_port()
        self.size, self.threads = size, threads
        self.conns, self.procs = [], []
        for rank in range(size):
            parent, child = ctx.Pipe()
            # not daemonic: data-loader workers are its children
            p = ctx.Process(target=_worker, args=(rank, size, port, list(sys.path), threads, child))
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank; the list of their results, by rank."""
        for c in self.conns:
            c.send((fn.__module__, fn.__qualname__, args, kwargs))
        results: dict[int, tuple] = {}
        pending = dict(enumerate(self.conns))
        while pending:
            ready = wait(list(pending.values()), timeout=timeout)
            if not ready:
                self.kill()
                raise TimeoutError(f"{fn.__qualname__} did not finish in {timeout}s on ranks "
                                   f"{sorted(pending)}")
            for rank, c in list(pending.items()):
                if c in ready:
                    try:
                        results[rank] = c.recv()
                    except EOFError:
                        results[rank] = ("error", f"rank {rank} died")
                    del pending[rank]
                    if results[rank][0] == "error":
                        self.kill()
                        raise RuntimeError(f"{fn.__qualname__} failed:\n{results[rank][1]}")
        return [results[r][1] for r in range(self.size)]

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        # a fresh World(...) is not the cached one
        if _WORLDS.get((self.size, self.threads)) is self:
            del _WORLDS[(self.size, self.threads)]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
        self.kill()


def world(size: int, threads: int = 1) -> World:
    """The running world of `size` ranks (`threads` torch threads each), started on first use."""
    key = (size, threads)
    if key not in _WORLDS:
        _WORLDS[key] = World(size, threads)
    return _WORLDS[key]


@atexit.register
def _close_all() -> None:
    for w in list(_WORLDS.values()):
        w.close()


def run(size: int, fn, *args, **kwargs) -> list:
    """fn on every rank of a world of `size` (size 1 runs in this process, no fork)."""
    if size == 1:
        return [fn(*args, **kwargs)]
    return world(size).run(fn, *args, **kwargs)
