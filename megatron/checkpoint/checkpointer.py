"""Saving and loading a training run at any layout.

What is stored. The optimizer's fp32 master weights ARE the model ("model.<name>": half-precision
parameters are always the cast of their master copy), with Adam's moments ("exp_avg.<name>",
"exp_avg_sq.<name>"); each rank writes the parts it owns (ZeRO-1: its flat shard, cut into
rectangles of the stored tensors), and one copy of every replica, so the files hold each element
once. Non-trainable state that must survive a resume (a buffer with a ParamSpec, e.g. a router's
per-expert bias) is stored the same way ("buffer.<name>"), one copy of each replica. On load every
rank reads the parts its own layout needs: any TP / EP / DP, directly.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megatron.checkpoint.files import (FORMAT, META, find_checkpoint, iteration_dir, make_latest,
                                       read_checkpoint_meta, write_json)
from megatron.checkpoint.rng_state import (rng_file, save_torch, read_rng_file, rng_state,
                                           set_rng_state)
from megatron.checkpoint.storage import (CheckpointError, Parts, SavePlanner, Snapshot, add_range,
                                         dcp_load, dcp_save, first_failure)
from megatron.model.params import ParamSpec, checkpoint_pieces, spec_of, state_buffers
from megatron.parallel.topology import TEDGroups

# stored per parameter, from the optimizer's fp32 buffers
STATES = ("model", "exp_avg", "exp_avg_sq")


def optimizer_parts(model, optimizer, groups: TEDGroups, states=STATES) -> tuple[dict, dict]:
    """({key: Parts} this rank reads on load, {key: Parts} this rank writes on save) over the
    optimizer's fp32 master weights and moments: the same views; the writes keep one copy of
    every replica (the copy the global grad norm counts)."""
    names = {id(p): name for name, p in model.named_parameters()}
    reads, writes = {}, {}
    for fg in optimizer.flat_groups:
        own = fg.counts_in_norm(groups)
        offset = 0
        for p in fg.params:
            n = p.numel()
            a, b = max(offset, fg.lo), min(offset + n, fg.hi)
            if a < b:
                pieces = checkpoint_pieces(names[id(p)], p.shape, spec_of(p), groups)
                buffers = [_state_buffer(fg, s)[a - fg.lo:b - fg.lo] for s in states]
                for target in (reads, writes) if own else (reads,):
                    add_range(target, list(states), pieces, p.shape, a - offset, b - offset,
                              buffers)
            offset += n
    return reads, writes


def buffer_parts(model, groups: TEDGroups) -> tuple[dict, dict]:
    """The same for the model's state buffers (megatron.model.params.set_buffer_spec), stored
    under "model." beside the parameters: views of the buffers themselves."""
    reads, writes = {}, {}
    for name, buf, spec in state_buffers(model):
        for piece in checkpoint_pieces(name, buf.shape, spec, groups):
            for target in (reads, writes) if _writes_replica(spec, groups) else (reads,):
                parts = target.setdefault(f"model.{piece.key}", Parts(piece.global_shape))
                parts.views[piece.offset] = piece.local_view(buf)
    return reads, writes


def _writes_replica(spec: ParamSpec, groups: TEDGroups) -> bool:
    """Whether this rank writes its copy: one rank of each set of replicas (TP rank 0 of what TP
    does not split; data-parallel rank 0, over expert-DP for expert state)."""
    tp_first = spec.tp_dim is not None or groups.tp.rank == 0
    return tp_first and (groups.edp.rank if spec.expert else groups.dp.rank) == 0


def _state_buffer(fg, state: str) -> torch.Tensor:
    return {"model": fg.master, "exp_avg": fg.exp_avg, "exp_avg_sq": fg.exp_avg_sq}[state]


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    async_save: bool = False


@dataclass(frozen=True)
class Resumed:
    iteration: int = 0
    consumed_samples: int = 0


class Checkpointer:
    """Saves and loads a training run. DCP's collectives run on a gloo group of their own, so an
    async save's background thread never interleaves with training's collectives."""

    def __init__(self, cfg: CheckpointConfig, groups: TEDGroups):
        self.cfg, self.groups = cfg, groups
        self.pg = _checkpoint_group() if (cfg.save or cfg.load) else None
        self.pending = None  # an async save still writing: (future, iteration)
        self.latest: Optional[str] = None  # the newest checkpoint saved or loaded by this run

    # -- save --
    def save(self, iteration: int, run: dict, model, optimizer, scheduler) -> None:
        """Every rank. `run`: the JSON-able description of the run (configs, tokenizer, data)."""
        self.finalize()
        rank, root = self.groups.world.rank, self.cfg.save
        tmp = iteration_dir(root, iteration) + ".tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
        dist.barrier(group=self.pg)
        save_torch(rng_state(model), rng_file(tmp, rank))
        if rank == 0:
            meta = {**run, "format": FORMAT, "iteration": iteration, "has_optimizer": True,
                    "has_rng": True, "layout": _layout(self.groups),
                    "optimizer_step": optimizer.step_count,
                    "loss_scaler": optimizer.scaler.state_dict(),
                    "scheduler": scheduler.state_dict()}
            write_json(os.path.join(tmp, META), meta)
        _, writes = optimizer_parts(model, optimizer, self.groups)
        writes.update(buffer_parts(model, self.groups)[1])
        if self.cfg.async_save:
            snapshot = {k: Parts(p.shape, {o: v.clone() for o, v in p.views.items()})
                        for k, p in writes.items()}
            writer = dcp.FileSystemWriter(tmp, overwrite=False)
            future = dcp.async_save(snapshot, storage_writer=writer, planner=SavePlanner(),
                                    process_group=self.pg, async_stager=Snapshot())
            self.pending = (future, iteration)
        else:
            dcp_save(writes, tmp, self.pg)
            self._commit(iteration)

    def finalize(self) -> None:
        """Wait for an async save, then publish it (every rank)."""
        if self.pending is None:
            return
        future, iteration = self.pending
        self.pending = None
        try:
            future.result()
        except dcp.api.CheckpointException as e:
            raise CheckpointError(
                f"saving iteration {iteration} failed: {first_failure(e)}") from None
        self._commit(iteration)

    def _commit(self, iteration: int) -> None:
        dist.barrier(group=self.pg)  # every rank's files are written
        if self.groups.world.rank == 0:
            make_latest(self.cfg.save, iteration)
        dist.barrier(group=self.pg)
        self.latest = iteration_dir(self.cfg.save, iteration)

    # -- load --
    def load(self, model, optimizer, scheduler, log) -> Resumed:
        """Every rank. Restores what the flags ask for; returns where training resumes."""
        cfg, start = self.cfg, time.time()
        found = find_checkpoint(cfg.load)
        if found is None:
            log(f"WARNING: no checkpoint in --load {cfg.load}: training from scratch")
            return Resumed()
        meta = read_checkpoint_meta(found)
        self.latest = found
        with_optimizer = meta["has_optimizer"] and not (cfg.finetune or cfg.no_load_optim)
        reads, _ = optimizer_parts(model, optimizer, self.groups,
                                   STATES if with_optimizer else ("model",))
        reads.update(buffer_parts(model, self.groups)[0])
        dcp_load(reads, found, self.pg)
        optimizer.load_master_weights()
        if with_optimizer:
            optimizer.step_count = meta["optimizer_step"]
            optimizer.scaler.load_state_dict(meta["loss_scaler"])
            try:
                scheduler.load_state_dict(meta["scheduler"])
            except AssertionError as e:
                # megatron-core's own check (check_schedule runs it earlier)
                raise CheckpointError(f"{found}: {e}; pass --override-opt_param-scheduler or "
                                      "--use-checkpoint-opt_param-scheduler") from None
        self._load_rng(found, meta, model, log)
        log(f"> loaded {found} (iteration {meta['iteration']}, saved at "
            f"{meta.get('layout', {}).get('name', 'one process')}) "
            f"in {time.time() - start:.2f} s"
            + ("" if with_optimizer else "; optimizer state not loaded"))
        if cfg.finetune:
            return Resumed()
        return Resumed(meta["iteration"], meta["consumed_samples"])

    def _load_rng(self, folder: str, meta: dict, model, log) -> None:
        if self.cfg.finetune or self.cfg.no_load_rng or not meta.get("has_rng"):
            return
        if meta["layout"]["name"] != _layout(self.groups)["name"]:
            log(f"> RNG states not restored: saved at {meta['layout']['name']}, running at "
                f"{_layout(self.groups)['name']} (each rank's streams belong to its place in the "
                "layout)")
            return
        set_rng_state(model, read_rng_file(folder, self.groups.world.rank))


_GROUPS: dict = {}


def _checkpoint_group():
    """One gloo group over the world for DCP, made once per process group (a collective)."""
    world = dist.group.WORLD
    if world not in _GROUPS:
        _GROUPS.clear()  # a group of an earlier, destroyed world is of no use
        _GROUPS[world] = dist.new_group(backend="gloo")
    return _GROUPS[world]


def _layout(groups: TEDGroups) -> dict:
    t = groups.topology
    return {"world": t.world_size, "tp": t.tp, "ep": t.ep, "dp": t.dp, "pp": t.pp,
            "name": t.describe()}
