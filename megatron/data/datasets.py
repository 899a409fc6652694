"""Pretraining data: Megatron .bin/.idx token files -> fixed-length GPT samples.

Built on megatron-core's datasets: GPTDataset cuts the concatenated, seed-shuffled documents
into sequences of seq_length + 1 tokens (crossing document boundaries); BlendedDataset mixes
several weighted prefixes; MockGPTDataset makes synthetic data. Every rank builds the same
datasets from the same seed, so the samples do not depend on the number of processes; which
rank reads which sample is the sampler's business.

Index caching (megatron-core 0.16.1): GPTDataset saves its document/sample/shuffle indices as
.npy files under cache_dir (None: megatron-core's default, a folder "<prefix>/cache/" next to
the data). With torch.distributed initialized, BlendedMegatronDatasetBuilder builds on global
rank 0 first, then a barrier, then the other ranks load the cache: cache_dir must be one
filesystem all ranks see.
"""

import contextlib
import copy
import glob
import hashlib
import json
import os
import re
import stat
import struct

import numpy
import torch

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import DType

# .idx layout (MMIDIDX version 1, little-endian): 9-byte magic, u64 version, u8 dtype code,
# u64 sequence count S, u64 document count D, then int32[S] sequence lengths,
# int64[S] byte offsets into .bin, int64[D] document boundaries (a multimodal index adds int8[S]).
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")


def check_indexed_dataset(prefix: str) -> None:
    """Raise FileNotFoundError / ValueError naming the file unless prefix.bin/.idx are whole.

    megatron-core asserts or reads garbage on such files; this says which file and why.
    """
    _checked_sequence_lengths(prefix)


def check_input_file(path: str, flag: str) -> None:
    """Raise FileNotFoundError / ValueError unless `path` (given as `flag`) is a readable file:
    a directory, a missing file and one this user cannot read each get their own message."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give the file itself")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: file not found")
    _check_readable(path, f"{flag} {path}")


def _check_readable(path: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise ValueError(f"{what} cannot be read ({err.strerror}): fix its permissions or give "
                         "another file") from None


def _check_prefix_files(prefix: str) -> None:
    """--data-path takes prefixes; say what is wrong when it got a directory or a file name."""
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and os.path.isfile(prefix):
            raise FileNotFoundError(f"--data-path {prefix}: give the prefix without {ext} "
                                    f"({prefix[:-len(ext)]})")
    if os.path.isdir(prefix) and not os.path.exists(prefix + ".idx"):
        found = sorted(glob.glob(os.path.join(prefix, "*.idx")))[:3]
        hint = f", e.g. {found[0][:-4]}" if found else " (none found in it)"
        raise ValueError(f"--data-path {prefix} is a directory; give the prefix of a .bin/.idx "
                         f"pair in it{hint}")
    for path in (prefix + ".idx", prefix + ".bin"):
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found (data prefix {prefix!r}): give the prefix "
                                    "of a .bin/.idx pair tools/preprocess_data.py wrote") from None
        except OSError as err:  # e.g. a directory on the way this user may not enter
            raise ValueError(f"{path} cannot be reached ({err.strerror}): fix the permissions of "
                             "its directories") from None
        if is_dir:
            raise ValueError(f"{path} is a directory, not a file (data prefix {prefix!r})")
        _check_readable(path, path)


def _checked_sequence_lengths(prefix: str) -> numpy.ndarray:
    """check_indexed_dataset's work; returns the token count of every sequence."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    _check_prefix_files(prefix)
    dtype, lengths = _read_idx(idx_path)
    expected = int(lengths.sum(dtype=numpy.int64)) * numpy.dtype(dtype).itemsize
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise ValueError(
            f"{bin_path} holds {actual} bytes but {idx_path} describes {expected}: "
            "the pair is from different runs or one is incomplete; preprocess again"
        )
    return lengths


def _read_idx(idx_path: str) -> tuple[type, numpy.ndarray]:
    """Validate an .idx file's header, size and document table; return (token dtype, lengths)."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER.size)
    if len(head) < _IDX_HEADER.size or not head.startswith(_IDX_MAGIC):
        raise ValueError(f"{idx_path} is not an MMIDIDX index file (truncated or wrong format)")
    _, version, code, n_seq, n_doc = _IDX_HEADER.unpack(head)
    if version != 1 or code not in {d.value for d in DType}:
        raise ValueError(f"{idx_path}: unsupported version {version} or dtype code {code}")
    plain = _IDX_HEADER.size + n_seq * (4 + 8) + n_doc * 8
    if size not in (plain, plain + n_seq):  # + n_seq: the multimodal index's mode bytes
        raise ValueError(
            f"{idx_path} has {size} bytes but its header ({n_seq} sequences, {n_doc} documents) "
            f"needs {plain}: the file is truncated or corrupt"
        )
    mm = numpy.memmap(idx_path, mode="r")
    lengths = numpy.frombuffer(mm, numpy.int32, n_seq, _IDX_HEADER.size)
    docs = numpy.frombuffer(mm, numpy.int64, n_doc, _IDX_HEADER.size + n_seq * 12)
    if n_doc == 0 or docs[0] != 0 or docs[-1] != n_seq or numpy.any(numpy.diff(docs) < 0):
        raise ValueError(f"{idx_path}: document table is not 0 .. {n_seq} in order: corrupt")
    if numpy.any(lengths < 0):
        raise ValueError(f"{idx_path}: negative sequence lengths: corrupt")
    return DType.dtype_from_code(code), lengths


def check_token_ids(prefix: str, vocab_size: int, cache_dir: str | None = None) -> None:
    """Raise ValueError when prefix.bin holds an id outside [0, vocab_size): the model would
    index past its embedding (an IndexError on every rank) or train on ids it cannot predict.

    Once per file, not per step: a chunked min/max over the memory-mapped tokens (measured: 0.09 s
    per GiB of uint16 from the page cache; disk speed when cold), remembered in a small JSON file
    next to the dataset caches, keyed by the file's path, size and mtime, so a restart does not
    scan again.
    """
    dtype, _ = _read_idx(prefix + ".idx")
    info = numpy.iinfo(dtype) if numpy.issubdtype(dtype, numpy.integer) else None
    if info is not None and info.min >= 0 and info.max < vocab_size:
        return  # e.g. uint16 tokens and a 100k vocabulary: nothing can be out of range
    low, high = _token_range(prefix, dtype, cache_dir)
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"{prefix}.bin holds token id {bad} but the tokenizer has {vocab_size} ids "
            f"(0..{vocab_size - 1}): the data was preprocessed with another tokenizer; give that "
            "tokenizer's --tokenizer-model / --vocab-file / --vocab-size, or preprocess again with "
            "this one"
        )


def _token_range(prefix: str, dtype, cache_dir: str | None) -> tuple[int, int]:
    bin_path = prefix + ".bin"
    about = os.stat(bin_path)
    key = {"bin": os.path.abspath(bin_path), "size": about.st_size, "mtime_ns": about.st_mtime_ns}
    name = f"{os.path.basename(prefix)}-{hashlib.sha1(key['bin'].encode()).hexdigest()[:10]}.json"
    cache = os.path.join(cache_dir or os.path.join(prefix, "cache"), "token_range", name)
    try:
        with open(cache, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return int(saved["min"]), int(saved["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    low, high = _scan_range(bin_path, dtype)
    _save_json(cache, {"key": key, "min": low, "max": high})
    return low, high


def _scan_range(bin_path: str, dtype, chunk: int = 1 << 26) -> tuple[int, int]:
    """(min, max) token id of a .bin file, read in chunks (bounded memory whatever its size)."""
    if os.path.getsize(bin_path) == 0:
        return 0, 0
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    lows, highs = [], []
    for start in range(0, len(tokens), chunk):
        part = tokens[start:start + chunk]
        lows.append(int(part.min()))
        highs.append(int(part.max()))
    return min(lows), max(highs)


def _save_json(path: str, value: dict) -> None:
    """Best effort: a read-only data directory only costs the next start another scan."""
    temp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(temp, path)  # several ranks may write it at once: each write is whole
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temp)


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: either `p1 p2 ...` or `w1 p1 w2 p2 ...` (weights need not sum
    to 1)."""
    if not data_path:
        raise ValueError("--data-path is empty: give `PREFIX ...` or `WEIGHT PREFIX ...`")
    heads = data_path[0::2]
    numeric = [_is_number(item) for item in heads]
    if len(data_path) % 2 == 1 or not any(numeric):
        if _is_number(data_path[0]):
            raise ValueError(
                f"--data-path {' '.join(data_path)}: starts with a weight but is not "
                "WEIGHT PREFIX pairs; give a weight before every prefix or none at all"
            )
        return list(data_path), None
    if not all(numeric):
        raise ValueError(
            f"--data-path {' '.join(data_path)}: mixes weights and prefixes; "
            "give a weight before every prefix or none at all"
        )
    weights = [float(w) for w in heads]
    if not all(w > 0 for w in weights):  # megatron-core's BlendedDataset asserts this
        raise ValueError(f"--data-path weights {weights} must all be > 0 (drop a prefix instead)")
    return list(data_path[1::2]), weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _Builder(BlendedMegatronDatasetBuilder):
    """megatron-core's builder, with one trap removed.

    In 0.16.1 BlendedDataset calls torch.distributed.get_rank() on a cache miss whenever
    path_to_cache is set, which raises without a process group. Single-process runs therefore
    build blend indices uncached (they are cheap); the GPTDataset indices are still cached.
    """

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            *rest, config = args
            config = copy.copy(config)
            config.path_to_cache = None  # not part of the blend's cache key
            args = (*rest, config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )


def build_train_valid_test_datasets(
    *,
    data_path: list[str] | None,
    split: str,
    mock: bool,
    seq_length: int,
    seed: int,
    tokenizer,
    num_samples: tuple[int, int, int],
    cache_dir: str | None = None,
    eod_mask_loss: bool = False,
    mmap_bin_files: bool = True,
):
    """(train, valid, test) datasets; None for a split with 0 weight in --split or 0 samples,
    and for a valid or test split whose sequences hold no tokens (check_data warns of it).

    Several prefixes blend by their weights, or by their token counts when unweighted; each
    split has at least num_samples items (more epochs when needed). Must be called on every rank
    (it holds barriers when torch.distributed is initialized).
    mock=True ignores data_path and split: megatron-core's mock data always splits 1,1,1.
    Items: tokens, labels [S] int64, loss_mask [S] float32, position_ids [S] int64
    (+ dataset_id when blending); no attention mask is materialized (causal is implied).
    """
    skipped = set()
    if mock:
        blend, cls = None, MockGPTDataset
    else:
        prefixes, weights, lengths, notes = _checked_data(data_path, split, num_samples)
        skipped = set(notes)
        if weights is None and len(prefixes) > 1:
            # megatron-core blends unweighted prefixes one epoch each and silently returns
            # fewer samples than asked; weighting by size keeps that mix and the sample count.
            weights = [float(lengths[p].sum(dtype=numpy.int64)) for p in prefixes]
        blend, cls = (prefixes, weights), GPTDataset
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=None if mock else split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        num_dataset_builder_threads=1,
        mmap_bin_files=mmap_bin_files,  # False: megatron-core reads each .bin into memory
    )
    # A split asked for no samples is not built at all: megatron-core would build a full epoch
    # of it (and hang if it is empty, see _empty_splits); nor is a valid/test split without tokens.
    config.split_matrix = [None if name in skipped else bounds for name, bounds in
                           zip(SPLIT_NAMES, _split_matrix(config.split_matrix, num_samples))]
    # Every rank gets its own dataset objects (is_built_on_rank is always true); megatron-core still
    # computes the index cache on rank 0 first and lets the other ranks load it after a barrier.
    datasets = _Builder(cls, list(num_samples), lambda: True, config).build()
    return tuple(datasets)


def check_data(data_path: list[str], split: str, num_samples: tuple[int, int, int], *,
               vocab_size: int | None = None, cache_dir: str | None = None) -> list[str]:
    """Every check of --data-path and --split that can fail, without building anything: run on
    every rank before any process group exists. With vocab_size, also that every token id fits
    the tokenizer (check_token_ids). Returns warnings: a valid or test split that is skipped."""
    prefixes, _, _, notes = _checked_data(data_path, split, num_samples)
    if vocab_size is not None:
        for prefix in prefixes:
            check_token_ids(prefix, vocab_size, cache_dir)
    return list(notes.values())


def _checked_data(data_path, split, num_samples):
    """(prefixes, weights or None, {prefix: sequence lengths}, {skipped split: why}) after
    checking files and splits."""
    vector = parse_split(split)
    prefixes, weights = parse_data_path(data_path or [])
    lengths = {prefix: _checked_sequence_lengths(prefix) for prefix in prefixes}
    matrix = _split_matrix(convert_split_vector_to_split_matrix(vector), num_samples)
    # a split --split gives no share while --eval-iters asks for it: skipped, with one warning
    notes = {name: (f"--split {split} gives the {name} split no share: training without {name} "
                    "evaluation (give it a share, e.g. --split 969,30,1, to have one)")
             for name, weight, n in zip(SPLIT_NAMES, vector, num_samples)
             if name != "train" and weight == 0 and n > 0}
    for prefix, seq_lengths in lengths.items():
        for name, note in _empty_splits(prefix, seq_lengths, matrix, split).items():
            notes.setdefault(name, note)
    return prefixes, weights, lengths, notes


def parse_split(split: str) -> list[float]:
    """--split as normalized train, valid, test weights ("969,30,1"; missing ones are 0)."""
    parts = [p for p in re.split(r"[,\s]+", split.strip()) if p]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: give up to three non-negative weights for train, "
                         "valid, test, e.g. 969,30,1")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def _split_matrix(matrix, num_samples):
    """megatron-core's split bounds, with None for a split asked for no samples."""
    return [None if n == 0 else m for m, n in zip(matrix, num_samples)]


SPLIT_NAMES = ("train", "valid", "test")


def _empty_splits(prefix, seq_lengths, split_matrix, split) -> dict[str, str]:
    """megatron-core 0.16.1's GPTDataset loops forever on a split whose sequences hold no
    tokens (it adds epochs of 0 tokens until it has enough), e.g. --split 969,30,1 on a handful
    of documents; same rounding as the builder. An empty train split is refused; an empty valid
    or test split is skipped, as Megatron-LM users expect of a small corpus: {name: warning}."""
    n, skipped = len(seq_lengths), {}
    for name, bounds in zip(SPLIT_NAMES, split_matrix):
        if bounds is None:
            continue
        beg, end = (int(round(b * float(n))) for b in bounds)
        if int(seq_lengths[beg:end].sum(dtype=numpy.int64)) > 0:
            continue
        where = (f"--split {split}: the {name} split of {prefix} gets sequences [{beg}, {end}) "
                 f"of {n}, which hold no tokens")
        if name == "train":
            raise ValueError(f"{where}; give it a larger share or use more documents")
        skipped[name] = (f"{where}; training without {name} evaluation (give it a larger share "
                         "or use more documents to have one)")
    return skipped


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of dataset items into a batch: each key -> tensor [B, ...]."""
    if not samples:
        raise ValueError("collate: no samples")
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
