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
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.checkpoint.files import (FORMAT, META, find_checkpoint, iteration_dir, make_latest,
                                       read_checkpoint_meta, write_json)
from megatron.checkpoint.guards import (check_space, folder_bytes, hold_save_lock,
                                        no_space_message, release_save_lock, remove_leftovers,
                                        retain)
from megatron.checkpoint.rng_state import (rng_file, save_torch, read_rng_file, rng_state,
                                           set_rng_state)
from megatron.checkpoint.storage import (CheckpointError, CheckpointSaveError, ChecksumWriter,
                                         Parts, SafeReader, SavePlanner, Snapshot, add_range,
                                         dcp_load, dcp_save, first_failure, is_out_of_space,
                                         verify_chunks)
from megatron.checkpoint.strictness import resolve
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
    does not split; data- and context-parallel rank 0, over expert-DP for expert state)."""
    tp_first = spec.tp_dim is not None or groups.tp_of(spec.expert).rank == 0
    return tp_first and (groups.edp.rank if spec.expert else groups.dp_cp.rank) == 0


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
    verify: bool = True  # compare every stored chunk with its checksum before a load
    save_retain_interval: Optional[int] = None
    strictness: str = "assume_ok_unexpected"  # --dist-ckpt-strictness (strictness.py)


@dataclass(frozen=True)
class Resumed:
    iteration: int = 0
    consumed_samples: int = 0


class Checkpointer:
    """Saves and loads a training run. DCP's collectives run on a gloo group of their own, so an
    async save's background thread never interleaves with training's collectives.

    An async save commits itself: DCP's coordinator (rank 0) finishes a save only after every
    rank's write results reached it, so when rank 0's future resolves every rank's files are
    written; a thread of rank 0's then renames iter_N.tmp and replaces the tracker, with no
    collective of its own. Rank 0 holds the --save folder's lock for the run (guards.py)."""

    def __init__(self, cfg: CheckpointConfig, groups: TEDGroups):
        self.cfg, self.groups = cfg, groups
        self.rank0 = groups.world.rank == 0
        if cfg.save and self.rank0:
            hold_save_lock(cfg.save)  # before the group's collective: a busy folder stops here
        self.pg = _checkpoint_group() if (cfg.save or cfg.load) else None
        self.pending: Optional[threading.Thread] = None  # an async save's watcher
        self.failure: Optional[str] = None  # why the last async save failed
        self.latest: Optional[str] = None  # the newest checkpoint saved or loaded by this run
        self.last_bytes: Optional[int] = None  # rank 0: the size of the newest checkpoint
        self.state_bytes: Optional[int] = None  # the stored state's bytes over all ranks

    # -- save --
    def save(self, iteration: int, run: dict, model, optimizer, scheduler) -> None:
        """Every rank. `run`: the JSON-able description of the run (configs, tokenizer, data)."""
        self.finalize()
        rank, root = self.groups.world.rank, self.cfg.save
        tmp = iteration_dir(root, iteration) + ".tmp"
        _, writes = optimizer_parts(model, optimizer, self.groups)
        writes.update(buffer_parts(model, self.groups)[1])
        needed = self._expected_bytes(writes)
        verdict = [None]
        if rank == 0:
            remove_leftovers(root)  # killed saves' folders: a no-space verdict counts their room
            verdict[0] = check_space(root, iteration, needed)
            if verdict[0] is None:
                os.makedirs(os.path.join(tmp, "rng"))
        dist.broadcast_object_list(verdict, src=0, group=self.pg)  # rank 0's verdict; a barrier
        if verdict[0] is not None:
            raise CheckpointSaveError(verdict[0])
        started = time.time()
        try:
            self._write_side_files(tmp, iteration, run, model, optimizer, scheduler)
        except OSError as e:
            raise CheckpointSaveError(self._failure_message(e, iteration, tmp, needed)) from None
        if self.cfg.async_save:
            snapshot = {k: Parts(p.shape, {o: v.clone() for o, v in p.views.items()})
                        for k, p in writes.items()}
            writer = ChecksumWriter(tmp, overwrite=False)
            future = dcp.async_save(snapshot, storage_writer=writer, planner=SavePlanner(),
                                    process_group=self.pg, async_stager=Snapshot())
            self.pending = threading.Thread(
                target=self._watch, args=(future, iteration, tmp, needed, started),
                name=f"commit iter {iteration}", daemon=True)
            self.pending.start()
            return
        try:
            dcp_save(writes, tmp, self.pg)
        except CheckpointSaveError as e:
            raise CheckpointSaveError(self._failure_message(e, iteration, tmp, needed)) from None
        dist.barrier(group=self.pg)  # every rank's files are written
        if self.rank0:
            self._commit(iteration)
        dist.barrier(group=self.pg)
        self.latest = iteration_dir(root, iteration)

    def _write_side_files(self, tmp, iteration, run, model, optimizer, scheduler) -> None:
        rank = self.groups.world.rank
        save_torch(rng_state(model), rng_file(tmp, rank))
        if rank == 0:
            meta = {**run, "format": FORMAT, "iteration": iteration, "has_optimizer": True,
                    "has_rng": True, "layout": _layout(self.groups),
                    "optimizer_step": optimizer.step_count,
                    "loss_scaler": optimizer.scaler.state_dict(),
                    "scheduler": scheduler.state_dict()}
            write_json(os.path.join(tmp, META), meta)

    def _expected_bytes(self, writes: dict) -> int:
        """The next checkpoint's size: the newest one's on disk, else (the first save) the bytes
        of the stored state summed over the ranks (one all-reduce, on every rank alike)."""
        if self.state_bytes is None:
            mine = sum(v.numel() * v.element_size() for p in writes.values()
                       for v in p.views.values())
            total = torch.tensor([mine], dtype=torch.int64)
            dist.all_reduce(total, group=self.pg)
            self.state_bytes = int(total.item())
        return self.last_bytes or self.state_bytes

    def _failure_message(self, e: BaseException, iteration: int, tmp: str, needed: int) -> str:
        """One line for a failed save; rank 0 removes its unfinished folder (no rank writes to
        it any more: DCP reports a failure to every rank after all of them stopped)."""
        root = self.cfg.save
        full = is_out_of_space(e) or check_space(root, iteration, needed) is not None
        if self.rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            return no_space_message(root, iteration, needed).replace(
                "checkpoint is intact", "checkpoint is intact (a write failed: no space left)")
        detail = first_failure(e) if isinstance(e, dcp.api.CheckpointException) else str(e)
        return f"saving checkpoint {iteration} in {root} failed: {detail}"

    def _watch(self, future, iteration: int, tmp: str, needed: int, started: float) -> None:
        """An async save's thread, on every rank: wait for the write, then (rank 0) commit it
        and say so; a failure is printed at once and raised by the next finalize()."""
        try:
            future.result()
        except BaseException as e:  # CheckpointException derives from BaseException
            self.failure = self._failure_message(e, iteration, tmp, needed)
            if self.rank0:
                print(f"error: {self.failure}", flush=True)
            return
        if self.rank0:
            self._commit(iteration)
            print(f"> checkpoint saved at iteration {iteration} (async, "
                  f"{time.time() - started:.2f} s) in {self.cfg.save}", flush=True)
        self.latest = iteration_dir(self.cfg.save, iteration)

    def finalize(self) -> None:
        """Wait for an async save to be written and committed; raise if it failed."""
        if self.pending is None:
            return
        self.pending.join()
        self.pending = None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise CheckpointSaveError(failure)

    def close(self) -> None:
        """After the last save: wait for it, then give the --save folder's lock back."""
        try:
            self.finalize()
        finally:
            if self.cfg.save and self.rank0:
                release_save_lock(self.cfg.save)

    def _commit(self, iteration: int) -> None:
        """Rank 0, once every rank's files are written: publish, then retention."""
        make_latest(self.cfg.save, iteration)
        self.last_bytes = folder_bytes(iteration_dir(self.cfg.save, iteration))
        if self.cfg.save_retain_interval:
            retain(self.cfg.save, iteration, self.cfg.save_retain_interval)

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
        if cfg.strictness != "assume_ok_unexpected":
            self._apply_strictness(found, reads, log)
        checked = self._verify(found)
        dcp_load(reads, found, self.pg)
        optimizer.load_master_weights()
        if with_optimizer:
            optimizer.step_count = meta["optimizer_step"]
            optimizer.scaler.load_state_dict(meta["loss_scaler"])
            try:  # an import from a peer that saved no schedule has none (convert/peer_optim)
                if meta.get("scheduler") is not None:
                    scheduler.load_state_dict(meta["scheduler"])
            except AssertionError as e:
                # megatron-core's own check (check_schedule runs it earlier)
                raise CheckpointError(f"{found}: {e}; pass --override-opt_param-scheduler or "
                                      "--use-checkpoint-opt_param-scheduler") from None
        self._load_rng(found, meta, model, log)
        log(f"> loaded {found} (iteration {meta['iteration']}, saved at "
            f"{meta.get('layout', {}).get('name', 'one process')}) "
            f"in {time.time() - start:.2f} s ({checked})"
            + ("" if with_optimizer else "; optimizer state not loaded"))
        if cfg.finetune:
            return Resumed()
        return Resumed(meta["iteration"], meta["consumed_samples"])

    def _apply_strictness(self, folder: str, reads: dict, log) -> None:
        """--dist-ckpt-strictness: compare the tensors every rank asks for with those stored
        (of the states being read), then raise, list or drop, alike on every rank."""
        stored = SafeReader(folder).read_metadata().state_dict_metadata
        states = {key.split(".", 1)[0] for key in reads}
        stored = {k for k, md in stored.items()
                  if isinstance(md, TensorStorageMetadata) and k.split(".", 1)[0] in states}
        asked = [None] * self.groups.world.size
        dist.all_gather_object(asked, sorted(reads), group=self.pg)
        everywhere = set().union(*asked)
        try:
            skip, lines = resolve(self.cfg.strictness, everywhere - stored,
                                             stored - everywhere, folder)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        for line in lines:
            log(line)
        for key in skip & set(reads):
            del reads[key]

    def _verify(self, folder: str) -> str:
        """Before reading anything: each rank compares its share of the stored files with their
        checksums; every rank raises the first mismatch any rank found (nothing is loaded)."""
        if not self.cfg.verify:
            return "checksums not verified: --no-verify-checkpoint"
        start, world = time.time(), self.groups.world
        errors = [None] * world.size
        dist.all_gather_object(errors, verify_chunks(folder, world.rank, world.size),
                               group=self.pg)
        found = [e for mine in errors for e in mine]
        if found:
            raise CheckpointError(found[0])
        return f"checksums verified in {time.time() - start:.2f} s"

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
    return {"world": t.world_size, "tp": t.tp, "ep": t.ep, "dp": t.dp, "pp": t.pp, "cp": t.cp,
            "etp": t.etp, "sp": t.sp, "name": t.describe()}
