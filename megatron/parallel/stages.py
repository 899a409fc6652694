"""Which layers each pipeline stage runs, and which stages each pipeline rank holds.

Pure arithmetic (no processes). S = P x V stages over P pipeline ranks (V model chunks per rank,
Megatron's virtual pipeline stages). The layers are cut into S contiguous ranges in order: evenly
by default, or with Megatron's --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-
layers for the first and last stage and the rest evenly. Stages are placed on ranks
    loop (1F1B, interleaved 1F1B, GPipe): stage s on rank s % P, as its chunk s // P
    v (ZBV zero bubble, DualPipeV; V = 2): rank r holds stages r and 2P - 1 - r
which is how torch.distributed.pipelining's schedules number them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.parallel.fields import FieldError

# schedule -> how it places stages on ranks
SCHEDULE_PLACEMENT = {"1f1b": "loop", "interleaved": "loop", "gpipe": "loop", "zbv": "v",
                      "dualpipev": "v"}


@dataclass(frozen=True)
class StagePlan:
    num_layers: int
    pp: int  # pipeline ranks
    virtual: int = 1  # model chunks (stages) per pipeline rank
    first: Optional[int] = None  # layers of the first stage (None: even split)
    last: Optional[int] = None  # layers of the last stage
    schedule: str = "1f1b"

    def __post_init__(self):
        if self.schedule not in SCHEDULE_PLACEMENT:
            raise FieldError(f"{{pipeline_schedule}} {self.schedule!r}: use one of "
                             f"{sorted(SCHEDULE_PLACEMENT)}")
        if self.pp < 1 or self.virtual < 1:
            raise FieldError("{pipeline_model_parallel_size} and the virtual stages per rank "
                             f"must be >= 1 (got {self.pp} and {self.virtual})")
        if SCHEDULE_PLACEMENT[self.schedule] == "v" and self.virtual != 2:
            raise FieldError(f"{{pipeline_schedule}} {self.schedule} runs two stages per pipeline "
                             f"rank (a V): use {{num_virtual_stages_per_pipeline_rank}} 2, not "
                             f"{self.virtual}")
        if self.schedule == "interleaved" and self.virtual < 2:
            raise FieldError("{pipeline_schedule} interleaved needs >= 2 virtual stages per rank "
                             "({num_virtual_stages_per_pipeline_rank} or "
                             "{num_layers_per_virtual_pipeline_stage}); use 1f1b for one")
        self.layer_counts()  # raises on a split that does not work

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    def layer_counts(self) -> list[int]:
        """Layers of each stage, in stage order."""
        S, L = self.num_stages, self.num_layers
        if S == 1:
            return [L]
        first, last = self.first, self.last
        for name, value in (("decoder_first_pipeline_num_layers", first),
                            ("decoder_last_pipeline_num_layers", last)):
            if value is not None and value < 1:
                raise FieldError(f"{{{name}}} must be >= 1 (got {value})")
        ends = (first is not None) + (last is not None)
        rest = L - (first or 0) - (last or 0)
        middle = S - ends
        if rest < middle or (middle and rest % middle) or (not middle and rest):
            uneven = ""
            if ends:
                uneven = (f" after {first or 0} in the first and {last or 0} in the last stage "
                          f"({rest} left for {middle} stages)")
            raise FieldError(f"{{num_layers}} {L} do not split evenly over {S} pipeline stages "
                             f"({self.pp} ranks x {self.virtual} virtual stages){uneven}: choose "
                             "the layer count, {pipeline_model_parallel_size}, the virtual stages "
                             "or {decoder_first_pipeline_num_layers} / "
                             "{decoder_last_pipeline_num_layers} so they do")
        each = rest // middle if middle else 0
        counts = [each] * S
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return counts

    def stage_layers(self, stage: int) -> range:
        """The global layer indices stage `stage` runs."""
        counts = self.layer_counts()
        start = sum(counts[:stage])
        return range(start, start + counts[stage])

    def stages_of(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank `pp_rank` holds, in its chunk order."""
        P = self.pp
        if SCHEDULE_PLACEMENT[self.schedule] == "v":
            return [pp_rank, 2 * P - 1 - pp_rank]
        return [pp_rank + P * v for v in range(self.virtual)]

    def layers_of(self, pp_rank: int) -> list[int]:
        """Every global layer index pipeline rank `pp_rank` holds."""
        return sorted(i for s in self.stages_of(pp_rank) for i in self.stage_layers(s))

    def holds_first(self, pp_rank: int) -> bool:
        return 0 in self.stages_of(pp_rank)

    def holds_last(self, pp_rank: int) -> bool:
        return self.num_stages - 1 in self.stages_of(pp_rank)
