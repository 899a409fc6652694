"""examples/pretrain_gpt_moe.sbatch under a real one-node Slurm (slurmctld and slurmd started
here, stopped by PID) in a CPU configuration: 4 tasks, TP=2 x EP=2, checkpoints, the time-limit
warning (USR1) -> checkpoint and exit -> requeue -> resume, and the torchrun-per-node variant.
Also: every example configuration's flags, as the batch script composes them, parse at the
world sizes it names (no Slurm needed for that)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy
import pytest
import torch

import pretrain_gpt_moe
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from procs import ROOT
from slurm_cluster import SlurmCluster, missing_reason
from util import gpt2_files

SBATCH = os.path.join(ROOT, "examples", "pretrain_gpt_moe.sbatch")
CPU_JOB = ["--nodes", "1", "--ntasks-per-node", "4", "--gpus-per-node", "0", "--cpus-per-task", "1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(cluster, tmp_path, sbatch_args=(), **env) -> str:
    env = {"TED_ROOT": ROOT, "TED_VENV": sys.prefix, "TED_CONFIG": "tests/slurm_tiny.sh",
           "PYTHONWARNINGS": "ignore", "TED_SAVE": str(tmp_path / "checkpoints"), **env}
    done = cluster.run("sbatch", "--parsable", *CPU_JOB, *sbatch_args, "--output",
                       f"{tmp_path}/%x-%j.out", "--error", f"{tmp_path}/%x-%j.err", SBATCH,
                       env=env, cwd=ROOT)
    return done.stdout.strip().split(";")[0]


def logs(tmp_path, job: str) -> tuple[str, str]:
    read = lambda ext: ((tmp_path / f"gpt-moe-ted-{job}.{ext}").read_text()
                        if (tmp_path / f"gpt-moe-ted-{job}.{ext}").exists() else "")
    return read("out"), read("err")


def wait_for_log(tmp_path, job: str, pattern: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if re.search(pattern, logs(tmp_path, job)[0]):
            return
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in the job's log:\n" + "\n".join(logs(tmp_path, job)))


def tracker(folder) -> int:
    return int((folder / "latest_checkpointed_iteration.txt").read_text())


@pytest.fixture(scope="module")
def startup_job(slurm, tmp_path_factory):
    """The job of test_a_time_limit_warning_during_start_up_checkpoints_and_does_not_loop,
    submitted with the file's first job: it spends most of its time waiting for slurmctld's
    periodic time-limit check to send USR1, so it runs beside the other jobs (CI time)."""
    folder = tmp_path_factory.mktemp("startup")
    job = submit(slurm, folder, ("--time", "2", "--signal", "B:USR1@120"), TINY_ITERS="100000",
                 TED_SAVE_INTERVAL="100000", TED_MAX_REQUEUES="1", TED_RESIGNAL_S="2")
    return job, folder, time.monotonic()


@pytest.mark.slurm
@pytest.mark.usefixtures("startup_job")
def test_sbatch_trains_checkpoints_and_resumes_after_its_time_limit_warning(slurm, tmp_path):
    start = time.monotonic()
    job = submit(slurm, tmp_path, TINY_ITERS="12", TED_SAVE_INTERVAL="5")
    wait_for_log(tmp_path, job, r"iteration\s+2/")
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@120 sends
    end = time.monotonic() + 120
    # it checkpoints and requeues
    while slurm.job(job).get("Restarts") != "1" and time.monotonic() < end:
        time.sleep(0.1)
    first_run = time.monotonic() - start
    # Slurm holds a requeued job for cred_expire (5 s here), then runs it again
    held = time.monotonic()
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                            timeout=240)
    second_run = time.monotonic() - held
    out, err = logs(tmp_path, job)
    assert (info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"
            and info["Restarts"] == "1"), (info, out, err)
    stopped = int(re.search(r"> exiting at iteration (\d+): SIGUSR1 received", out)[1])
    assert f"> checkpoint saved at iteration {stopped} in {tmp_path / 'checkpoints'}" in out
    assert f"> loaded {tmp_path / 'checkpoints'}/iter_{stopped:07d} (iteration {stopped}" in out
    resumed = out[out.index("> loaded"):]
    assert (re.search(rf"iteration\s+{stopped + 1}/\s+12 \|", resumed)
            and re.search(r"iteration\s+12/\s+12 \|", resumed))
    assert "time limit near: every rank checkpoints and exits (USR1)" in err and "requeueing" in err
    # Slurm's own note on the requeue is the one error line
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert ("Traceback" not in err
            and [e for e in errors if "DUE TO JOB REQUEUE" not in e] == []), err
    assert tracker(tmp_path / "checkpoints") == 12
    print(f"\n[figure] Slurm job {job}: first run {first_run:.1f} s (sbatch to requeued, stopped "
          f"at iteration {stopped}), second run {second_run:.1f} s (requeued to COMPLETED); "
          "4 tasks, TP=2 EP=2, 12 iterations")


@pytest.mark.slurm
def test_sbatch_torchrun_per_node_variant(slurm, tmp_path):
    start = time.monotonic()
    job = submit(slurm, tmp_path, TINY_ITERS="4", TED_LAUNCHER="torchrun")
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                            timeout=240)
    out, err = logs(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out, err)
    assert ("TP=2 EP=2 DP=2 expert-DP=1 (world 4)" in out
            and re.search(r"iteration\s+4/\s+4 \|", out)), out
    assert tracker(tmp_path / "checkpoints") == 4 and "Traceback" not in err, err
    print(f"\n[figure] Slurm job {job} (torchrun per node): {time.monotonic() - start:.1f} s "
          "sbatch to COMPLETED")


@pytest.mark.slurm
def test_a_time_limit_warning_during_start_up_checkpoints_and_does_not_loop(slurm, startup_job):
    """USR1 at the job's start (its warning time is its whole time limit), a run that would never
    finish: each run is warned while its ranks start, saves at the first iteration it can, and
    the job requeues itself TED_MAX_REQUEUES times, not more."""
    job, tmp_path, start = startup_job
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                            timeout=400)
    out, err = logs(tmp_path, job)
    assert (info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"
            and info["Restarts"] == "1"), (info, out, err)
    stops = [int(i) for i in re.findall(r"> exiting at iteration (\d+): SIGUSR1 received", out)]
    assert len(stops) == 2 and stops[0] < stops[1] == tracker(tmp_path / "checkpoints"), out
    assert "checkpoint 0 -> " in err and "requeued 1 times already (TED_MAX_REQUEUES=1)" in err
    assert "User defined signal" not in err and "Traceback" not in err, err
    print(f"\n[figure] Slurm job {job}, USR1 at start-up: saved at iterations {stops}, requeued "
          f"once, then stopped (TED_MAX_REQUEUES=1); {time.monotonic() - start:.1f} s in all")


# ---- the example configurations ------------------------------------------------------------------
STUB_SRUN = """#!{python}
import json, os, sys
with open(os.environ["TED_STUB_ARGV"], "w") as f:
    json.dump(sys.argv[1:], f)
"""
STUB_SCONTROL = "#!/bin/sh\necho node001\n"


def composed_argv(tmp_path, config: str, world: int, launcher: str = "srun") -> list[str]:
    """What the batch script hands srun for `config` on `world` GPUs (srun and scontrol stubbed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", STUB_SRUN.format(python=sys.executable)),
                       ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    vocab, merges = gpt2_files()
    out = tmp_path / "argv.json"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TED_ROOT=ROOT,
               TED_VENV=sys.prefix, TED_CONFIG=config, TED_LAUNCHER=launcher,
               TED_STUB_ARGV=str(out), TED_SAVE=str(tmp_path / "ckpt"),
               DATA=str(tmp_path / "corpus_text_document"), VOCAB=vocab, MERGES=merges,
               SLURM_NTASKS=str(world), SLURM_NNODES=str(world // 8), SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="gpt-moe-ted", SLURM_JOB_NODELIST="node[001-016]",
               SLURM_CPUS_PER_TASK="8")
    done = subprocess.run(["bash", SBATCH], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


@pytest.fixture
def gpt2_corpus(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "corpus_text_document.bin"), dtype=numpy.uint16)
    for doc in range(200):
        builder.add_document(torch.arange(doc, doc + 300) % 50257, [300])
    builder.finalize(str(tmp_path / "corpus_text_document.idx"))


@pytest.mark.parametrize("config", ["gpt3_moe_1.3b.sh", "gpt3_moe_2.7b.sh", "gpt3_moe_6.7b.sh"])
@pytest.mark.parametrize("world", [32, 128])
def test_paper_configurations_parse_at_the_world_sizes_they_name(config, world, tmp_path,
                                                                 gpt2_corpus, monkeypatch):
    argv = composed_argv(tmp_path, f"examples/{config}", world)
    # each task starts with USR1 ignored until pretrain_gpt_moe.py catches it
    script = argv.index("pretrain_gpt_moe.py")
    assert (argv[:3] == ["--kill-on-bad-exit=1", "bash", "-c"] and "trap \"\" USR1" in argv[3]
            and argv[script - 1] == "python"), argv[:7]
    flags = argv[script + 1:]
    for name, value in (("RANK", "0"), ("WORLD_SIZE", str(world)), ("MASTER_ADDR", "node001"),
                        ("MASTER_PORT", "14242")):
        monkeypatch.setenv(name, value)
    cfg, tokenizer = pretrain_gpt_moe.load_config(flags)
    layers, hidden = {"gpt3_moe_1.3b.sh": (24, 2048), "gpt3_moe_2.7b.sh": (32, 2560),
                      "gpt3_moe_6.7b.sh": (32, 4096)}[config]
    assert ((cfg.model.num_layers, cfg.model.hidden_size, cfg.moe.num_experts)
            == (layers, hidden, 16))
    assert cfg.moe.layers == tuple(range(1, layers, 2)) and tokenizer.vocab_size == 50257
    assert cfg.topology.world_size == world and cfg.topology.tp * cfg.topology.dp == world
    print(f"{config} on {world}: {cfg.topology.describe()}")


def test_the_torchrun_variant_starts_one_torchrun_per_node(tmp_path, gpt2_corpus):
    argv = composed_argv(tmp_path, "examples/gpt3_moe_6.7b.sh", 32, launcher="torchrun")
    shell = argv.index("-c")  # bash -c 'trap "" USR1; exec "$@"' torchrun torchrun ...
    assert argv[shell - 1] == "bash" and argv[shell + 2] == "torchrun"
    torchrun = argv[shell + 3:]
    assert argv[:4] == ["--kill-on-bad-exit=1", "--ntasks=4", "--ntasks-per-node=1",
                        "--cpus-per-task=64"], argv
    assert torchrun[:12] == ["torchrun", "--nnodes", "4", "--nproc-per-node", "8",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", "node001:14242",
                             "--rdzv-id", "4242", "pretrain_gpt_moe.py"], torchrun
    assert ("--exit-signal" in torchrun
            and torchrun[torchrun.index("--exit-signal") + 1] == "SIGUSR1")


# ---- the requeue decision, with srun and scontrol stubbed ---------------------------------------
STUB_STEP = """#!{python}
import os, signal, sys, time
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a rank still importing: USR1 ignored
open(os.environ["TED_STUB_STARTED"], "w").close()
time.sleep(1.0)
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))  # its handler is up
end = time.monotonic() + 20
while not got and time.monotonic() < end:
    time.sleep(0.05)
if got and os.environ.get("TED_STUB_SAVES"):
    with open(os.path.join(os.environ["TED_SAVE"], "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(os.environ["TED_STUB_SAVES"])
sys.exit(0 if got else 3)
"""
STUB_REQUEUE = '#!/bin/sh\n[ "$1" = requeue ] && echo "$@" >> "$TED_STUB_REQUEUES"; echo node001\n'


@pytest.mark.parametrize("case", ["progress", "no progress", "limit reached"])
def test_the_script_requeues_only_after_progress_and_at_most_n_times(case, tmp_path):
    bin_dir, save = tmp_path / "bin", tmp_path / "ckpt"
    bin_dir.mkdir()
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("5")
    for name, text in (("srun", STUB_STEP.format(python=sys.executable)),
                       ("scontrol", STUB_REQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    started, requeues = tmp_path / "started", tmp_path / "requeues"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TED_ROOT=ROOT,
               TED_VENV=sys.prefix, TED_CONFIG="tests/slurm_tiny.sh", TED_SAVE=str(save),
               TED_STUB_STARTED=str(started), TED_STUB_REQUEUES=str(requeues),
               TED_STUB_SAVES={"no progress": ""}.get(case, "9"), TED_RESIGNAL_S="0.3",
               TED_MAX_REQUEUES="2", SLURM_RESTART_COUNT="2" if case == "limit reached" else "0",
               SLURM_NTASKS="4", SLURM_NNODES="1", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="gpt-moe-ted", SLURM_JOB_NODELIST="node001")
    script = subprocess.Popen(["bash", SBATCH], env=env, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while not started.exists() and time.monotonic() < end:
        time.sleep(0.02)
    script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends, before the handler
    err = script.communicate(timeout=60)[1]
    # the step got USR1 after its handler was up (else it exits 3): the script said it again
    assert script.returncode == 0, err
    requeued = requeues.read_text() if requeues.exists() else ""
    expected = {"progress": "checkpoint 5 -> 9; requeueing",
                "no progress": "no checkpoint newer than iteration 5: not requeueing",
                "limit reached": "requeued 2 times already (TED_MAX_REQUEUES=2)"}[case]
    assert expected in err, err
    assert requeued == ("requeue 4242\n" if case == "progress" else ""), (requeued, err)
