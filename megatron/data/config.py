"""Data configuration: pure data (no groups, no devices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DataConfig:
    num_workers: int
    data_path: Optional[list]
    split: str
    mock: bool
    cache_dir: Optional[str]
    eod_mask_loss: bool
    tokenizer_type: str
    tokenizer_model: Optional[str]
    vocab_file: Optional[str]
    merge_file: Optional[str]
    vocab_size: Optional[int]
    mmap_bin_files: bool = True  # False: --no-mmap-bin-files: file reads, no mmap
