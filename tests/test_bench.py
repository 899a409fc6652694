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
    rows = json_lines("moe_layer.py", "--layouts", "1,2,2 2,1,1", "--hidden", "32", "--ffn", "64", "--tokens", "64",
                      "--iters", "1", "--warmup", "0")
    keys = {"tp", "ep", "dp", "topk", "impl", "dtd", "a2a_bytes_per_rank", "tp_allgather_bytes_per_rank",
            "tp_reduce_scatter_bytes_per_rank", "ms_fwd_bwd", "ms_expert_gemms"}
    assert all(keys <= set(r) for r in rows)
    impls = {(r["tp"], r["ep"], r["impl"], r["dtd"]) for r in rows}
    assert impls == {(1, 2, "ours", False), (1, 2, "deepspeed", False), (2, 1, "ours", True), (2, 1, "ours", False),
                     (2, 1, "deepspeed", False)}
    ours, ds = (next(r for r in rows if r["ep"] == 2 and r["impl"] == i) for i in ("ours", "deepspeed"))
    assert ours["a2a_bytes_per_rank"] == ds["a2a_bytes_per_rank"] > 0  # the same capacity buffers


def test_optimizations_bench_json():
    rows = json_lines("optimizations.py", "--tp", "1", "--ep", "2", "--dp", "2", "--layers", "2", "--hidden", "32",
                      "--ffn", "64", "--experts", "4", "--vocab", "128", "--seq", "16", "--micro-batch", "2",
                      "--steps", "1", "--tile", "1000", "--configs", "baseline,recompute,recompute+cac,zero1,tiled,all")
    assert [r["config"] for r in rows] == ["baseline", "recompute", "recompute+cac", "zero1", "tiled", "all"]
    for r in rows:
        assert {"config", "a2a_per_moe_layer_per_step", "optimizer_state_bytes_per_rank",
                "optimizer_step_peak_extra_bytes", "peak_bytes", "ms_step"} <= set(r)
    a2a = {r["config"]: r["a2a_per_moe_layer_per_step"] for r in rows}
    assert (a2a["baseline"], a2a["recompute"], a2a["recompute+cac"]) == (4, 6, 4)
    state = {r["config"]: r["optimizer_state_bytes_per_rank"] for r in rows}
    assert state["zero1"] < state["baseline"]
