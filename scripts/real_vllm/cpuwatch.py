"""How much CPU did other work take while we measured? (Linux /proc only.)

Wall-clock measurements of the real vLLM servers are only meaningful while nothing else
competes for this 2-core machine. `CpuWatch` samples the machine's busy time
(/proc/stat) and the CPU time of the processes that belong to the measurement (the
vLLM servers' sessions, this process and its descendants); the difference, per second of
wall time, is the foreign load in cores, reported next to every measurement.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
MARKER = Path("/tmp/real-vllm-measuring")


def _stat(pid: str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces: split after its closing parenthesis
    return [pid, raw[raw.index("(") + 1 : raw.rindex(")")], *raw[raw.rindex(")") + 2 :].split()]


def _busy_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / _TICK


def _ours_seconds(sessions: set[int], root: int) -> float:
    """CPU seconds of processes in `sessions` or descended from `root` (this process)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    sid: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(entry)
        if st is None:
            continue
        pid = int(entry)
        # fields: 0 pid, 1 comm, 2 state, 3 ppid, 4 pgrp, 5 session, ... 13 utime, 14 stime
        parent[pid] = int(st[3])
        sid[pid] = int(st[5])
        cpu[pid] = (int(st[13]) + int(st[14]) + int(st[15]) + int(st[16])) / _TICK
    total = 0.0
    for pid, t in cpu.items():
        p, hops = pid, 0
        ours = sid[pid] in sessions
        while not ours and p > 1 and hops < 64:
            if p == root:
                ours = True
            p = parent.get(p, 0)
            hops += 1
        if ours:
            total += t
    return total


@dataclass
class Sample:
    wall: float
    busy: float
    ours: float


class CpuWatch:
    """`start()`, then `foreign_cores()`: other processes' CPU use since, in cores."""

    def __init__(self, server_pids: list[int]) -> None:
        self.sessions = set()
        for pid in server_pids:
            st = _stat(str(pid))
            if st is not None:
                self.sessions.add(int(st[5]))
        self.root = os.getpid()
        self.t0 = self.sample()

    def sample(self) -> Sample:
        return Sample(time.monotonic(), _busy_seconds(), _ours_seconds(self.sessions, self.root))

    def start(self) -> None:
        self.t0 = self.sample()

    def foreign_cores(self) -> float:
        now = self.sample()
        wall = now.wall - self.t0.wall
        if wall <= 0:
            return 0.0
        return max(0.0, (now.busy - self.t0.busy) - (now.ours - self.t0.ours)) / wall


def session_cpu(pid: int) -> float:
    """CPU seconds used so far by every process of `pid`'s session (a server's tree)."""
    st = _stat(str(pid))
    return _ours_seconds({int(st[5])}, -1) if st is not None else 0.0


def prioritize(server: list[int], nice: int = -15) -> None:
    """Give the servers' process groups (every thread) and this process a high priority, so
    that other processes sharing the machine take CPU only when the measurement leaves it
    idle (needs root). Children started afterwards inherit this process's priority."""
    for pid in server:
        with contextlib.suppress(OSError, ProcessLookupError):
            os.setpriority(os.PRIO_PGRP, os.getpgid(pid), nice)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def _threads_of_groups(pgids: set[int]) -> list[int]:
    tids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(entry)
        if st is None or int(st[4]) not in pgids:
            continue
        with contextlib.suppress(OSError):
            tids += [int(t) for t in os.listdir(f"/proc/{entry}/task")]
    return tids


_RR_SLICE = Path("/proc/sys/kernel/sched_rr_timeslice_ms")
_RR_SLICE_SAVED = Path("/tmp/real-vllm-rr-timeslice")  # the value to restore


def realtime(server: list[int], priority: int = 10, timeslice_ms: int | None = None) -> None:
    """Run the servers (every thread of their process groups) and this process (and the
    children it starts afterwards) under SCHED_RR: processes of normal policy, however
    niced, then only run when the measurement leaves a core idle (and in the kernel's
    5% share reserved for them), and cannot delay a server thread's wake-up. Without
    it, niced background jobs doubled the servers' step times on this machine.

    `timeslice_ms` changes the round-robin time slice (a global setting, only for
    SCHED_RR threads: ours; 100 ms by default) until `normal()`. Tried at 2 ms: the
    servers' steps were slower (B=1 decode 5 ms against 2.7 ms), so it is left alone."""
    if timeslice_ms is not None:
        with contextlib.suppress(OSError):
            if not _RR_SLICE_SAVED.exists():
                _RR_SLICE_SAVED.write_text(_RR_SLICE.read_text())
            _RR_SLICE.write_text(f"{timeslice_ms}\n")
    param = os.sched_param(priority)
    pgids = set()
    for pid in server:
        with contextlib.suppress(OSError):
            pgids.add(os.getpgid(pid))
    for tid in _threads_of_groups(pgids):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_RR, param)
    os.sched_setscheduler(0, os.SCHED_RR, param)


class Keeper:
    """While it is open, one busy loop per core under SCHED_RR priority 1 (below the
    measurement's 10): a core the measurement leaves idle for a moment is not handed to
    another process, which would evict the servers' working set (the tiny model's weights
    fit in a core's 2 MiB L2) from the caches. Normal processes then run only in the 5% of
    each core the kernel reserves for them. Each loop ends with this process, or after
    `max_seconds`, whichever comes first."""

    def __init__(self, max_seconds: float = 1200.0) -> None:
        self.max_seconds = max_seconds
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Keeper:
        code = (
            "import os, sys, time\n"
            "core, parent, end = int(sys.argv[1]), os.getppid(), time.monotonic() + "
            "float(sys.argv[2])\n"
            "os.sched_setaffinity(0, {core})\n"
            "os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))\n"
            "while time.monotonic() < end and os.getppid() == parent:\n"
            "    for _ in range(200000):\n"
            "        pass\n"
        )
        for core in sorted(os.sched_getaffinity(0)):
            self.procs.append(
                subprocess.Popen([sys.executable, "-c", code, str(core), str(self.max_seconds)])
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def normal(server: list[int]) -> None:
    """Back to SCHED_OTHER for the servers and this process, and the round-robin time
    slice back to what it was."""
    with contextlib.suppress(OSError):
        if _RR_SLICE_SAVED.exists():
            _RR_SLICE.write_text(_RR_SLICE_SAVED.read_text())
            _RR_SLICE_SAVED.unlink()
    param = os.sched_param(0)
    pgids = set()
    for pid in server:
        with contextlib.suppress(OSError):
            pgids.add(os.getpgid(pid))
    for tid in _threads_of_groups(pgids):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, param)
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_OTHER, param)


def server_pids(run_dir: Path) -> list[int]:
    """PIDs of the servers start_servers.sh started (its server-N.pid files)."""
    out = []
    for f in sorted(run_dir.glob("server-*.pid")):
        try:
            out.append(int(f.read_text().strip()))
        except (OSError, ValueError):
            continue
    return out


def busy_others(seconds: float = 2.0, server: list[int] | None = None) -> float:
    """Foreign load in cores over `seconds` (servers idle meanwhile count as ours)."""
    w = CpuWatch(list(server or []))
    time.sleep(seconds)
    return w.foreign_cores()


def wait_quiet(
    server: list[int], limit: float = 0.25, max_wait: float = 600.0, log: object = print
) -> float:
    """Wait (up to max_wait s) until other processes use less than `limit` cores."""
    deadline = time.monotonic() + max_wait
    while True:
        load = busy_others(seconds=3.0, server=server)
        if load < limit or time.monotonic() > deadline:
            return load
        log(f"[cpuwatch] other processes use {load:.2f} cores; waiting")  # type: ignore[operator]
        time.sleep(10)
