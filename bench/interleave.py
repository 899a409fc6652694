"""What the side-by-side benchmarks share: repetitions interleaved over the cases (the order
rotates, so drift on a shared machine hits every case alike and none always runs after the same
one), the spread of a row and of its ratio to a baseline, and the JSON Lines / table output."""

from __future__ import annotations

import json
import statistics


def interleaved(names: list[str], step, reps: int, warmup: int = 1):
    """Run `step(name)` -> (seconds, extra) for every name, `warmup` rounds untimed then `reps`
    rounds in rotating order: ({name: [ms per repetition]}, {name: the last extra})."""
    for _ in range(warmup):
        for name in names:
            step(name)
    times, extra = {n: [] for n in names}, {}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            took, extra[name] = step(name)
            times[name].append(took * 1e3)
    return times, extra


def spread(values: list[float], base: list[float] | None = None, key: str = "ms") -> dict:
    """The median, min and max of `values` under `key`; with `base` (the baseline's values of the
    same repetitions) the median and range of the per-repetition ratios too."""
    out = {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}
    if base is not None:
        ratios = [a / b for a, b in zip(values, base)]
        out.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return out


def report(rows: list[dict], as_json: bool, title: str, table) -> None:
    """JSON Lines (one object per row), or the title and `table(rows)`."""
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(title)
        print(table(rows))
