"""Stored tensors on torch.distributed.checkpoint (DCP): the rectangles of them one rank holds
(`Parts`), the save and load planners over them, and the safe metadata reader.

A stored tensor is the full tensor one process would hold (megatron.model.params, "stored
tensors"). Each rank writes and reads only rectangles of them (`Parts`: global offset -> a view
into local memory), so a checkpoint written at one layout is read at any other.
Checked: every stored chunk's bytes get a CRC-32 at save (`ChecksumWriter`: each rank over the
chunks it wrote, kept in DCP's own metadata beside each chunk's place), verified before a load
reads anything (`verify_chunks`); a mismatch names the file and the tensor.
Safe: DCP's metadata is unpickled by an unpickler that admits only DCP's own metadata classes;
every other read is JSON or `torch.load(weights_only=True)`; a checkpoint holding anything else
is refused. Loading never runs code from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import pickle
import zlib
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.staging import AsyncStager


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message names the file, flag or tensor."""


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


def add_range(parts: dict, names: list[str], pieces, shape, a: int, b: int, buffers) -> None:
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


# ---- DCP planners over Parts --------------------------------------------------------------------
class SavePlanner(DefaultSavePlanner):
    """Writes each Parts view as one chunk of its stored tensor (no flattening, no replicas)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, parts in self.state_dict.items():
            for offset, view in parts.views.items():
                chunk = ChunkStorageMetadata(torch.Size(offset), view.shape)
                data = TensorWriteData(chunk, TensorProperties.create_from_tensor(view),
                                       torch.Size(parts.shape))
                items.append(WriteItem(MetadataIndex(key, torch.Size(offset)), WriteItemType.SHARD,
                                       tensor_data=data))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        return self.state_dict[index.fqn].views[tuple(index.offset)]


class LoadPlanner(DefaultLoadPlanner):
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
                raise CheckpointError(f"{self.where}: holds no tensor {key!r} (the model has "
                                      "it; --dist-ckpt-strictness log_unexpected loads the rest "
                                      "and keeps its initial value)")
            if tuple(md.size) != tuple(parts.shape):
                raise CheckpointError(f"{self.where}: {key} has shape {tuple(md.size)} in the "
                                      f"checkpoint but {tuple(parts.shape)} in the model")
            requests += create_read_items_for_chunk_list(key, md, parts.chunks())
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].views[tuple(index.offset)]

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"{self.where}: holds pickled objects "
                              f"({read_item.dest_index.fqn}); refused")


class Snapshot(AsyncStager):
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
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch", "strided"),
    ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if ((module, name) in _ALLOWED
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
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
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError,
                TypeError) as e:
            raise CheckpointError(
                f"{path} is unreadable or truncated ({type(e).__name__}: {e})") from None
        if type(metadata).__name__ != "Metadata":
            raise CheckpointError(f"{path}: not DCP metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---- checksums of the stored chunks ------------------------------------------------------------
CRC = "ted_crc32"  # the attribute of DCP's per-chunk _StorageInfo that holds the chunk's CRC-32
_BLOCK = 16 << 20


class ChecksumWriter(dcp.FileSystemWriter):
    """DCP's file writer, adding to each chunk it wrote the CRC-32 of the chunk's bytes as read
    back from the file. The write results travel to the coordinator, which pickles them into
    `.metadata`: the checksums are committed with the metadata, by the same atomic rename."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        add_checksums(str(self.path), future.wait())
        return future


def add_checksums(folder: str, results) -> None:
    by_file: dict[str, list] = {}
    for result in results:
        by_file.setdefault(str(result.storage_data.relative_path), []).append(result.storage_data)
    for name, infos in by_file.items():
        with open(os.path.join(folder, name), "rb") as f:
            for info in infos:
                setattr(info, CRC, _crc(f, info.offset, info.length))


def _crc(f, offset: int, length: int) -> int:
    f.seek(offset)
    crc = 0
    while length > 0:
        block = f.read(min(length, _BLOCK))
        if not block:
            break  # truncated: the CRC will not match
        crc, length = zlib.crc32(block, crc), length - len(block)
    return crc


def verify_chunks(folder: str, share: int = 0, shares: int = 1) -> list[str]:
    """Compare the stored chunks of every `shares`-th file (from the `share`-th, in name order)
    with the CRC-32s saved in `.metadata`; one line per mismatch (empty: all match). A
    checkpoint saved before checksums existed has none: nothing to compare."""
    metadata = SafeReader(folder).read_metadata()
    by_file: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        by_file.setdefault(str(info.relative_path), []).append((index, info))
    errors = []
    for name in sorted(by_file)[share::shares]:
        with open(os.path.join(folder, name), "rb") as f:
            for index, info in by_file[name]:
                want = getattr(info, CRC, None)
                if want is not None and _crc(f, info.offset, info.length) != want:
                    errors.append(
                        f"{os.path.join(folder, name)}: the bytes of tensor {index.fqn} (chunk at "
                        f"{tuple(index.offset)}) do not match the checksum written at save: the "
                        "file is corrupt; nothing was loaded (load an earlier checkpoint: --load "
                        "DIR/iter_N; --no-verify-checkpoint loads it unchecked)")
    return errors


# ---- save and load -----------------------------------------------------------------------------
class CheckpointSaveError(CheckpointError):
    """A save that failed at run time (a write error, a full disk): a fault, exit status 1."""

    exit_status = 1


def is_out_of_space(e: BaseException) -> bool:
    """Whether a save failure comes from a full disk: ENOSPC anywhere in DCP's per-rank
    failures or their causes (torch.save's zip writer reports a short write as 'unexpected
    pos', its own words for ENOSPC)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(x) or "No space left" in str(x):
            return True
        failures = getattr(x, "failures", None) or {}
        todo += [_unwrap(f) for f in failures.values()]
        todo += [x.__cause__, x.__context__]
    return False


def dcp_save(parts: dict, folder: str, pg) -> None:
    writer = ChecksumWriter(folder, overwrite=False)
    try:
        dcp.save(parts, storage_writer=writer, planner=SavePlanner(), process_group=pg,
                 no_dist=pg is None)
    except dcp.api.CheckpointException as e:
        raise CheckpointSaveError(f"saving {folder} failed: {first_failure(e)}") from e


def dcp_load(parts: dict, folder: str, pg) -> None:
    try:
        dcp.load(parts, storage_reader=SafeReader(folder), planner=LoadPlanner(folder),
                 process_group=pg, no_dist=pg is None)
    except dcp.api.CheckpointException as e:
        raise CheckpointError(f"loading {folder} failed: {first_failure(e)}") from None


def first_failure(e) -> str:
    failures = getattr(e, "failures", {}) or {}
    for rank, failure in sorted(failures.items()):
        inner = _unwrap(failure)
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return str(e)


def _unwrap(failure) -> BaseException:
    """DCP keeps each rank's failure as (exception, its traceback frames): the exception."""
    if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
        return failure[0]
    return getattr(failure, "exc", failure)
