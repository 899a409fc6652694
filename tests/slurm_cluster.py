"""A one-node Slurm for tests, started by hand as on these machines (docs: DESIGN.md, "Slurm on
these machines"): Debian's slurmctld and slurmd in the foreground (-D), a slurm.conf whose
state, spool, pid and log paths all live in one temporary folder, ports on loopback, no munge
(auth/none), no accounting, and a scheduler that looks at pending jobs every second (the
default, 60 s, is made for a busy cluster). cred_expire=5: a requeued job may start again 5 s
after its requeue (default 120 s; a forced earlier start fails with "Job credential revoked").
`stop()` ends every daemon it started, by PID."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
PACKAGES = "slurmctld slurmd slurm-client munge"
PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons live in sbin


def missing_reason() -> str | None:
    """Why a real Slurm cannot run here (None: it can)."""
    absent = [name for name in DAEMONS if shutil.which(name, path=PATH) is None]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): apt-get install -y "
                f"--no-install-recommends {PACKAGES} (tests/run.sh does it where apt-get exists)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps (SlurmdUser=root); run the tests as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    def __init__(self, root, cpus: int = 4):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=PATH)

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        ctld, slurmd = _free_ports(2)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=tedtest
SlurmctldHost={self.host}
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
AuthInfo=cred_expire=5
CredType=cred/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=300
SlurmdParameters=config_overrides
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """CPUs is set above the cores (config_overrides): 4 ranks on 2 cores, as the tests run."""
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / "log" / f"{daemon}.stdout", "w")
            self.procs.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT))
            log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state == "idle":
                return self
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Slurm did not come up (node state {state!r}):\n{self.logs()}")

    def run(self, *argv, check: bool = True, env: dict | None = None,
            cwd=None) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr}")
        return done

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, RunTime, ...)."""
        text = self.run("scontrol", "show", "job", job_id, "-o").stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s:\n"
                           f"{self.logs()}")

    def logs(self) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            out.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(out)

    def cancel_all(self, timeout: float = 45.0) -> None:
        """Cancel this cluster's jobs and wait until their steps are gone (KillWait is 30 s)."""
        if not any(p.poll() is None for p in self.procs):
            return
        self.run("scancel", "--user", "root", check=False)
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.2)

    def stop(self) -> None:
        """Every daemon started here, by PID: TERM, then KILL if it lingers (jobs cancelled
        first)."""
        self.cancel_all()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
