"""The admin API host-wide under `serve --workers N` (drain, undrain, reload, backends).

Files in the workers' directory (the one worker_metrics uses; the supervisor deletes a
dead worker's `*-<i>-<pid>*` files):

- `host-admin.json`: the host's drain set with a version, and a reload generation. Any
  worker that takes an admin request changes it: read, change, write a temporary file and
  rename it (readers see a whole file), all under an flock of `host-admin.lock` so that
  two workers changing it at once both count.
- `status-<i>-<pid>.json`: what worker i applied (drain version, last reload generation
  and its result) and its backends' in-flight counts, limits and drain flags; written
  on each change and every STATUS_INTERVAL. A worker writes it first once it handles
  SIGUSR1: only a worker with a status file is signalled (SIGUSR1's default ends a process).

A change: the receiving worker writes the host file, applies it itself, sends SIGUSR1 to
the others, which re-read the file, apply it and rewrite their status; the receiving
worker polls their status files until each confirms or CONFIRM_DEADLINE passes (a worker
that exits meanwhile counts as exited: its replacement reads the file when it starts). A
worker also re-reads the file every STATUS_INTERVAL (a signal lost is caught up there)
and before it listens (a restarted worker starts with the host's drain set). Reload: the
receiving worker reloads first (an invalid file: 400, nothing else happens), then bumps
the generation; the others reload and record the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from lbproxy.proxy.errors import ProxyError

if TYPE_CHECKING:
    from lbproxy.proxy.admin import AdminAPI

log = logging.getLogger("lbproxy.admin")

HOST_FILE = "host-admin.json"
LOCK_FILE = "host-admin.lock"
STATUS_INTERVAL = 1.0  # the others' figures in GET /admin/backends are at most this old
CONFIRM_DEADLINE = 2.0  # how long a change waits for the other workers
STALE_AFTER = 10.0  # a status file older than this (a stopped worker) is left out
_POLL = 0.02

Backend = tuple[str, str]  # (pool, name)


@dataclass
class HostState:
    version: int = 0  # of the drain set
    drained: set[Backend] = field(default_factory=set)
    reload: int = 0  # reload generation
    reload_at: float = 0.0  # wall clock of the last reload request

    @classmethod
    def read(cls, directory: Path) -> HostState:
        try:
            raw = orjson.loads((directory / HOST_FILE).read_bytes())
        except FileNotFoundError:
            return cls()
        return cls(
            raw["version"],
            {(p, n) for p, n in raw["drained"]},
            raw["reload"],
            raw["reload_at"],
        )

    def write(self, directory: Path) -> None:
        data = {
            "version": self.version,
            "drained": sorted(self.drained),
            "reload": self.reload,
            "reload_at": self.reload_at,
        }
        write_atomic(directory / HOST_FILE, data)


def write_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(data))
    tmp.replace(path)


class HostNotConfirmed(ProxyError):
    """503: a host-wide change that not every worker confirmed in time. The body is the
    OpenAI-shaped error plus `workers`, each worker's answer."""

    status, type, code = 503, "service_unavailable", "workers_not_confirmed"

    def __init__(self, message: str, workers: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.workers = workers

    def body(self) -> bytes:
        data = orjson.loads(super().body())
        if self.workers is not None:
            data["workers"] = self.workers
        return orjson.dumps(data)


async def update(directory: Path, change: Callable[[HostState], None]) -> HostState:
    """Read, change and write the host file under its lock. The lock is taken without
    blocking the loop (a worker stopped while holding it must not hang this one); once
    held, no await until it is released."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONFIRM_DEADLINE
    with open(directory / LOCK_FILE, "a") as lock:
        while True:
            try:  # released when the file closes, or its holder dies
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if loop.time() >= deadline:
                    raise HostNotConfirmed(
                        f"another worker holds the host admin lock for over "
                        f"{CONFIRM_DEADLINE:g} s: nothing changed, retry"
                    ) from None
                await asyncio.sleep(_POLL)
        state = HostState.read(directory)
        change(state)
        state.write(directory)
        return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HostAdmin:
    """One worker's side of the host-wide admin API."""

    def __init__(
        self, api: AdminAPI, directory: Path, index: int, n: int, spawned_at: float
    ) -> None:
        self.api = api
        self.dir = directory
        self.index = index
        self.n = n
        self.spawned_at = spawned_at  # wall clock: when the supervisor started this process
        self.pid = os.getpid()
        self.status_path = directory / f"status-{index}-{self.pid}.json"
        self.applied = -1  # host drain version applied
        self.drained: set[Backend] = set()
        self.reload_gen = 0
        self.reload_result: dict[str, Any] = {"status": "started"}
        self._reloading: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Before the worker listens: handle SIGUSR1, announce it, apply the host's state."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self._on_signal)
        self.write_status()  # from now on the others may signal this worker
        state = HostState.read(self.dir)
        self.reload_gen = state.reload  # the config file was read at start ...
        if state.reload_at > self.spawned_at:  # ... unless a reload came after the spawn
            self.reload_gen -= 1
        self.check()
        self._task = loop.create_task(self._keep())

    async def stop(self) -> None:
        self.status_path.unlink(missing_ok=True)  # no longer signalled ...
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # ... and one already sent is harmless
        for task in (self._task, self._reloading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            self._on_signal()

    def _on_signal(self) -> None:
        try:
            self.check()
        except Exception as e:  # the directory went (supervisor ended), a bad file
            log.debug("host admin: %s", e)

    # ---- this worker applies the host state ---------------------------------------------

    def check(self) -> None:
        """Re-read the host file, apply what changed, write this worker's status."""
        state = HostState.read(self.dir)
        if state.version != self.applied:
            self.drained = state.drained
            self.applied = state.version
            self.apply_drained()
        if state.reload > self.reload_gen and self._reloading is None:
            self.reload_gen = state.reload
            self.reload_result = {"status": "reloading"}  # in this status write already
            self._reloading = asyncio.get_running_loop().create_task(
                self._reload(state.reload), name="lbproxy-host-reload"
            )
        self.write_status()

    def apply_drained(self) -> None:
        """The host drain set on this worker's backends (also after a reload's swap)."""
        for ep in self.api.st.runtime.pools.endpoints():
            self.api.mark_draining(ep, (ep.pool, ep.name) in self.drained)

    async def _reload(self, generation: int) -> None:
        try:
            result = await self.api.reload()
            self.reload_result = {
                "status": "reloaded",
                "restart_required": result["restart_required"],
            }
        except Exception as e:  # a ConfigError, or the file changed again in between
            log.error("host reload: config not reloaded, the running one stays: %s", e)
            self.reload_result = {"status": "failed", "error": str(e)}
        finally:
            self._reloading = None
        self._on_signal()  # writes the status; a newer generation meanwhile reloads again

    def write_status(self) -> None:
        pools = self.api.st.runtime.pools
        backends = []
        for ep in pools.endpoints():
            gate = pools.gate_of(ep)
            backends.append(
                {
                    "pool": ep.pool,
                    "name": ep.name,
                    "in_flight": ep.in_flight,
                    "draining": ep.draining,
                    "concurrency_limit": gate.controller.limit_of(ep) if gate else None,
                }
            )
        status = {
            "worker": self.index,
            "pid": self.pid,
            "time": time.time(),
            "applied": self.applied,
            "reload": {"generation": self.reload_gen, **self.reload_result},
            "backends": backends,
        }
        write_atomic(self.status_path, status)

    # ---- this worker changes the host state ---------------------------------------------

    async def set_draining(self, pool: str, name: str, draining: bool) -> list[dict[str, Any]]:
        """Change the host's drain set; each worker's answer (see `confirm`)."""

        def change(s: HostState) -> None:
            (s.drained.add if draining else s.drained.discard)((pool, name))
            s.version += 1

        state = await update(self.dir, change)
        self.check()
        return await self.confirm(lambda st: st["applied"] >= state.version)

    async def reload(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Reload here (ConfigError: nothing else happens), then in the other workers."""
        result = await self.api.reload()

        def bump(s: HostState) -> None:
            s.reload += 1
            s.reload_at = time.time()

        state = await update(self.dir, bump)
        self.reload_gen = max(self.reload_gen, state.reload)  # no await since: not reloaded twice
        self.reload_result = {"status": "reloaded", "restart_required": result["restart_required"]}
        self.write_status()

        def reloaded(st: dict[str, Any]) -> bool:
            r = st["reload"]
            return bool(r["generation"] >= state.reload and r["status"] != "reloading")

        return result, await self.confirm(reloaded)

    async def confirm(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Signal the other workers and wait (CONFIRM_DEADLINE) until `done(status)` for
        each. One entry per worker: status confirmed, not_confirmed, exited (its
        replacement reads the host file at start) or starting (no status file yet: it
        reads the host file before it listens); a reload's entries add its result."""
        loop = asyncio.get_running_loop()
        pending: dict[Path, tuple[int, int]] = {}
        for path, index, pid in self._status_files():
            if path == self.status_path:
                continue
            try:
                os.kill(pid, signal.SIGUSR1)
                pending[path] = (index, pid)
            except ProcessLookupError:
                pass  # reported as exited below if no other process has its index
        out: dict[int, dict[str, Any]] = {
            self.index: {"worker": self.index, "pid": self.pid, "status": "confirmed"}
        }
        out[self.index].update(self._reload_fields(self._own_status()))
        deadline = loop.time() + CONFIRM_DEADLINE
        while True:
            for path, (index, pid) in list(pending.items()):
                st = _read_status(path)
                if st is not None and done(st):
                    entry = {"worker": index, "pid": pid, "status": "confirmed"}
                    out[index] = {**entry, **self._reload_fields(st)}
                elif not path.exists() or not _alive(pid):
                    out[index] = {"worker": index, "pid": pid, "status": "exited"}
                else:
                    continue
                del pending[path]
            if not pending or loop.time() >= deadline:
                break
            await asyncio.sleep(_POLL)
        for index, pid in pending.values():
            out[index] = {"worker": index, "pid": pid, "status": "not_confirmed"}
        for index in range(self.n):
            out.setdefault(index, {"worker": index, "pid": None, "status": "starting"})
        return [out[i] for i in sorted(out)]

    def _own_status(self) -> dict[str, Any]:
        return {"reload": {"generation": self.reload_gen, **self.reload_result}}

    @staticmethod
    def _reload_fields(st: dict[str, Any]) -> dict[str, Any]:
        return {"reload": st["reload"]} if "reload" in st else {}

    # ---- host-wide figures --------------------------------------------------------------

    def host_backends(self, local: list[dict[str, Any]]) -> dict[str, Any]:
        """GET /admin/backends: `in_flight` summed over the workers, and each worker's
        in_flight, draining and concurrency_limit under `workers` (this worker's live,
        the others' at most STATUS_INTERVAL old)."""
        self.write_status()
        now = time.time()
        per: dict[Backend, dict[str, Any]] = {}
        workers: dict[str, Any] = {}
        for path, index, pid in self._status_files():
            st = _read_status(path)
            if st is None or now - st["time"] > STALE_AFTER:
                continue
            age = round(max(0.0, now - st["time"]), 3)
            workers[str(index)] = {"pid": pid, "age_s": age}
            for b in st["backends"]:
                per.setdefault((b["pool"], b["name"]), {})[str(index)] = {
                    "pid": pid,
                    "in_flight": b["in_flight"],
                    "draining": b["draining"],
                    "concurrency_limit": b["concurrency_limit"],
                    "age_s": age,
                }
        for b in local:
            by_worker = per.get((b["pool"], b["name"]), {})
            b["workers"] = by_worker
            b["in_flight"] = sum(w["in_flight"] for w in by_worker.values())
        return {"object": "list", "data": local, "workers": workers, "answered_by": self.me()}

    def me(self) -> dict[str, int]:
        """The worker that answers: the other fields of an answer (health, metrics) are its."""
        return {"worker": self.index, "pid": self.pid}

    def _status_files(self) -> list[tuple[Path, int, int]]:
        out = []
        for path in self.dir.glob("status-*-*.json"):
            _, index, pid = path.stem.split("-")
            out.append((path, int(index), int(pid)))
        return out


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data
