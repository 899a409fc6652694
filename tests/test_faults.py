"""Faults, tried as a user meets them: bad input (one line, printed once, exit 2, before any
collective), the tools' errors, a rank that never joins, a rank killed mid-run, a killed
launcher, and resident memory over a few hundred iterations. The kill tests use real processes
and real signals; the figures they measure are printed (pytest -s shows them)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy
import psutil
import pytest
import torch

import pretrain_gpt_moe
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.data import datasets as data
from megatron.launch import faults
from procs import ROOT, SCRIPT, TINY, Proc, alive, family, launch_world, quiet_env, rss_kib
from tools import _cli, preprocess_data, train_tokenizer

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --train-iters 2 --lr 1e-3 --vocab-size 120").split()
ITERATION = r"iteration\s+{}/"


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                 "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def load_fails(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        pretrain_gpt_moe.load_config(argv)
    return exit_info.value.code, capsys.readouterr().err


def write_prefix(path, docs, dtype=numpy.uint16) -> str:
    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(path) + ".idx")
    return str(path)


# ---- bad input: one line, once, exit 2 -----------------------------------------------------------
def test_token_ids_beyond_the_vocabulary_are_one_error_checked_once_per_file(
        tmp_path, capsys, one_process):
    prefix = write_prefix(tmp_path / "wide_text_document",
                          [list(range(i, i + 40)) for i in range(0, 200, 10)])
    argv = BASE + ["--tokenizer-type", "NullTokenizer", "--data-path", prefix, "--split", "1,0,0"]
    status, err = load_fails(argv, capsys)  # ids up to 229 against NullTokenizer(120): 121 ids
    assert status == 2 and err == (
        f"pretrain_gpt_moe.py: error: {prefix}.bin holds token id 229 but the tokenizer has 121 "
        "ids (0..120): the data was preprocessed with another tokenizer; give that tokenizer's "
        "--tokenizer-model / --vocab-file / --vocab-size, or preprocess again with this one\n")
    # chunked: same answer
    assert data._scan_range(prefix + ".bin", numpy.uint16, chunk=7) == (0, 229)
    # the scan's result is kept beside the data: the next start reads it instead of the tokens
    one_process.setattr(data, "_scan_range", lambda *a: pytest.fail("scanned again"))
    assert load_fails(argv, capsys)[0] == 2
    pretrain_gpt_moe.load_config(argv + ["--vocab-size", "300"])  # a tokenizer that fits: fine


def test_bad_paths_say_what_is_wrong(tmp_path, capsys, one_process):
    prefix = write_prefix(tmp_path / "ok_text_document", [list(range(50))] * 30)
    data_argv = BASE + ["--tokenizer-type", "NullTokenizer", "--split", "1,0,0", "--data-path"]
    cases = [
        (data_argv + [str(tmp_path)],
         f"--data-path {tmp_path} is a directory; give the prefix of a .bin/.idx pair in "
         f"it, e.g. {prefix}"),
        (data_argv + [prefix + ".bin"],
         f"--data-path {prefix}.bin: give the prefix without .bin ({prefix})"),
        (data_argv + [prefix + "_nope"],
         f"{prefix}_nope.idx not found (data prefix '{prefix}_nope'): give the "
         "prefix of a .bin/.idx pair tools/preprocess_data.py wrote"),
        (BASE + ["--mock-data", "--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", str(tmp_path)],
         f"--tokenizer-model {tmp_path} is a directory; give the file itself"),
        (BASE + ["--mock-data", "--tokenizer-type", "GPT2BPETokenizer",
                 "--vocab-file", str(tmp_path / "v.json"), "--merge-file", prefix + ".bin"],
         f"--vocab-file {tmp_path / 'v.json'}: file not found"),
    ]
    for argv, expect in cases:
        status, err = load_fails(argv, capsys)
        assert status == 2 and err == f"pretrain_gpt_moe.py: error: {expect}\n", argv


def test_an_unreadable_data_file_is_named():
    # under /tmp: other users may enter it, unlike tmp_path
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        prefix = write_prefix(os.path.join(folder, "locked_text_document"), [list(range(50))] * 30)
        os.chmod(prefix + ".bin", 0)
        assert as_other_user(data.check_indexed_dataset, prefix) == (
            f"ValueError: {prefix}.bin cannot be read (Permission denied): fix its permissions "
            "or give another file")
        os.chmod(folder, 0o700)
        assert as_other_user(data.check_indexed_dataset, prefix).startswith(
            f"ValueError: {prefix}.idx cannot be reached (Permission denied)")


def as_other_user(fn, *args) -> str:
    """fn(*args) in a forked child as user nobody (root reads anything): its error, or 'no
    error'."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn(*args)
            message = "no error"
        except BaseException as e:  # noqa: BLE001 (whatever it is goes to the parent)
            message = f"{type(e).__name__}: {e}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    message = os.read(read, 65536).decode()
    os.close(read)
    return message


def test_launcher_variables_errors_are_printed_once(capsys, one_process):
    argv = BASE + ["--mock-data"]
    one_process.setenv("WORLD_SIZE", "4")
    for rank, printed in (("0", True), ("2", False)):
        one_process.setenv("RANK", rank)
        status, err = load_fails(argv, capsys)  # every rank lacks MASTER_ADDR: rank 0 says so
        assert status == 2 and (err.startswith("pretrain_gpt_moe.py: error: MASTER_ADDR and "
                                               "MASTER_PORT must be set for 4 ranks")
                                if printed else err == ""), err
    one_process.setenv("RANK", "5")  # only this process is wrong: it says so itself
    status, err = load_fails(argv, capsys)
    assert (status == 2 and err.startswith("pretrain_gpt_moe.py: error (rank 5 on ")
            and "in 0..3" in err), err
    one_process.delenv("RANK")
    status, err = load_fails(argv, capsys)
    assert status == 2 and "WORLD_SIZE is set but RANK is not" in err and err.count("\n") == 1, err


def test_plain_python_with_a_layout_above_1_is_told_to_use_torchrun(capsys, one_process):
    status, err = load_fails(BASE + ["--mock-data", "--tensor-model-parallel-size", "2",
                                     "--num-experts", "4", "--expert-model-parallel-size", "2"],
                             capsys)
    assert status == 2 and err.startswith("pretrain_gpt_moe.py: error: world size 1 is not "
                                          "divisible by --tensor-model-parallel-size 2"), err
    assert "launch the layout's 4 ranks: torchrun --nproc-per-node 4" in err, err


def test_a_binary_vocab_file_suggests_the_sentencepiece_tokenizer(tmp_path, capsys, one_process):
    model = tmp_path / "spm.model"
    model.write_bytes(b"\n\x80\xff\x01 sentencepiece-like protobuf bytes")
    status, err = load_fails(BASE + ["--mock-data", "--tokenizer-type", "GPT2BPETokenizer",
                                     "--vocab-file", str(model), "--merge-file", str(model)],
                             capsys)
    assert status == 2 and (f"--vocab-file {model} is not a JSON vocabulary" in err
                            and "--tokenizer-type SentencePieceTokenizer --tokenizer-model "
                                f"{model}" in err), err


def test_no_cuda_warning_on_a_cpu_run_under_torchrun(tmp_path):
    """megatron-core asks each rank for CUDA_DEVICE_MAX_CONNECTIONS=1 (CUDA stream order): not on
    a CPU, where the README's torchrun example runs without the quickstart's warning filters."""
    env = {k: v for k, v in quiet_env().items()
           if k not in ("PYTHONWARNINGS", "CUDA_DEVICE_MAX_CONNECTIONS")}
    done = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", SCRIPT, *TINY,
                           "--tensor-model-parallel-size", "2", "--train-iters", "2"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in done.stderr, done.stderr[-3000:]


def test_a_torchrun_launch_with_a_bad_flag_prints_our_line_first_and_once(tmp_path):
    done = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", SCRIPT, *BASE,
                           "--mock-data", "--no-such-flag"], env=quiet_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.splitlines()
    assert lines[0] == ("pretrain_gpt_moe.py: error: unrecognized arguments: --no-such-flag; "
                        "see --help"), lines[:3]
    assert sum("pretrain_gpt_moe.py" in line and "error" in line
               for line in lines) == 1, done.stderr
    assert "exitcode: 2" in done.stderr and done.returncode == 1  # torchrun's own status is 1


# ---- the tools ----------------------------------------------------------------------------------
def test_train_tokenizer_reports_a_vocabulary_too_large_in_one_line(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"hello world number {i}"}) + "\n"
                              for i in range(5)))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"),
                           "--input", str(corpus),
                           "--model-prefix", str(tmp_path / "spm"), "--vocab-size", "1000"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == (
        "train_tokenizer.py: error: --vocab-size 1000 is too high for this corpus: sentencepiece "
        "can make at most 316 pieces of it; use --vocab-size 316 or less, or a larger "
        "--input\n"), done.stderr


@pytest.mark.parametrize("tool,argv,expect", [
    (train_tokenizer, ["--input", "{tmp}/none.jsonl", "--model-prefix", "{tmp}/m"],
     "--input {tmp}/none.jsonl: file not found"),
    (train_tokenizer, ["--input", "{tmp}", "--model-prefix", "{tmp}/m"],
     "--input {tmp} is a directory"),
    (train_tokenizer, ["--input", "{tmp}/bad.jsonl", "--model-prefix", "{tmp}/m"],
     "--input {tmp}/bad.jsonl line 1 is not JSON"),
    (train_tokenizer, ["--input", "{tmp}/ids.jsonl", "--model-prefix", "{tmp}/m",
                       "--vocab-size", "5"],
     "--vocab-size 5 is below the"),
    (train_tokenizer, ["--input", "{tmp}/ids.jsonl", "--model-prefix", "/proc/none/m"],
     "--model-prefix /proc/none/m: cannot create"),
    (train_tokenizer, ["--input", "{tmp}/ids.jsonl", "--model-prefix", "{tmp}/m", "--bogus"],
     "unrecognized arguments: --bogus; see --help"),
    (preprocess_data, ["--input", "{tmp}/ids.jsonl", "--output-prefix", "{tmp}/o",
                       "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"],
     "--input line 2: NullTokenizer: ids [500] outside [0, 11)"),
    (preprocess_data, ["--input", "{tmp}/ids.jsonl", "--output-prefix", "{tmp}/o",
                       "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{tmp}"],
     "--tokenizer-model {tmp} is a directory"),
    (preprocess_data, ["--input", "{tmp}/none.jsonl", "--output-prefix", "{tmp}/o",
                       "--tokenizer-type", "NullTokenizer"],
     "--input {tmp}/none.jsonl: file not found"),
])
def test_tool_errors_are_one_line(tool, argv, expect, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "ids.jsonl").write_text('{"text": "1 2 3"}\n{"text": "4 500"}\n')
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        _cli.run(tool.main, argv)
    err = capsys.readouterr().err
    assert (exit_info.value.code == 2 and err.count("\n") == 1
            and expect.format(tmp=tmp_path) in err), err
    # nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ids.jsonl"]


# ---- the join -----------------------------------------------------------------------------------
def test_a_missing_rank_is_named_at_once(tmp_path):
    """RANK=0 WORLD_SIZE=2 alone (it used to print nothing for minutes): within seconds rank 0 says
    which rank it waits for and how long it will (the timeout's own error: the next test)."""
    start = time.monotonic()
    rank0 = launch_world(2, TINY + ["--train-iters", "3"], tmp_path, ranks=[0])[0]
    try:
        rank0.wait_for(r"^pretrain_gpt_moe.py: note: rank 0 waits for ranks 1 to join "
                       r"\(1 of 2 here\); giving up in 9 min \d+ s "
                       r"\(--distributed-timeout-minutes\)\n", stream="err")
        noted = time.monotonic() - start
    finally:
        rank0.kill()
    print(f"\n[figure] a missing rank named {noted:.1f} s after rank 0 started "
          "(its imports included)")


def test_the_join_gives_up_cleanly_at_its_timeout():
    listener = faults.listen(0)
    port = listener.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(faults.LaunchError) as info:
        faults.gather_ranks(listener, 3, timeout_s=1.5)
    assert str(info.value).startswith("ranks 1-2 never joined within 2 s "
                                      "(--distributed-timeout-minutes)")
    assert info.value.status == 1 and time.monotonic() - start < 10
    with pytest.raises(faults.LaunchError) as info:  # nobody listens there any more
        faults.join_rank0("127.0.0.1", port, 2, 3, timeout_s=1.0)
    # rank 1 says it
    assert info.value.quiet and "rank 0 never came up at 127.0.0.1:" in str(info.value)


def test_ranks_that_disagree_on_the_world_are_refused():
    listener = faults.listen(0)
    port = listener.getsockname()[1]
    errors = []

    def client():
        try:
            faults.join_rank0("127.0.0.1", port, 1, 3, timeout_s=20)
        except faults.LaunchError as e:
            errors.append(e)

    thread = threading.Thread(target=client)
    thread.start()
    with pytest.raises(faults.LaunchError) as info:
        faults.gather_ranks(listener, 2, timeout_s=20)
    thread.join(timeout=20)
    assert (info.value.status == 2
            and "was started with WORLD_SIZE 3, rank 0 with 2" in str(info.value))
    assert errors and errors[0].quiet  # the client stops too, silently: rank 0 said why


# ---- a rank dies ---------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_stops_every_other_rank_within_seconds(victim, tmp_path):
    procs = launch_world(2, TINY + ["--tensor-model-parallel-size", "2", "--train-iters", "100000",
                                    "--log-interval", "5"], tmp_path)
    everyone = [p for proc in procs for p in family(proc.pid)]
    try:
        procs[0].wait_for(ITERATION.format(10))
        killed = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL)
        survivor = procs[1 - victim]
        status = survivor.popen.wait(timeout=60)
        seconds = time.monotonic() - killed
        gone_by = time.monotonic() + 30  # DataLoader workers check on their parent every 5 s
        while alive(everyone) and time.monotonic() < gone_by:
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()
    assert status == 1, survivor.err()
    lines = [line for line in survivor.err().splitlines() if "error" in line]
    assert lines == [f"pretrain_gpt_moe.py: error: rank {victim} (pid {procs[victim].pid} on "
                     f"{socket.gethostname()}) died or exited mid-run (its own output, if any, "
                     "says why); stopping the 1 other ranks"], lines
    assert seconds < 60 and alive(everyone) == []
    print(f"\n[figure] rank {victim} SIGKILLed: last other rank exited {seconds:.2f} s later")


def test_killing_torchrun_takes_its_workers_along(tmp_path):
    argv = ["torchrun", "--standalone", "--nproc-per-node", "2", SCRIPT, *TINY,
            "--train-iters", "100000", "--tensor-model-parallel-size", "2", "--log-interval", "5"]
    launcher, everyone = Proc(argv, quiet_env(), tmp_path, "torchrun"), []
    try:
        launcher.wait_for(ITERATION.format(5))
        ranks = psutil.Process(launcher.pid).children()
        everyone = family(launcher.pid)[1:]  # the ranks and their data-loader workers
        assert len(ranks) == 2, ranks
        killed = time.monotonic()
        # the launcher alone: its workers are in their own sessions
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.popen.wait()
        seconds = {}
        end = time.monotonic() + 30
        while alive(everyone) and time.monotonic() < end:
            if not alive(ranks):
                seconds.setdefault("ranks", time.monotonic() - killed)
            time.sleep(0.02)
        seconds.setdefault("ranks", time.monotonic() - killed)
        seconds["all"] = time.monotonic() - killed
        assert alive(everyone) == [], everyone
    finally:
        for p in alive(family(launcher.pid)) + alive(everyone):
            p.kill()
    assert seconds["ranks"] < 2, seconds  # the parent-death signal: at once
    print(f"\n[figure] torchrun SIGKILLed: its ranks were gone {seconds['ranks']:.2f} s later, "
          f"their data-loader workers {seconds['all']:.2f} s later")


# ---- memory --------------------------------------------------------------------------------------
def test_resident_memory_stays_flat_over_300_iterations(tmp_path):
    proc = Proc([sys.executable, SCRIPT, *TINY, "--train-iters", "300", "--log-interval", "10"],
                quiet_env(), tmp_path, "rss")
    samples = {}
    try:
        for iteration in range(10, 301, 10):
            proc.wait_for(ITERATION.format(iteration))
            samples[iteration] = rss_kib(proc.pid)
        assert proc.popen.wait(timeout=60) == 0, proc.err()
    finally:
        proc.kill()
    warm, late = samples[50], max(v for k, v in samples.items() if k >= 250)
    growth = (late - warm) / warm
    assert growth < 0.05, samples
    print(f"\n[figure] RSS at iteration 50: {warm / 1024:.1f} MiB, max over 250-300: "
          f"{late / 1024:.1f} MiB ({100 * growth:+.2f}%)")
