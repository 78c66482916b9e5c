"""`lbproxy serve --workers N`: a supervisor process and N worker processes.

Socket: SO_REUSEPORT. Each worker is an ordinary `lbproxy serve` that listens on the same
host:port with SO_REUSEPORT, so the kernel spreads new connections evenly over the
workers' own accept queues. (With one socket inherited from the parent, every idle worker
wakes for each new connection and the one that wins the accept race tends to take most of
them.) The parent binds the address first, without listening: that reserves the port,
resolves port 0 to a real one and reports a taken port before any worker starts; a
bound socket that does not listen receives no connections.

Signals: SIGTERM/SIGINT and SIGHUP sent to the parent are sent on to every worker, which
drains (shutdown_grace) or reloads its config as a single `serve` does. A SIGHUP is sent
only to workers that already hold SIGHUP (they announce it with a file in the workers'
directory); one that does not yet has not read its config and will read the new one.

Admin API: host-wide (drain, undrain, reload, backends): the workers share a state file
in the workers' directory and signal each other (SIGUSR1; replicas/host_admin.py); a
restarted worker reads it before it listens.

A worker that dies: restarted when it had served at least RESTART_AFTER seconds (a crash
under load should not take the host down); one that dies sooner (a bad config, a port it
cannot bind) makes the parent stop the others and exit 1, loudly, rather than loop.

Signals (scrapes, health checks, KV events) run in every worker: routing reads them
in-process at every decision, and a scrape is a small GET at a few Hz per backend, so N
scrapers cost the backends little; sharing them across processes would cost more than it
saves.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from lbproxy.bind import address_in_use

log = logging.getLogger("lbproxy")

# Set in each worker's environment.
WORKER_INDEX_ENV = "LBPROXY_WORKER_INDEX"
WORKER_DIR_ENV = "LBPROXY_WORKER_DIR"
WORKERS_ENV = "LBPROXY_WORKERS"  # how many
WORKER_SPAWNED_ENV = "LBPROXY_WORKER_SPAWNED"  # wall clock of the spawn (host_admin.py)
_PR_SET_PDEATHSIG = 1
RESTART_AFTER = 10.0  # seconds a worker must have run to be restarted when it dies


def worker_index() -> int | None:
    """This process's worker index, or None when it is not a worker of `--workers`."""
    value = os.environ.get(WORKER_INDEX_ENV)
    return int(value) if value else None


def worker_count() -> int:
    """N of `serve --workers N` in a worker, else 1."""
    return int(os.environ.get(WORKERS_ENV) or 1)


def spawned_at() -> float:
    """When the supervisor started this worker (time.time()); 0.0 outside --workers."""
    return float(os.environ.get(WORKER_SPAWNED_ENV) or 0.0)


def worker_dir() -> Path | None:
    value = os.environ.get(WORKER_DIR_ENV)
    return Path(value) if value else None


def announce_sighup_held() -> None:
    """Called by a worker once SIGHUP no longer kills it (see the module docstring)."""
    d, i = worker_dir(), worker_index()
    if d is not None and i is not None:
        (d / f"hup-{i}-{os.getpid()}").touch()


def reserve(host: str, port: int) -> socket.socket:
    """Bind (not listen) host:port with SO_REUSEPORT: the workers' port, held by the parent."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise address_in_use(e, host, port) from None
    return sock


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM (a graceful drain) when the supervisor dies, even
    of SIGKILL, so that no worker is left serving on its own (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, argv: list[str], n: int, directory: Path) -> None:
        self.argv = argv  # the worker's command line
        self.n = n
        self.dir = directory
        self.workers: dict[int, _Worker] = {}
        self.stopping = False

    def spawn(self, index: int) -> None:
        env = {
            **os.environ,
            WORKER_INDEX_ENV: str(index),
            WORKER_DIR_ENV: str(self.dir),
            WORKERS_ENV: str(self.n),
            WORKER_SPAWNED_ENV: repr(time.time()),
        }
        proc = subprocess.Popen(self.argv, env=env, preexec_fn=_end_with_parent)
        self.workers[index] = _Worker(index, proc)
        log.info("worker %d started (pid %d)", index, proc.pid)

    def send(self, sig: signal.Signals) -> None:
        for w in self.workers.values():
            if sig == signal.SIGHUP and not (self.dir / f"hup-{w.index}-{w.proc.pid}").exists():
                continue  # not reading its config yet: it will read the new one
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(sig)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:  # a second one: the workers end at once, as a single serve does
            self.send(signal.SIGTERM)
            return
        self.stopping = True
        self.send(signal.SIGTERM)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.send(signal.SIGHUP)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        for i in range(self.n):
            self.spawn(i)
        status = 0
        while self.workers:
            pid, raw = os.wait()  # signal handlers run while this waits (PEP 475 retries)
            w = next((w for w in self.workers.values() if w.proc.pid == pid), None)
            if w is None:
                continue
            del self.workers[w.index]
            w.proc.returncode = os.waitstatus_to_exitcode(raw)
            code = w.proc.returncode
            for stale in self.dir.glob(f"*-{w.index}-{pid}*"):
                stale.unlink(missing_ok=True)
            if self.stopping:
                status = status or (code if code > 0 else 0)
                continue
            ran = time.monotonic() - w.started
            if ran >= RESTART_AFTER:
                log.error("worker %d (pid %d) exited with %s; restarting it", w.index, pid, code)
                self.spawn(w.index)
                continue
            log.error(
                "worker %d (pid %d) exited with %s after %.1fs; stopping the other workers",
                w.index,
                pid,
                code,
                ran,
            )
            self.stopping = True
            status = 1
            self.send(signal.SIGTERM)
        return status


def run_workers(n: int, worker_argv: list[str], host: str, port: int) -> int:
    """Reserve host:port, run `n` workers (`worker_argv` + ["--port", P]) until they end."""
    held = reserve(host, port)
    bound = held.getsockname()[1]
    directory = Path(tempfile.mkdtemp(prefix="lbproxy-workers-"))
    try:
        sup = Supervisor([*worker_argv, "--host", host, "--port", str(bound)], n, directory)
        log.info("lbproxy supervisor (pid %d): %d workers on %s:%d", os.getpid(), n, host, bound)
        return sup.run()
    finally:
        held.close()
        shutil.rmtree(directory, ignore_errors=True)


def worker_command(config: str, loop: str, log_level: str, log_format: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lbproxy",
        "--log-level",
        log_level,
        "--log-format",
        log_format,
        "serve",
        "--config",
        config,
        "--loop",
        loop,
    ]
