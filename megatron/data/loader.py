"""Which samples each rank reads: Megatron's micro-batch sampler and the data loader over it."""

from __future__ import annotations

import signal
from typing import Optional

import torch

from megatron.data.datasets import collate
from megatron.parallel.context import split_sequence
from megatron.parallel.topology import Group

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class MicroBatchSampler(torch.utils.data.Sampler):
    """This DP rank's micro-batches (lists of sample indices) of `steps` global batches from sample
    `first_sample`: of each block of micro x DP samples DP rank r takes the r-th micro-batch
    (Megatron's sampler), so every micro-batch holds the same samples whatever the DP size;
    accumulation walks the blocks in order."""

    def __init__(self, first_sample: int, steps: int, micro_batch_size: int, global_batch_size: int,
                 dp_size: int, dp_rank: int):
        self.first, self.steps = first_sample, steps
        self.micro, self.global_batch = micro_batch_size, global_batch_size
        self.dp, self.rank = dp_size, dp_rank

    @property
    def micro_per_step(self) -> int:
        """Micro-batches per step on each DP rank."""
        return self.global_batch // (self.micro * self.dp)

    def __len__(self) -> int:
        return self.steps * self.micro_per_step

    def __iter__(self):
        for step in range(self.steps):
            base = self.first + step * self.global_batch
            for i in range(self.micro_per_step):
                start = base + (i * self.dp + self.rank) * self.micro
                yield list(range(start, start + self.micro))


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's init: SIGTERM and SIGINT are the main process's to act on. torchrun
    passes them to each rank's whole process group and Ctrl-C reaches the terminal's, so workers
    get them too; torch's worker handler would die of SIGTERM, Python's raise KeyboardInterrupt,
    and either kills the rank's next batch ("DataLoader worker ... is killed by signal") before
    --exit-signal-handler can save. The main process still ends its workers: through the index
    queue, or their parent check when it dies."""
    for name in ("SIGTERM", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def batches(dataset, sampler: MicroBatchSampler, num_workers: int, device,
            context: Optional[Group] = None):
    """Iterate the sampler's steps as lists of micro-batches on `device`, read by `num_workers`
    loader processes (0: in this process). `context`: the context-parallel group; each rank
    keeps its two chunks of every sequence (megatron.parallel.context)."""
    # A generator of its own: a loader draws its workers' base seed from it, and drawing from the
    # default one would shift dropout and jitter (a resumed run would then differ).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers,
                                         prefetch_factor=2 if num_workers else None,
                                         generator=torch.Generator(),
                                         worker_init_fn=ignore_stop_signals)
    items = iter(loader)
    for _ in range(sampler.steps):
        step = (next(items) for _ in range(sampler.micro_per_step))
        yield [context_part({k: batch[k].to(device) for k in BATCH_KEYS}, context)
               for batch in step]


def context_part(batch: dict, context: Optional[Group]) -> dict:
    """This context-parallel rank's part of a micro-batch: its two chunks of each [b, s] tensor
    (the position ids keep the tokens' global positions)."""
    if context is None or context.size == 1:
        return batch
    return {k: split_sequence(v, context) for k, v in batch.items()}
