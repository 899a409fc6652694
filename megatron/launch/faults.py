"""Faults of a multi-process run: a rank that never joins is named, every rank stops within
seconds when one dies, and workers die with their launcher.

Why a side channel. A collective whose peer died fails on the ranks paired with it (gloo:
"Connection reset by peer") and hangs on the others until --distributed-timeout-minutes (NCCL
hangs everywhere). A plain TCP connection from every rank to rank 0 is closed by the kernel the
moment a process dies, whatever it was doing: no heartbeat thread has to be scheduled, so a rank
busy for minutes in one C call is never taken for a dead one. Rank 0 names the rank that went
and tells every other rank to stop; when rank 0 itself goes, every rank sees its connection close.

The same connections carry the join. Rank 0 listens on MASTER_ADDR:MASTER_PORT, says which ranks
it still waits for, and only once every rank is there starts torch's TCPStore on a free port and
sends it out ("go"): init_process_group never waits for a missing rank (torch's own rendezvous
waits silently, and its store client prints C++ stack traces while it retries). Under torchrun
every worker is already running and the agent owns MASTER_PORT: rank 0 listens on a free port
and its address travels by one broadcast after init_process_group.

Protocol, one text line per message:
    rank r -> rank 0:  join <rank> <world size> <pid> <host>        at the end: done <status>
    rank 0 -> rank r:  go <store port> <pid> <host> | abort <reason>  at the end: done <status>
Status 1 for a fault found here; 2 for a launch that can never work (an inconsistent WORLD_SIZE,
a rank given twice, a port in use), the status of bad input.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass

EXIT_FAULT = 1
EXIT_BAD_LAUNCH = 2
FIRST_REPORT_S = 5.0  # rank 0 names the missing ranks this soon, then every REPORT_EVERY_S
REPORT_EVERY_S = 60.0
CLIENT_FIRST_REPORT_S = 15.0  # rank 1 says it waits for rank 0 (rank 0 may just be importing)
GRACE_S = 30.0  # a peer that exited with an error: how long the others may still run on their own
VERDICT_WAIT_S = 10.0  # a collective failed: how long to wait for the watchdog to name the cause


class LaunchError(RuntimeError):
    """A launch or join fault: one line (unless `quiet`: another rank prints it), then `status`.
    `rank_specific`: only this rank has it (the others' launch variables may be fine)."""

    def __init__(self, message: str, status: int = EXIT_FAULT, quiet: bool = False,
                 rank_specific: bool = False):
        super().__init__(message)
        self.status, self.quiet, self.rank_specific = status, quiet, rank_specific


PROG = "pretrain_gpt_moe.py"  # the entry point these messages speak for


def say(kind: str, message: str) -> None:
    """One `pretrain_gpt_moe.py: error: ...` (or warning / note) line on stderr, flushed at once."""
    print(f"{PROG}: {kind}: {message}", file=sys.stderr, flush=True)


def _exit_now(status: int) -> None:
    """Leave from any thread, even while the main thread waits in a collective."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def describe_ranks(ranks) -> str:
    """[1, 2, 3, 7] -> '1-3, 7': a missing half of 4096 ranks stays one line."""
    ranks, parts, i = sorted(ranks), [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


# ---- workers die with their launcher ------------------------------------------------------------
def die_with_launcher() -> None:
    """Under torchrun, ask Linux to SIGKILL this worker when the launcher process dies: killing
    torchrun then leaves nothing running. Not under srun (slurmstepd ends its tasks itself) nor
    plain python (the parent is a shell that may exit while a background run should go on)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()


def die_with_parent(*_) -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) on Linux: this process dies with its parent. Also usable
    as a DataLoader worker_init_fn (torch's workers otherwise poll for their parent every 5 s)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if parent == 1 or os.getppid() != parent:  # the parent died before the prctl took effect
        _exit_now(EXIT_FAULT)


# ---- one connection -----------------------------------------------------------------------------
# Every socket made here. A forked child (a DataLoader worker) closes its copies at once: else a
# dead rank's connection stays open until its children notice and exit, seconds later.
_SOCKETS: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
_fork_hook = []


def _track(sock: socket.socket) -> socket.socket:
    if not _fork_hook:
        os.register_at_fork(after_in_child=_close_in_child)
        _fork_hook.append(True)
    _SOCKETS.add(sock)
    return sock


def _close_in_child() -> None:
    for sock in list(_SOCKETS):  # close(), not shutdown(): the parent's connection is untouched
        try:
            sock.close()
        except OSError:
            pass

@dataclass(frozen=True)
class Peer:
    rank: int
    pid: int
    host: str

    def __str__(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


class _Conn:
    """A socket carrying text lines. `feed` takes in what has arrived without waiting for more."""

    def __init__(self, sock: socket.socket, peer: Peer | None = None):
        self.sock, self.peer = _track(sock), peer
        self.buf, self.lines = b"", []  # an incomplete last line; complete lines not yet taken
        self.done: int | None = None  # the status a peer said it finished with
        _keepalive(sock)

    def send(self, line: str) -> bool:
        try:
            self.sock.sendall(line.encode() + b"\n")
            return True
        except OSError:
            return False

    def feed(self) -> bool:
        """Receive once; False when the peer has closed (or reset) the connection."""
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, socket.timeout, InterruptedError):
            return True
        except OSError:
            return False
        if not chunk:
            return False
        *lines, self.buf = (self.buf + chunk).split(b"\n")
        self.lines += [line.decode(errors="replace") for line in lines]
        return True

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def read_line(self, deadline: float) -> str | None:
        """Block for one line until `deadline` (time.monotonic()): None at close, "" at the
        deadline."""
        while not self.lines:
            left = deadline - time.monotonic()
            if left <= 0:
                return ""
            self.sock.settimeout(min(left, 1.0))
            if not self.feed():
                return None
        return self.lines.pop(0)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _keepalive(sock: socket.socket) -> None:
    """A node that vanishes without closing its sockets (power, network) is noticed in ~25 s."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass


def _me(rank: int) -> Peer:
    return Peer(rank, os.getpid(), socket.gethostname())


# ---- the join, rank 0's side ---------------------------------------------------------------------
def listen(port: int = 0) -> socket.socket:
    """Rank 0's listening socket on every interface; port 0: any free port."""
    sock = _track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("", port))
    except OSError as err:
        sock.close()
        raise LaunchError(f"rank 0 cannot listen on MASTER_PORT {port} on {socket.gethostname()} "
                          f"({err.strerror}): another run uses it; give each run its own "
                          "MASTER_PORT", EXIT_BAD_LAUNCH) from None
    sock.listen(min(socket.SOMAXCONN, 4096))
    _raise_open_file_limit()
    return sock


def _raise_open_file_limit() -> None:
    """Rank 0 holds one connection per rank: lift the soft limit (often 1024) to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


class _Gathering:
    """Rank 0 collecting the other ranks' `join` lines."""

    def __init__(self, listener: socket.socket, world_size: int, timeout_s: float):
        self.listener, self.world_size, self.timeout_s = listener, world_size, timeout_s
        self.joined: dict[int, _Conn] = {}
        # every connection, joined or not (all are told when rank 0 gives up)
        self.connected: list[_Conn] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)

    def run(self) -> dict[int, _Conn]:
        start = time.monotonic()
        deadline, report_at = start + self.timeout_s, start + FIRST_REPORT_S
        while len(self.joined) < self.world_size - 1:
            now = time.monotonic()
            if now >= deadline:
                self._give_up(f"ranks {describe_ranks(self._missing())} never joined within "
                              f"{_duration(self.timeout_s)} (--distributed-timeout-minutes): start "
                              "them with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE as rank "
                              "0, or raise the timeout")
            if now >= report_at:
                say("note", f"rank 0 waits for ranks {describe_ranks(self._missing())} to join "
                            f"({len(self.joined) + 1} of {self.world_size} here); giving up in "
                            f"{_duration(deadline - now)} (--distributed-timeout-minutes)")
                report_at = now + REPORT_EVERY_S
            for key, _ in self.selector.select(timeout=min(1.0, max(0.01, deadline - now))):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._read(key.data)
        self.selector.close()
        return self.joined

    def _missing(self) -> list[int]:
        return [r for r in range(1, self.world_size) if r not in self.joined]

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        sock.setblocking(False)
        conn = _Conn(sock)
        self.connected.append(conn)
        self.selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        if not conn.feed():  # left before everyone was there: it may be started again
            self.selector.unregister(conn.sock)
            if conn.peer is not None and self.joined.get(conn.peer.rank) is conn:
                del self.joined[conn.peer.rank]
            self.connected.remove(conn)
            conn.close()
            return
        for line in conn.take():
            self._join(conn, line.split())

    def _join(self, conn: _Conn, words: list[str]) -> None:
        try:
            rank, world, pid, host = int(words[1]), int(words[2]), int(words[3]), words[4]
        except (IndexError, ValueError):
            words = []
        if not words or words[0] != "join":
            self._give_up(f"a process that is not a rank of this run connected to MASTER_PORT "
                          f"{self.listener.getsockname()[1]}: give each run its own MASTER_PORT",
                          EXIT_BAD_LAUNCH)
        peer = Peer(rank, pid, host)
        if world != self.world_size:
            self._give_up(f"{peer} was started with WORLD_SIZE {world}, rank 0 with "
                          f"{self.world_size}: start every rank with the same WORLD_SIZE",
                          EXIT_BAD_LAUNCH)
        if not 0 < rank < world or rank in self.joined:
            other = f" and {self.joined[rank].peer}" if rank in self.joined else ""
            self._give_up(f"{peer}{other} both joined as rank {rank}: give every process its own "
                          f"RANK in 0..{world - 1}", EXIT_BAD_LAUNCH)
        conn.peer = peer
        self.joined[rank] = conn

    def _give_up(self, message: str, status: int = EXIT_FAULT):
        for conn in self.connected:
            conn.sock.setblocking(True)
            conn.sock.settimeout(2.0)
            conn.send("abort " + message)
            conn.close()
        self.selector.close()
        self.listener.close()
        raise LaunchError(message, status)


# ---- the join, every rank -----------------------------------------------------------------------
@dataclass
class Joined:
    """The outcome of the join: the connections (rank 0: one per rank; others: one to rank 0)
    and, from our own rendezvous, the port of the TCPStore rank 0 started."""

    rank: int
    world_size: int
    conns: dict[int, _Conn]
    store_port: int | None = None


def gather_ranks(listener: socket.socket, world_size: int, timeout_s: float,
                 start_store=None) -> Joined:
    """Rank 0: wait (saying which ranks are missing) until every rank has joined, then start the
    store (start_store() -> its port; None under torchrun) and send `go` to everyone."""
    conns = _Gathering(listener, world_size, timeout_s).run()
    listener.close()
    port = start_store() if start_store is not None else 0
    me = _me(0)
    for conn in conns.values():
        conn.sock.setblocking(True)
        conn.send(f"go {port} {me.pid} {me.host}")
    return Joined(0, world_size, conns, port or None)


def join_rank0(addr: str, port: int, rank: int, world_size: int, timeout_s: float) -> Joined:
    """Ranks 1..: connect to rank 0 (retrying while it is not up yet) and wait for `go`."""
    start = time.monotonic()
    deadline, report_at = start + timeout_s, start + CLIENT_FIRST_REPORT_S
    where = f"{addr}:{port} (MASTER_ADDR:MASTER_PORT)"
    while True:
        try:
            sock = socket.create_connection((addr, port), timeout=2.0)
            break
        except OSError:
            now = time.monotonic()
            if now >= deadline:
                raise LaunchError(f"rank 0 never came up at {where} within {_duration(timeout_s)} "
                                  "(--distributed-timeout-minutes): start it, or check MASTER_ADDR "
                                  "and MASTER_PORT", quiet=rank != 1) from None
            if rank == 1 and now >= report_at:
                say("note", f"rank 1 waits for rank 0 at {where}; giving up in "
                            f"{_duration(deadline - now)} (--distributed-timeout-minutes)")
                report_at = now + REPORT_EVERY_S
            time.sleep(0.2)
    conn, me = _Conn(sock), _me(rank)
    conn.send(f"join {rank} {world_size} {me.pid} {me.host}")
    # rank 0 answers once every rank is there; it gives up (and says so) at the same timeout
    line = conn.read_line(deadline + 30.0)
    words = (line or "").split()
    if words[:1] == ["go"] and len(words) == 4:
        conn.peer = Peer(0, int(words[2]), words[3])
        conn.sock.settimeout(None)
        return Joined(rank, world_size, {0: conn}, int(words[1]) or None)
    conn.close()
    if words[:1] == ["abort"]:
        raise LaunchError(line[len("abort "):], quiet=True)  # rank 0 printed why
    raise LaunchError(f"rank 0 at {where} stopped before every rank had joined (its own output "
                      "says why)", quiet=rank != 1)


# ---- the watchdog -------------------------------------------------------------------------------
class Watchdog:
    """Watches the join's connections for the rest of the run, in a daemon thread. A peer whose
    connection closes without `done` has died: rank 0 prints one line naming it and stops every
    rank; when rank 0 goes, rank 1 prints it and every rank stops. Exit status 1."""

    def __init__(self, joined: Joined):
        self.rank, self.world_size, self.conns = joined.rank, joined.world_size, joined.conns
        self.stopping = False
        self._wake_r, self._wake_w = map(_track, socket.socketpair())
        self._grace: dict[int, float] = {}  # rank -> when its non-zero `done` stops being excused
        self._thread = threading.Thread(target=self._run, name="ted-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def finish(self, status: int = 0) -> None:
        """This rank ends (cleanly or by a deliberate, coordinated exit): tell the peers, stop."""
        if self.stopping:
            return
        self.stopping = True
        for conn in self.conns.values():
            conn.send(f"done {status}")
        self._wake_w.send(b"x")
        self._thread.join(timeout=5.0)
        for conn in self.conns.values():
            conn.close()
        self._wake_r.close()
        self._wake_w.close()

    def await_verdict(self, seconds: float = VERDICT_WAIT_S) -> None:
        """A collective just failed: give the watchdog time to name a dead peer (it then ends the
        process itself). Returns when no peer died: the failure is something else."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.05)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        for conn in self.conns.values():
            conn.sock.setblocking(False)
            selector.register(conn.sock, selectors.EVENT_READ, conn)
        while not self.stopping:
            for key, _ in selector.select(timeout=1.0):
                if key.data is not None and not self.stopping:
                    self._read(selector, key.data)
            self._check_grace()
        selector.close()

    def _read(self, selector, conn: _Conn) -> None:
        alive = conn.feed()
        for line in conn.take():
            words = line.split()
            if words[:1] == ["abort"]:  # rank 0 found a dead peer and has said so
                _exit_now(EXIT_FAULT)
            if words[:1] == ["done"]:
                conn.done = (int(words[1]) if len(words) == 2 and words[1].lstrip("-").isdigit()
                             else 0)
                if conn.done != 0:
                    self._grace[conn.peer.rank] = time.monotonic() + GRACE_S
        if not alive:
            selector.unregister(conn.sock)
            if conn.done is None:
                self._peer_lost(conn.peer)

    def _check_grace(self) -> None:
        for rank, until in list(self._grace.items()):
            if time.monotonic() >= until and not self.stopping:
                conn = self.conns[rank]
                self._stop_all(f"{conn.peer} exited with status {conn.done} {int(GRACE_S)} s ago "
                               "(its own output says why) while this rank ran on; stopping every "
                               "rank",
                               prints=self.rank == 0 or (rank == 0 and self.rank == 1))

    def _peer_lost(self, peer: Peer) -> None:
        self._stop_all(f"{peer} died or exited mid-run (its own output, if any, says why); "
                       f"stopping the {self.world_size - 1} other ranks",
                       prints=self.rank == 0 or (peer.rank == 0 and self.rank == 1))

    def _stop_all(self, message: str, prints: bool) -> None:
        if prints:
            say("error", message)
        if self.rank == 0:
            for conn in self.conns.values():
                conn.sock.setblocking(True)
                conn.sock.settimeout(2.0)
                conn.send("abort " + message)
        _exit_now(EXIT_FAULT)
