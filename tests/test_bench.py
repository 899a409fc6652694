"""The benchmark scripts run and print the JSON Lines keys the issues name (tiny sizes; no timing
is checked here: performance claims live in the benchmarks' own output)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def json_lines(script: str, *args) -> list[dict]:
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--json", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_moe_layer_bench_json():
    rows = json_lines("moe_layer.py", "--layouts", "1,2,2 2,2,2", "--hidden", "32", "--ffn", "64",
                      "--tokens", "64", "--iters", "2", "--warmup", "0")
    keys = {"impl", "tp", "ep", "dp", "topk", "capacity_factor", "pad_free", "skew", "ms_fwd_bwd",
            "ms_expert_gemms", "a2a_bytes_per_rank"}
    assert all(keys <= set(r) for r in rows)
    # every case of a plain run: cf 1.0, 1.25, 2.0 and no-drop (capacity_factor null), skew off and
    # on, and the three implementations (DeepSpeed's does not run with TP > 1: its row says so)
    cases = {(r["tp"], r["ep"], r["capacity_factor"], r["skew"], r["impl"], r["pad_free"])
             for r in rows}
    assert cases == {(tp, ep, cf, skew, impl, pf) for tp, ep in ((1, 2), (2, 2))
                     for cf in (1.0, 1.25, 2.0, None) for skew in (False, True)
                     for impl, pf in (("ours", False), ("ours", True), ("deepspeed", False))}
    assert all(r["ms_fwd_bwd"] is None for r in rows if r["impl"] == "deepspeed" and r["tp"] > 1)
    for r in rows:
        if r["ms_fwd_bwd"] is not None:  # a spread over the interleaved repetitions
            assert r["ms_fwd_bwd_min"] <= r["ms_fwd_bwd"] <= r["ms_fwd_bwd_max"] and r["reps"] == 2
        if r["impl"] == "ours":  # router + dispatch + combine timed alone (the experts an identity)
            assert 0 < r["ms_router_dispatch_combine"] and r["router_dispatch_combine_vs_gemms"] > 0
    by = {(r["ep"], r["capacity_factor"], r["skew"], r["impl"], r["pad_free"]): r for r in rows
          if r["tp"] == 1}
    for cf in (1.0, 1.25, 2.0, None):
        for skew in (False, True):
            padded, packed, ds = (by[(2, cf, skew, impl, pf)] for impl, pf in
                                  (("ours", False), ("ours", True), ("deepspeed", False)))
            # the same capacity buffers
            assert padded["a2a_bytes_per_rank"] == ds["a2a_bytes_per_rank"] > 0
            # only kept tokens
            assert 0 < packed["a2a_bytes_per_rank"] <= padded["a2a_bytes_per_rank"]
            assert packed["expert_rows"] <= padded["expert_rows"] and "ratio_vs_deepspeed" in packed
    # DTD on and off side by side at TP 2: the padded all-to-all carries exactly 1/TP the bytes
    tp2 = {(r["capacity_factor"], r["skew"], r["pad_free"], r["dtd"]): r for r in rows
           if r["tp"] == 2 and r["impl"] == "ours"}
    assert len(tp2) == 4 * 2 * 2 * 2 and all("dtd" in r for r in rows)
    for cf in (1.0, 1.25, 2.0, None):
        for skew in (False, True):
            on, off = tp2[(cf, skew, False, True)], tp2[(cf, skew, False, False)]
            assert off["a2a_bytes_per_rank"] == 2 * on["a2a_bytes_per_rank"] > 0
            assert off["ms_fwd_bwd"] > 0 and "ratio_vs_padded" in tp2[(cf, skew, True, False)]
            free_on, free_off = tp2[(cf, skew, True, True)], tp2[(cf, skew, True, False)]
            assert 0 < free_on["a2a_bytes_per_rank"] < free_off["a2a_bytes_per_rank"]
    skewed, plain = by[(2, None, True, "ours", False)], by[(2, None, False, "ours", False)]
    # no-drop pads every expert to the skewed one
    assert skewed["expert_rows"] > plain["expert_rows"]


def test_group_limited_rows_send_one_row_per_destination():
    """Top-4 of 8 experts in one of 2 groups (the EP ranks): a token reaches one EP rank, and the
    padding-free path sends it there once; the same routing sent per assignment carries ~4x."""
    rows = json_lines("moe_layer.py", "--layouts", "1,2,2", "--group-limited", "1", "--hidden",
                      "32", "--ffn", "64", "--tokens", "64", "--topk", "4", "--iters", "1",
                      "--warmup", "0", "--capacity-factors", "none", "--skew", "off")
    by = {(r["routing"], r["pad_free"], r["row_per"]): r for r in rows}
    once = by[("group-limited g=1", True, "(token, EP rank)")]
    each = by[("group-limited g=1", True, "(token, expert)")]
    assert once["max_ep_ranks_per_token"] == 1
    assert 0 < once["a2a_bytes_per_rank"] < 0.4 * each["a2a_bytes_per_rank"]
    assert by[("unlimited", True, "(token, expert)")]["max_ep_ranks_per_token"] == 2


def test_expert_grid_bench_json():
    rows = json_lines("expert_grid.py", "--hidden", "32", "--seq", "32", "--experts", "8",
                      "--reps", "1")
    assert [r["layout"] for r in rows] == ["etp=tp", "etp=tp sp", "etp1 ep=tp", "etp1 ep=tp sp"]
    keys = {"tp", "etp", "ep", "sp", "ms", "ms_min", "ms_max", "ratio", "a2a_bytes_per_rank"}
    assert all(keys <= set(r) for r in rows)
    by = {r["layout"]: r for r in rows}
    # experts split over TP: no all-to-all at EP 1; with their own grid (EP over the TP ranks),
    # each rank sends its own tokens and no TP gather or reduce-scatter of expert rows remains
    assert by["etp=tp"]["a2a_bytes_per_rank"] == 0 < by["etp1 ep=tp"]["a2a_bytes_per_rank"]
    assert by["etp1 ep=tp sp"]["other_bytes_per_rank"] < by["etp=tp sp"]["other_bytes_per_rank"]


def test_context_parallel_bench_json():
    rows = json_lines("context_parallel.py", "--seq", "32", "--hidden", "32", "--heads", "4",
                      "--vocab", "64", "--reps", "1")
    assert [r["layout"] for r in rows] == ["dp", "cp"]
    keys = {"cp", "dp", "tokens_per_rank", "ms", "ms_per_1k_tokens", "ratio", "bytes_per_rank"}
    assert all(keys <= set(r) for r in rows)
    dp, cp = rows
    assert (dp["tokens_per_rank"], cp["tokens_per_rank"]) == (32, 16)
    # keys and values gathered over CP forward, their gradients reduce-scattered backward
    assert cp["bytes_per_rank"]["all_gather cp"] > 0 < cp["bytes_per_rank"]["reduce_scatter cp"]
    assert not any(" cp" in k for k in dp["bytes_per_rank"])


def test_optimizations_bench_json():
    rows = json_lines("optimizations.py", "--tp", "1", "--ep", "2", "--dp", "2", "--layers", "2",
                      "--hidden", "32", "--ffn", "64", "--experts", "4", "--vocab", "128",
                      "--seq", "16", "--micro-batch", "2", "--steps", "1", "--tile", "1000",
                      "--configs", "baseline,recompute,recompute+cac,zero1,tiled,all")
    assert [r["config"] for r in rows] == ["baseline", "recompute", "recompute+cac", "zero1",
                                           "tiled", "all"]
    for r in rows:
        assert {"config", "a2a_per_moe_layer_per_step", "optimizer_state_bytes_per_rank",
                "optimizer_step_peak_extra_bytes", "peak_bytes", "ms_step"} <= set(r)
    a2a = {r["config"]: r["a2a_per_moe_layer_per_step"] for r in rows}
    assert (a2a["baseline"], a2a["recompute"], a2a["recompute+cac"]) == (4, 6, 4)
    state = {r["config"]: r["optimizer_state_bytes_per_rank"] for r in rows}
    assert state["zero1"] < state["baseline"]
