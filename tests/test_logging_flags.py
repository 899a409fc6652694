"""Megatron-LM's logging, checkpoint and run-time flags (issue 23, item 1), each with its meaning:
the parameters' norm and the gradients' zeros counted once at every layout, the timer block, the
throughput fragment with Megatron's FLOP count, Weights & Biases offline files, memory scalars,
--dist-ckpt-strictness, --manual-gc, --no-mmap-bin-files, --deterministic-mode, and the
switches accepted with a notice.
"""

import gc
import glob
import json
import logging
import math
import os
import re
import struct

import numpy
import pytest
import torch

from harness import run
from megatron.checkpoint import CheckpointError, read_stored_tensors
from megatron.cli.arguments import parse_args
from megatron.cli.configs import ConfigError, build_config
from megatron.training.log import flops_per_iteration
from test_training import MODEL, MOE, logged, pretrain_case

SHORT = ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
         "--eval-interval", "100"]
# No biases: a key bias's gradient is zero in exact arithmetic (softmax ignores a constant added
# to a row of scores), so in floating point it is rounding noise that a layout may or may not
# round to exactly 0.
WATCH = ["--log-params-norm", "--log-num-zeros-in-grad", "--disable-bias-linear"]


def numbers(printed: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"\| {key}: ([-+0-9.E]+) \|", printed)]


# ---- norms and zeros, counted once over TP / EP / DP / PP ---------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, with a final checkpoint: the norm recomputed from the stored fp32 weights is
    an independent reference for the last params norm."""
    save = str(tmp_path_factory.mktemp("ref") / "ckpt")
    out = pretrain_case(MODEL + MOE + SHORT + WATCH + ["--save", save])
    stored = read_stored_tensors(save)
    out["stored_norm"] = math.sqrt(sum(float(t.double().pow(2).sum()) for t in stored.values()))
    return out


def test_params_norm_equals_the_stored_weights_norm(reference):
    norms = numbers(reference["printed"], "params norm")
    assert len(norms) == 3 and norms[0] != norms[-1]
    assert norms[-1] == pytest.approx(reference["stored_norm"], rel=2e-6, abs=1e-3)
    zeros = numbers(reference["printed"], "num zeros")
    params = int(re.search(r"([\d,]+) parameters on rank 0", reference["printed"])[1]
                 .replace(",", ""))
    # 120 ids: the rows of ids the mock batches never hold get zero gradients, not all others
    assert len(zeros) == 3 and all(0 < z < params for z in zeros), (zeros, params)


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
     "--use-distributed-optimizer"],
], ids=["tp2-ep2-dp2", "pp2-ep2-dp2-zero1"])
def test_norm_and_zeros_equal_one_process(reference, layout):
    got = run(4, pretrain_case, MODEL + MOE + SHORT + WATCH + layout)[0]["printed"]
    want = reference["printed"]
    assert numbers(got, "params norm") == pytest.approx(numbers(want, "params norm"), rel=1e-5)
    assert numbers(got, "num zeros") == numbers(want, "num zeros")
    assert numbers(got, "lm loss") == pytest.approx(numbers(want, "lm loss"), rel=1e-5)


# ---- timers -------------------------------------------------------------------------------------
def timer_block(printed: str) -> dict:
    """{timer: (min, max)} from Megatron's '(min, max) time across ranks (ms):' blocks (last)."""
    found = {}
    for name, lo, hi in re.findall(r"\n    ([a-z-]+) \.+: \(([0-9.]+), ([0-9.]+)\)", printed):
        found[name] = (float(lo), float(hi))
    return found


def test_timing_levels_and_options():
    flags = MODEL + MOE + SHORT
    # at PP 2 the model's hooks sit on the pipeline's stage chunks
    level2 = run(2, pretrain_case, flags + ["--timing-log-level", "2",
                                            "--pipeline-model-parallel-size", "2"])[0]["printed"]
    assert level2.count("(min, max) time across ranks (ms):") == 3
    timers = timer_block(level2)
    assert set(timers) == {"forward-backward", "forward-compute", "backward-compute",
                           "batch-generator", "all-grads-sync", "optimizer"}, timers
    for name in ("forward-compute", "backward-compute", "all-grads-sync"):
        assert 0 < timers[name][0] <= timers[name][1] < timers["forward-backward"][1], timers
    level1 = pretrain_case(flags + ["--timing-log-level", "1", "--log-num-zeros-in-grad"])
    assert set(timer_block(level1["printed"])) == {"forward-backward", "all-grads-sync",
                                                   "optimizer-count-zeros", "optimizer"}
    assert "time across ranks" not in pretrain_case(flags)["printed"]  # level 0
    as_max = pretrain_case(flags + ["--timing-log-level", "1", "--timing-log-option", "max"])
    assert re.search(r"max time across ranks \(ms\):\n    forward-backward \.+: [0-9.]+\n",
                     as_max["printed"])
    every = pretrain_case(flags + ["--timing-log-level", "1", "--timing-log-option", "all"])
    assert re.search(r"times across ranks \(ms\):\n  forward-backward:\n     rank  0: [0-9.]+",
                     every["printed"])


# ---- throughput ---------------------------------------------------------------------------------
def megatron_flops(layers, moe_layers, h, heads, groups, kv, s, ffn, moe_ffn, topk, vocab, batch,
                   swiglu):
    """Megatron-LM's num_floating_point_operations (transformer_flops, no MLA / MTP), written out
    from its terms."""
    q, k = kv * heads, kv * groups
    attention = 3 * 2 * (h * (q + 2 * k) + q * s / 2 * 2 + q * h)
    glu = 3 if swiglu else 2
    mlp = 3 * 2 * h * (ffn * glu * (layers - moe_layers) + moe_ffn * topk * glu * moe_layers)
    return batch * s * (mlp + attention * layers + 3 * 2 * h * vocab)


@pytest.mark.parametrize("extra,swiglu", [
    ([], False),
    (["--swiglu", "--group-query-attention", "--num-query-groups", "2",
      "--moe-ffn-hidden-size", "48", "--recompute-granularity", "full",
      "--recompute-method", "uniform"], True),
])
def test_megatron_flop_count(extra, swiglu):
    args = parse_args(MODEL + MOE + SHORT + extra)
    cfg = build_config(args, 1, 121)  # 121 ids pad to 128
    groups = 2 if extra else 4
    want = megatron_flops(2, 1, 32, 4, groups, 8, 16, 64, 48 if extra else 64, 2, 128, 8, swiglu)
    assert flops_per_iteration(cfg, megatron=True) == pytest.approx(want, rel=1e-12)


# ---- Weights & Biases ---------------------------------------------------------------------------
def wandb_records(path: str):
    """The records of a .wandb file (a LevelDB-style log of 32 KiB blocks, each record a 7-byte
    header: crc32, length, type FULL/FIRST/MIDDLE/LAST, then a protobuf Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = open(path, "rb").read(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_throughput_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    """One run: Megatron's throughput fragment; TensorBoard's throughput, params-norm, num-zeros
    and memory scalars; the same scalars in the Weights & Biases run files, written offline
    under --wandb-save-dir (no API key here)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    save_dir, tb = tmp_path / "wb", str(tmp_path / "tb")
    out = pretrain_case(MODEL + MOE + SHORT + WATCH + [
        "--log-throughput", "--tensorboard-dir", tb, "--log-timers-to-tensorboard",
        "--log-memory-to-tensorboard",
        "--wandb-project", "ted-tests", "--wandb-exp-name", "flags", "--wandb-entity", "me",
        "--wandb-save-dir", str(save_dir)])["printed"]
    # Megatron-LM's fragment, right after the elapsed time, as its scripts parse it
    assert len(re.findall(r"\| elapsed time per iteration \(ms\): [0-9.]+ \| throughput per GPU "
                          r"\(TFLOP/s/GPU\): [0-9]+\.[0-9] \| learning rate:", out)) == 3
    events = EventAccumulator(tb)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"throughput", "params-norm", "num-zeros", "mem-reserved-bytes",
            "mem-allocated-bytes", "mem-max-allocated-bytes"} <= tags, tags
    flops = flops_per_iteration(build_config(parse_args(MODEL + MOE + SHORT), 1, 121),
                                megatron=True)
    for tp, it in zip(events.Scalars("throughput"), events.Scalars("iteration-time")):
        assert tp.value == pytest.approx(flops / (it.value / 1000.0) / 1e12, rel=1e-4)
    assert [e.value for e in events.Scalars("params-norm")] == pytest.approx(
        numbers(out, "params norm"), abs=1e-3)
    assert [e.value for e in events.Scalars("num-zeros")] == numbers(out, "num zeros")
    assert "wandb: offline" in out
    files = glob.glob(str(save_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, os.listdir(save_dir)
    history, runs = {}, []
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            history[record.history.step.num] = items
        elif kind == "run":
            runs.append(record.run)
    assert runs and runs[0].project == "ted-tests" and runs[0].display_name == "flags"
    assert runs[0].entity == "me"
    steps = sorted(history)
    assert steps == [1, 2, 3]
    assert [history[s]["lm-loss"] for s in steps] == pytest.approx(logged(out, "lm loss"),
                                                                   rel=1e-6)
    assert [history[s]["params-norm"] for s in steps] == pytest.approx(
        numbers(out, "params norm"), abs=1e-3)
    assert all("learning-rate" in history[s] and "grad-norm" in history[s] for s in steps)


# ---- --dist-ckpt-strictness ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A checkpoint of the tied model at iteration 2 of 3 (no output layer stored)."""
    save = str(tmp_path_factory.mktemp("tied") / "ckpt")
    pretrain_case(MODEL + MOE + SHORT + ["--exit-interval", "2", "--save", save])
    return save


def resume(checkpoint: str, *flags):
    return pretrain_case(MODEL + MOE + SHORT + ["--load", checkpoint, *flags])


def test_strictness_unexpected_tensor(tied_checkpoint):
    """The untied model has output.weight, the checkpoint does not ('unexpected')."""
    untied = "--untie-embeddings-and-output-weights"
    with pytest.raises(CheckpointError, match=r"holds no tensor '[a-z_]+.output.weight'"):
        resume(tied_checkpoint, untied)  # assume_ok_unexpected: the load itself fails
    with pytest.raises(CheckpointError, match=r"does not match the model \(--dist-ckpt-"
                       r"strictness raise_unexpected\): the model has tensors it lacks: "
                       r"exp_avg.output.weight, exp_avg_sq.output.weight, "
                       r"model.output.weight\."):
        resume(tied_checkpoint, untied, "--dist-ckpt-strictness", "raise_unexpected")
    out = resume(tied_checkpoint, untied, "--dist-ckpt-strictness", "log_unexpected")["printed"]
    assert "lacks 3 tensors of the model (they keep their initial values)" in out
    assert "iteration        3/       3" in out and len(logged(out, "lm loss")) == 1


def test_strictness_missing_tensor(tmp_path):
    """The tied model lacks the untied checkpoint's output.weight ('missing')."""
    save = str(tmp_path / "untied")
    pretrain_case(MODEL + MOE + SHORT + ["--exit-interval", "2", "--save", save,
                                         "--untie-embeddings-and-output-weights"])
    assert len(logged(resume(save)["printed"], "lm loss")) == 1  # the default reads the rest
    with pytest.raises(CheckpointError, match="it holds tensors the model lacks: "
                       "exp_avg.output.weight"):
        resume(save, "--dist-ckpt-strictness", "raise_all")
    out = resume(save, "--dist-ckpt-strictness", "log_all", "--no-load-optim")["printed"]
    assert "holds 1 tensors the model does not use (not read): model.output.weight" in out
    assert "> loaded" in out


def test_strictness_agrees_on_every_rank(tied_checkpoint):
    """At EP 2 each rank asks for different experts: the check is over the union, and every
    rank raises (or loads) alike."""
    flags = ["--expert-model-parallel-size", "2", "--dist-ckpt-strictness", "raise_all"]
    out = run(2, resume, tied_checkpoint, *flags)[0]["printed"]
    assert "> loaded" in out and len(logged(out, "lm loss")) == 1


# ---- run time -----------------------------------------------------------------------------------
def test_manual_gc(monkeypatch):
    calls = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(gc.isenabled()) or collect(*a))
    flags = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
             "--eval-interval", "3", "--eval-iters", "1"]
    assert gc.isenabled()
    pretrain_case(MODEL + MOE + flags + ["--manual-gc", "--manual-gc-interval", "2"])
    # once at the start, iterations 2 and 4, before and after the evaluation at 3; never enabled
    assert calls == [False] * 5 and gc.isenabled()
    calls.clear()
    pretrain_case(MODEL + MOE + flags + ["--manual-gc", "--no-manual-gc-eval"])
    assert calls == [False]  # interval 0: only the first


def test_deterministic_mode_and_logging_level(reference, tmp_path):
    """On CPU the flag changes nothing: the run equals the reference run bit for bit."""
    flags = MODEL + MOE + SHORT + WATCH + ["--save", str(tmp_path / "ckpt"),
                                           "--deterministic-mode", "--logging-level", "WARNING"]
    again = pretrain_case(flags)
    assert "CPU runs are bitwise reproducible already" in again["printed"]
    assert again["history"]["lm_loss"] == reference["history"]["lm_loss"]  # bit for bit
    assert logging.getLogger().level == logging.WARNING
    logging.getLogger().setLevel(logging.NOTSET)
    assert parse_args(MODEL + ["--micro-batch-size", "1", "--logging-level", "10"]).logging_level \
        == 10


def test_no_mmap_bin_files_reads_the_same_samples(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _FileBinReader
    from megatron.data.datasets import build_train_valid_test_datasets
    from megatron.data.tokenizer import build_tokenizer

    builder = IndexedDatasetBuilder(str(tmp_path / "c.bin"), dtype=numpy.uint16)
    rng = numpy.random.default_rng(0)
    for _ in range(30):
        doc = list(rng.integers(1, 500, rng.integers(5, 40))) + [500]
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(tmp_path / "c.idx"))
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=500)

    def build(mmap):
        return build_train_valid_test_datasets(
            data_path=[str(tmp_path / "c")], split="1,0,0", mock=False, seq_length=16, seed=1,
            tokenizer=tokenizer, num_samples=(20, 0, 0), cache_dir=str(tmp_path / "cache"),
            mmap_bin_files=mmap)[0]

    mapped, read = build(True), build(False)
    assert isinstance(read.dataset.bin_reader, _FileBinReader)
    assert not isinstance(mapped.dataset.bin_reader, _FileBinReader)
    for i in range(len(mapped)):
        assert torch.equal(mapped[i]["tokens"], read[i]["tokens"])
    argv = MODEL + SHORT + ["--no-mmap-bin-files"]
    assert build_config(parse_args(argv), 1, 121).data.mmap_bin_files is False


# ---- the command line ---------------------------------------------------------------------------
def test_flags_are_accepted_with_one_notice_each():
    argv = MODEL + MOE + SHORT + [
        "--attention-backend", "flash", "--moe-permute-fusion", "--use-persistent-ckpt-worker",
        "--ckpt-fully-parallel-save", "--no-ckpt-fully-parallel-save",
        "--ckpt-fully-parallel-load", "--auto-detect-ckpt-format", "--deterministic-mode",
        "--dist-ckpt-strictness", "log_all", "--timing-log-level", "2"]
    args = parse_args(argv)
    notices = args.notices
    assert sum("--moe-permute-fusion" in n for n in notices) == 1
    assert sum(n.startswith("--attention-backend flash") for n in notices) == 1
    assert sum(n.startswith("--use-persistent-ckpt-worker --ckpt-fully-parallel-save "
                            "--no-ckpt-fully-parallel-save --ckpt-fully-parallel-load "
                            "--auto-detect-ckpt-format: accepted") for n in notices) == 1
    cfg = build_config(args, 1, 121)
    assert cfg.checkpoint.strictness == "log_all" and cfg.runtime.deterministic_mode
    assert cfg.log.timing_log_level == 2
    assert len(parse_args(MODEL + MOE + SHORT).notices) == 0


@pytest.mark.parametrize("flags,message", [
    (["--ckpt-format", "fsdp_dtensor"], "--ckpt-format fsdp_dtensor is Megatron-FSDP's format"),
    (["--timing-log-level", "3"], "--timing-log-level: invalid choice"),
    (["--dist-ckpt-strictness", "strict"], "--dist-ckpt-strictness: invalid choice"),
    (["--logging-level", "LOUD"], "LOUD is neither an int nor a level name"),
    (["--attention-backend", "triton"], "--attention-backend: invalid choice"),
])
def test_bad_values_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(MODEL + ["--micro-batch-size", "1"] + flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--wandb-project", "p"], "--wandb-project needs --wandb-exp-name NAME"),
    (["--manual-gc-interval", "-1"], "--manual-gc-interval must be >= 0"),
])
def test_bad_combinations_are_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(parse_args(MODEL + SHORT + flags), 1, 121)
