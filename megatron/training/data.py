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

import copy
import os
import re
import struct

import numpy
import torch

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
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


def _checked_sequence_lengths(prefix: str) -> numpy.ndarray:
    """check_indexed_dataset's work; returns the token count of every sequence."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (data prefix {prefix!r})")
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


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: either `p1 p2 ...` or `w1 p1 w2 p2 ...` (weights need not sum to 1)."""
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
):
    """(train, valid, test) datasets; None for a split with 0 weight in --split or 0 samples.

    Several prefixes blend by their weights, or by their token counts when unweighted; each
    split has at least num_samples items (more epochs when needed). Must be called on every rank
    (it holds barriers when torch.distributed is initialized).
    mock=True ignores data_path and split: megatron-core's mock data always splits 1,1,1.
    Items: tokens, labels [S] int64, loss_mask [S] float32, position_ids [S] int64
    (+ dataset_id when blending); no attention mask is materialized (causal is implied).
    """
    if mock:
        blend, cls = None, MockGPTDataset
    else:
        prefixes, weights, lengths = _checked_data(data_path, split, num_samples)
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
    )
    # A split asked for no samples is not built at all: megatron-core would build a full epoch
    # of it (and hang if it is empty, see _check_splits_have_tokens).
    config.split_matrix = _split_matrix(config.split_matrix, num_samples)
    # Every rank gets its own dataset objects (is_built_on_rank is always true); megatron-core still
    # computes the index cache on rank 0 first and lets the other ranks load it after a barrier.
    datasets = _Builder(cls, list(num_samples), lambda: True, config).build()
    return tuple(datasets)


def check_data(data_path: list[str], split: str, num_samples: tuple[int, int, int]) -> None:
    """Every check of --data-path and --split that can fail, without building anything: run on
    every rank before any process group exists."""
    _checked_data(data_path, split, num_samples)


def _checked_data(data_path, split, num_samples):
    """(prefixes, weights or None, {prefix: sequence lengths}) after checking files and splits."""
    vector = parse_split(split)
    prefixes, weights = parse_data_path(data_path or [])
    lengths = {prefix: _checked_sequence_lengths(prefix) for prefix in prefixes}
    matrix = _split_matrix(convert_split_vector_to_split_matrix(vector), num_samples)
    for prefix, seq_lengths in lengths.items():
        _check_splits_have_tokens(prefix, seq_lengths, matrix, split)
    return prefixes, weights, lengths


def parse_split(split: str) -> list[float]:
    """--split as normalized train, valid, test weights ("969,30,1"; missing ones are 0)."""
    parts = [p for p in re.split(r"[,\s]+", split.strip()) if p]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: give up to three non-negative weights for train, valid, test, "
                         "e.g. 969,30,1")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def _split_matrix(matrix, num_samples):
    """megatron-core's split bounds, with None for a split asked for no samples."""
    return [None if n == 0 else m for m, n in zip(matrix, num_samples)]


def _check_splits_have_tokens(prefix, seq_lengths, split_matrix, split) -> None:
    """megatron-core 0.16.1's GPTDataset loops forever on a split whose sequences hold no
    tokens (it adds epochs of 0 tokens until it has enough), e.g. --split 969,30,1 on a handful
    of documents. Refuse such a split, with the same rounding the builder uses."""
    n = len(seq_lengths)
    for name, bounds in zip(("train", "valid", "test"), split_matrix):
        if bounds is None:
            continue
        beg, end = (int(round(b * float(n))) for b in bounds)
        if int(seq_lengths[beg:end].sum(dtype=numpy.int64)) == 0:
            raise ValueError(
                f"--split {split}: the {name} split of {prefix} gets sequences [{beg}, {end}) "
                f"of {n}, which hold no tokens; give it a larger share, ask it for 0 samples, "
                "or use more documents"
            )


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of dataset items into a batch: each key -> tensor [B, ...]."""
    if not samples:
        raise ValueError("collate: no samples")
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
