"""One cache for the planner's per-layout tables. A search plans hundreds of layouts and asks for
each one's parameter table, flat groups, stages and collectives several times over. Configs are
frozen, but hashing one (nested dataclasses) costs about as much as building a small table, so
entries are keyed by the Config object's identity (held by the entry, so the id stays its own)
and the other arguments."""

from __future__ import annotations

import functools

_LIMIT = 8192  # entries per function; the cache is emptied when full


def per_config(fn):
    """Cache `fn(cfg, *args)` by the identity of `cfg` and the (hashable) other arguments.
    Callers must not mutate what it returns."""
    entries: dict = {}

    @functools.wraps(fn)
    def cached(cfg, *args):
        key = (id(cfg), *args)
        hit = entries.get(key)
        if hit is not None and hit[0] is cfg:
            return hit[1]
        if len(entries) >= _LIMIT:
            entries.clear()
        value = fn(cfg, *args)
        entries[key] = (cfg, value)
        return value

    cached.cache_clear = entries.clear
    return cached
