"""Checkpoints with Megatron's habits on torch.distributed.checkpoint (DCP), resumable at any layout.

Layout on disk (Megatron's names):
    SAVE/latest_checkpointed_iteration.txt      the iteration of the newest complete checkpoint
    SAVE/iter_0000100/                          one checkpoint:
        .metadata, __<rank>_0.distcp            DCP: every stored tensor (megatron.model.params,
                                                "stored tensors") as the one-process full tensor
        ted_checkpoint.json                     iteration, consumed samples, scheduler, loss scaler,
                                                optimizer step, the configs, the layout it was saved at
        rng/rank_00003.pt                       each rank's RNG states (tensors only)

What is stored. The optimizer's fp32 master weights ARE the model ("model.<name>": half-precision
parameters are always the cast of their master copy), with Adam's moments ("exp_avg.<name>",
"exp_avg_sq.<name>"); each rank writes the parts it owns (ZeRO-1: its flat shard, cut into
rectangles of the stored tensors), and one copy of every replica, so the files hold each element
once. On load every rank reads the parts its own layout needs: any TP / EP / DP, directly.

Atomic: a save writes `iter_N.tmp/`; once every rank has finished, rank 0 renames it to `iter_N/`,
fsyncs the folder, then replaces the tracker file with os.replace. A kill at any point leaves the
previous checkpoint, and the tracker naming it, intact.
Safe: DCP's metadata is unpickled by an unpickler that admits only DCP's own metadata classes;
every other read is JSON or `torch.load(weights_only=True)`; a checkpoint holding anything else
is refused. Loading never runs code from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.staging import AsyncStager

from megatron.model.config import ModelConfig
from megatron.model.params import checkpoint_pieces, spec_of
from megatron.parallel.topology import TEDGroups
from ted_patches.config import MoEConfig

TRACKER = "latest_checkpointed_iteration.txt"
META = "ted_checkpoint.json"
FORMAT = "megatron-ted/1"
STATES = ("model", "exp_avg", "exp_avg_sq")  # stored per parameter, from the optimizer's fp32 buffers


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message names the file, flag or tensor."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


# ---- the parts of stored tensors one rank holds -----------------------------------------------
@dataclass
class Parts:
    """This rank's rectangles of one stored tensor: {global offset: view into local storage}."""

    shape: tuple[int, ...]
    views: dict[tuple[int, ...], torch.Tensor] = dataclasses.field(default_factory=dict)

    def chunks(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(o), v.shape) for o, v in self.views.items()]


def flat_blocks(shape, a: int, b: int):
    """Boxes (start, size) tiling the row-major flat range [a, b) of a tensor of `shape`; each box
    is itself contiguous in flat order (a partial row, whole rows, a partial row, recursively)."""
    if a >= b:
        return
    if len(shape) <= 1:
        yield (a,), (b - a,)
        return
    inner = math.prod(shape[1:])
    (i0, r0), (i1, r1) = divmod(a, inner), divmod(b, inner)
    if i0 == i1:
        for start, size in flat_blocks(shape[1:], r0, r1):
            yield (i0, *start), (1, *size)
        return
    if r0:
        for start, size in flat_blocks(shape[1:], r0, inner):
            yield (i0, *start), (1, *size)
        i0 += 1
    if i1 > i0:
        yield (i0, *([0] * (len(shape) - 1))), (i1 - i0, *shape[1:])
    if r1:
        for start, size in flat_blocks(shape[1:], 0, r1):
            yield (i1, *start), (1, *size)


def _flat_index(shape, start) -> int:
    index = 0
    for n, s in zip(shape, start):
        index = index * n + s
    return index


def _add_range(parts: dict, names: list[str], pieces, shape, a: int, b: int, buffers) -> None:
    """Add, for each piece of a parameter, the views of its flat range [a, b) in `buffers` (one
    1-D tensor per state, each holding exactly that range) to `parts[state.piece]`."""
    for start, size in flat_blocks(shape, a, b):
        first = _flat_index(shape, start) - a
        for piece in pieces:
            lo = [max(s, p) for s, p in zip(start, piece.start)]
            hi = [min(s + n, p + m) for s, n, p, m in zip(start, size, piece.start, piece.size)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            within = tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, start))
            shift = [low - p for low, p in zip(lo, piece.start)]
            if piece.expert:
                shift = shift[1:]
            offset = tuple(o + d for o, d in zip(piece.offset, shift))
            for name, buf in zip(names, buffers):
                view = buf[first:first + math.prod(size)].view(size)[within]
                entry = parts.setdefault(f"{name}.{piece.key}", Parts(piece.global_shape))
                entry.views[offset] = view.squeeze(0) if piece.expert else view


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
                    _add_range(target, list(states), pieces, p.shape, a - offset, b - offset, buffers)
            offset += n
    return reads, writes


def _state_buffer(fg, state: str) -> torch.Tensor:
    return {"model": fg.master, "exp_avg": fg.exp_avg, "exp_avg_sq": fg.exp_avg_sq}[state]


# ---- DCP planners over Parts --------------------------------------------------------------------
class _SavePlanner(DefaultSavePlanner):
    """Writes each Parts view as one chunk of its stored tensor (no flattening, no replicas)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, parts in self.state_dict.items():
            for offset, view in parts.views.items():
                chunk = ChunkStorageMetadata(torch.Size(offset), view.shape)
                data = TensorWriteData(chunk, TensorProperties.create_from_tensor(view), torch.Size(parts.shape))
                items.append(WriteItem(MetadataIndex(key, torch.Size(offset)), WriteItemType.SHARD, tensor_data=data))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        return self.state_dict[index.fqn].views[tuple(index.offset)]


class _LoadPlanner(DefaultLoadPlanner):
    """Reads into Parts views; a missing or mis-shaped stored tensor is a CheckpointError."""

    def __init__(self, where: str):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.where = where

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        requests = []
        for key, parts in self.state_dict.items():
            md = stored.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{self.where}: holds no tensor {key!r} (the model has it)")
            if tuple(md.size) != tuple(parts.shape):
                raise CheckpointError(f"{self.where}: {key} has shape {tuple(md.size)} in the checkpoint "
                                      f"but {tuple(parts.shape)} in the model")
            requests += create_read_items_for_chunk_list(key, md, parts.chunks())
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].views[tuple(index.offset)]

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"{self.where}: holds pickled objects ({read_item.dest_index.fqn}); refused")


class _Snapshot(AsyncStager):
    """The state handed to async_save is already a private copy: stage it as it is."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---- reading DCP metadata without running code -----------------------------------------------
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch", "strided"),
    ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"), ("builtins", "frozenset"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid):
        raise CheckpointError("refusing a persistent id in checkpoint metadata")


class SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata unpickler admits DCP's metadata classes only."""

    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.path, ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _SafeUnpickler(f).load()
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}: not a checkpoint this program wrote") from None
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path} is unreadable or truncated ({type(e).__name__}: {e})") from None
        if type(metadata).__name__ != "Metadata":
            raise CheckpointError(f"{path}: not DCP metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---- the metadata file ---------------------------------------------------------------------------
def config_dict(cfg) -> dict:
    """A frozen config dataclass as JSON-able data (dtypes by name)."""
    out = dataclasses.asdict(cfg)
    return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in out.items()}


def configs_from_meta(meta: dict) -> tuple[ModelConfig, Optional[MoEConfig]]:
    model = dict(meta["model"])
    model["params_dtype"] = getattr(torch, model["params_dtype"])
    moe = meta.get("moe")
    if moe is not None:
        per_layer = moe.get("experts_per_layer")
        moe = MoEConfig(**{**moe, "layers": tuple(moe["layers"]),
                           "experts_per_layer": None if per_layer is None else tuple(per_layer)})
    return ModelConfig(**model), moe


# Fields whose change changes the stored tensors' shapes or meaning: resuming across one is an error.
SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size",
              "max_position_embeddings", "position_embedding_type", "normalization", "swiglu", "add_bias_linear",
              "untie_embeddings_and_output_weights", "num_query_groups"),
    "moe": ("num_experts", "experts_per_layer", "layers", "mlp_type", "expert_ffn_hidden_size"),
}


def check_compatible(meta: dict, model: ModelConfig, moe: Optional[MoEConfig], where: str) -> None:
    """Raise a CheckpointError naming the first model-shape field that differs from the checkpoint."""
    if (meta.get("moe") is None) != (moe is None):
        saved = "a dense GPT" if meta.get("moe") is None else "a GPT-MoE"
        raise CheckpointError(f"{where} holds {saved}; the flags build {'a GPT-MoE' if moe else 'a dense GPT'} "
                              "(check --num-experts)")
    current = {"model": config_dict(model), "moe": config_dict(moe) if moe else None}
    for section, fields in SHAPE_FIELDS.items():
        if current[section] is None:
            continue
        for field in fields:
            saved, now = meta[section].get(field), current[section][field]
            if isinstance(now, tuple):
                now = list(now)
            if saved != now:
                raise CheckpointError(f"{where} was saved with {section} {field} = {saved}, the flags give {now}: "
                                      "the model's shape differs (use the checkpoint's value)")


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- finding and checking a checkpoint ---------------------------------------------------------------
def find_checkpoint(path: str) -> Optional[str]:
    """The iteration folder to load from `path` (a --save folder, or one iter_N folder itself);
    None when `path` does not exist or holds no checkpoint (nothing, or only unfinished .tmp saves).
    Raises CheckpointError when it holds files but no valid checkpoint."""
    if os.path.isfile(os.path.join(path, META)) or os.path.isfile(os.path.join(path, ".metadata")):
        return path
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CheckpointError(f"--load {path} is a file; give the --save directory of a run")
        return None
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text[:40]!r}, not an iteration number: the file is corrupt")
        found = iteration_dir(path, int(text))
        if not os.path.isdir(found):
            raise CheckpointError(f"{tracker} names iteration {text}, but {found} does not exist")
        return found
    entries = os.listdir(path)
    complete = sorted(e for e in entries if e.startswith("iter_") and os.path.isfile(os.path.join(path, e, META)))
    if complete:  # a save that finished but was killed before the tracker was written
        return os.path.join(path, complete[-1])
    if all(e.endswith(".tmp") or e.endswith(".old") for e in entries):
        return None
    raise CheckpointError(f"{path} holds files but no checkpoint (no {TRACKER}, no iter_* folder): give the "
                          "--save directory of a run (pretrain_gpt_moe.py --load of an empty or new directory "
                          "starts from scratch)")


def read_checkpoint_meta(path: str) -> dict:
    """The metadata of the checkpoint at `path` (a --save folder's latest, or an iter_N folder),
    after checking every file it names is there and whole."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint there")
    meta_path = os.path.join(found, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: the checkpoint is incomplete")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is unreadable or truncated ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} checkpoint")
    _check_storage_files(found)
    meta["path"] = found
    return meta


def _check_storage_files(folder: str) -> None:
    metadata = SafeReader(folder).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in needed.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        if os.path.getsize(path) < size:
            raise CheckpointError(f"{path} is truncated ({os.path.getsize(path)} of {size} bytes)")


# ---- one process: stored tensors in and out (tools) -------------------------------------------
def read_stored_tensors(path: str, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every stored tensor of the checkpoint at `path` under `prefix` ("model": the fp32 weights), in
    full, in this process (no process group needed)."""
    meta = read_checkpoint_meta(path)
    folder = meta["path"]
    metadata = SafeReader(folder).read_metadata()
    parts = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(prefix + ".") and isinstance(md, TensorStorageMetadata):
            full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            parts[key] = Parts(tuple(md.size), {(0,) * full.dim(): full})
    _dcp_load(parts, folder, None)
    return {key[len(prefix) + 1:]: p.views[(0,) * len(p.shape)] for key, p in parts.items()}


def write_model_checkpoint(save_dir: str, tensors: dict[str, torch.Tensor], meta: dict, iteration: int = 0) -> str:
    """Write a model-only checkpoint from one process (full stored tensors; no optimizer, no RNG),
    loadable by pretrain_gpt_moe.py --load with --finetune or --no-load-optim. Returns its folder."""
    parts = {f"model.{k}": Parts(tuple(t.shape), {(0,) * t.dim(): t.detach().float().contiguous()})
             for k, t in tensors.items()}
    meta = {**meta, "format": FORMAT, "iteration": iteration, "has_optimizer": False, "has_rng": False}
    meta.setdefault("consumed_samples", 0)
    return _publish(save_dir, iteration, lambda tmp: _dcp_save(parts, tmp, None), meta, rank=0)


def _dcp_save(parts: dict, folder: str, pg) -> None:
    writer = dcp.FileSystemWriter(folder, overwrite=False)
    try:
        dcp.save(parts, storage_writer=writer, planner=_SavePlanner(), process_group=pg, no_dist=pg is None)
    except dcp.api.CheckpointException as e:
        raise CheckpointError(f"saving {folder} failed: {_first_failure(e)}") from None


def _dcp_load(parts: dict, folder: str, pg) -> None:
    try:
        dcp.load(parts, storage_reader=SafeReader(folder), planner=_LoadPlanner(folder), process_group=pg,
                 no_dist=pg is None)
    except dcp.api.CheckpointException as e:
        raise CheckpointError(f"loading {folder} failed: {_first_failure(e)}") from None


def _first_failure(e) -> str:
    failures = getattr(e, "failures", {}) or {}
    for rank, failure in sorted(failures.items()):
        inner = getattr(failure, "exc", failure)
        return f"rank {rank}: {inner}"
    return str(e)


def _publish(root: str, iteration: int, write, meta: dict, rank: int) -> str:
    """Rank 0's part of a one-process save: write into iter_N.tmp, then make it the latest."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "rng"))
    write(tmp)
    _write_json(os.path.join(tmp, META), meta)
    make_latest(root, iteration)
    return final


def make_latest(root: str, iteration: int) -> None:
    """Rank 0, once every rank has written iter_N.tmp: rename it to iter_N, fsync, then point the
    tracker at it with an atomic os.replace. A kill anywhere in here leaves a loadable latest."""
    final = iteration_dir(root, iteration)
    old = final + ".old"
    if os.path.exists(final):  # a stale copy of this iteration (the tracker never named it)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(final + ".tmp", final)
    _fsync_dir(root)
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


# ---- RNG states -------------------------------------------------------------------------------------
def rng_state(model) -> dict:
    """Every random stream training draws from on this rank, as tensors and numbers only."""
    version, state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "tp_stream": model.rng.state_dict()["state"],
           "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                     "cached": cached}}
    if model.rng.device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(model.rng.device)
    return out


def set_rng_state(model, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    model.rng.load_state_dict({"state": state["tp_stream"]})
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and model.rng.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], model.rng.device)


def read_rng_file(folder: str, rank: int) -> dict:
    path = _rng_file(folder, rank)
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (or pass --no-load-rng)") from None
    except Exception as e:  # weights_only refuses anything but tensors and plain data
        raise CheckpointError(f"{path} is unreadable or not plain data; refused "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _rng_file(folder: str, rank: int) -> str:
    return os.path.join(folder, "rng", f"rank_{rank:05d}.pt")


def _save_torch(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# ---- training: save and load at any layout ------------------------------------------------------
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
        _save_torch(rng_state(model), _rng_file(tmp, rank))
        if rank == 0:
            meta = {**run, "format": FORMAT, "iteration": iteration, "has_optimizer": True, "has_rng": True,
                    "layout": _layout(self.groups), "optimizer_step": optimizer.step_count,
                    "loss_scaler": optimizer.scaler.state_dict(), "scheduler": scheduler.state_dict()}
            _write_json(os.path.join(tmp, META), meta)
        _, writes = optimizer_parts(model, optimizer, self.groups)
        if self.cfg.async_save:
            snapshot = {k: Parts(p.shape, {o: v.clone() for o, v in p.views.items()}) for k, p in writes.items()}
            writer = dcp.FileSystemWriter(tmp, overwrite=False)
            future = dcp.async_save(snapshot, storage_writer=writer, planner=_SavePlanner(), process_group=self.pg,
                                    async_stager=_Snapshot())
            self.pending = (future, iteration)
        else:
            _dcp_save(writes, tmp, self.pg)
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
            raise CheckpointError(f"saving iteration {iteration} failed: {_first_failure(e)}") from None
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
        reads, _ = optimizer_parts(model, optimizer, self.groups, STATES if with_optimizer else ("model",))
        _dcp_load(reads, found, self.pg)
        optimizer.load_master_weights()
        if with_optimizer:
            optimizer.step_count = meta["optimizer_step"]
            optimizer.scaler.load_state_dict(meta["loss_scaler"])
            try:
                scheduler.load_state_dict(meta["scheduler"])
            except AssertionError as e:  # megatron-core's own check (check_schedule runs it earlier)
                raise CheckpointError(f"{found}: {e}; pass --override-opt_param-scheduler or "
                                      "--use-checkpoint-opt_param-scheduler") from None
        self._load_rng(found, meta, model, log)
        log(f"> loaded {found} (iteration {meta['iteration']}, saved at {meta.get('layout', {}).get('name', 'one process')}) "
            f"in {time.time() - start:.2f} s" + ("" if with_optimizer else "; optimizer state not loaded"))
        if cfg.finetune:
            return Resumed()
        return Resumed(meta["iteration"], meta["consumed_samples"])

    def _load_rng(self, folder: str, meta: dict, model, log) -> None:
        if self.cfg.finetune or self.cfg.no_load_rng or not meta.get("has_rng"):
            return
        if meta["layout"]["name"] != _layout(self.groups)["name"]:
            log(f"> RNG states not restored: saved at {meta['layout']['name']}, running at "
                f"{_layout(self.groups)['name']} (each rank's streams belong to its place in the layout)")
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
    return {"world": t.world_size, "tp": t.tp, "ep": t.ep, "dp": t.dp, "name": t.describe()}


def check_checkpoint_flags(config, rank: int) -> None:
    """Before any process group, on every rank: --save can be written, and --load holds nothing
    (then training starts from scratch) or a whole checkpoint of the same model's shape and
    learning-rate schedule, with this rank's RNG file readable as plain data when it will be
    restored. `config`: megatron.training.arguments.Config."""
    from megatron.training.arguments import check_writable_directory

    cfg = config.checkpoint
    if cfg.save:
        check_writable_directory("--save", cfg.save)
    if cfg.load and find_checkpoint(cfg.load) is not None:
        meta = read_checkpoint_meta(cfg.load)
        check_compatible(meta, config.model, config.moe, meta["path"])
        if meta.get("has_optimizer") and not (cfg.no_load_optim or cfg.finetune):
            check_schedule(meta, config)
        same_layout = meta.get("layout", {}).get("name") == config.topology.describe()
        if meta.get("has_rng") and same_layout and not (cfg.no_load_rng or cfg.finetune):
            read_rng_file(meta["path"], rank)


def check_schedule(meta: dict, config) -> None:
    """Megatron's rule on resume: the schedule the flags give must be the checkpoint's, unless
    --override-opt_param-scheduler (the flags win) or --use-checkpoint-opt_param-scheduler."""
    s, o = config.train.schedule, config.optim
    if s.override or s.use_checkpoint:
        return
    now = {"max_lr": o.lr, "min_lr": o.min_lr, "lr_warmup_steps": s.warmup_steps, "lr_decay_steps": s.decay_steps,
           "lr_decay_style": s.decay_style, "wd_incr_steps": s.train_iters * s.per_iteration,
           "start_wd": o.weight_decay, "end_wd": o.weight_decay}
    saved = meta.get("scheduler", {})
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if k in saved and saved[k] != v]
    if changed:
        raise CheckpointError(f"{meta['path']}: the learning-rate schedule differs from the checkpoint's "
                              f"({'; '.join(changed)}; steps in {s.unit}): pass --override-opt_param-scheduler to "
                              "train with the flags' schedule, or --use-checkpoint-opt_param-scheduler to keep the "
                              "checkpoint's")
