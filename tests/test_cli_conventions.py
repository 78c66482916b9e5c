"""What a user expects of the `lbproxy` command: --version, `python -m lbproxy`, global
options before or after the subcommand, environment variables, JSON logs, a description
on every subcommand's help, and one clear line when the port is taken.

Every test runs `python -m lbproxy ...` in a fresh process, as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import lbproxy
from tests.conftest import proxy_config
from tests.ops_helpers import write_config

ROOT = Path(__file__).resolve().parent.parent
# Nothing listens on port 9 (discard): scrapes and health checks of it fail and log.
DEAD_BACKEND = "http://127.0.0.1:9"


def lbproxy_cmd(*argv: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_clean_env(), **(env or {})},
        check=False,
    )


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBPROXY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "lbproxy.yaml", proxy_config([DEAD_BACKEND]))


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a listening socket holds."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_version_and_python_dash_m() -> None:
    r = lbproxy_cmd("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"lbproxy {lbproxy.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "check-config", "{cfg}"],
        ["check-config", "{cfg}", "--log-level", "debug"],
        ["check-config", "--log-format", "json", "--config", "{cfg}"],
        ["--log-format", "json", "check-config", "--log-level", "warning", "{cfg}"],
    ],
)
def test_global_options_before_or_after_the_subcommand(config: Path, argv: list[str]) -> None:
    r = lbproxy_cmd(*(a.replace("{cfg}", str(config)) for a in argv))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"{config}: OK")


def test_bad_log_level_is_a_usage_error(config: Path) -> None:
    r = lbproxy_cmd("check-config", str(config), "--log-level", "loud")
    assert r.returncode == 2
    assert "--log-level" in r.stderr and "invalid choice" in r.stderr


def test_check_config_takes_the_path_as_option_positional_or_environment(
    config: Path, tmp_path: Path
) -> None:
    for argv, env in (
        (["check-config", "--config", str(config)], None),
        (["check-config", str(config)], None),
        (["check-config"], {"LBPROXY_CONFIG": str(config)}),
        # the command line wins over the environment
        (["check-config", str(config)], {"LBPROXY_CONFIG": str(tmp_path / "absent.yaml")}),
    ):
        r = lbproxy_cmd(*argv, env=env)
        assert r.returncode == 0, (argv, r.stderr)
        assert f"{config}: OK" in r.stdout
    r = lbproxy_cmd("check-config")
    assert r.returncode == 2
    assert "no config file: give --config PATH or set LBPROXY_CONFIG" in r.stderr
    r = lbproxy_cmd("check-config", str(config), "--config", str(tmp_path / "other.yaml"))
    assert r.returncode == 2 and "two config files given" in r.stderr


def test_bad_log_level_in_the_environment_is_named(config: Path) -> None:
    r = lbproxy_cmd("check-config", str(config), env={"LBPROXY_LOG_LEVEL": "loud"})
    assert r.returncode == 2
    assert "LBPROXY_LOG_LEVEL=loud: must be one of debug, info, warning" in r.stderr
    r = lbproxy_cmd("check-config", str(config), env={"LBPROXY_LOG_FORMAT": "xml"})
    assert r.returncode == 2
    assert "LBPROXY_LOG_FORMAT=xml: must be one of text, json" in r.stderr


def test_every_subcommand_help_has_a_description() -> None:
    for sub, words in (
        ("serve", "SIGHUP re-reads the config file"),
        ("check-config", "list every problem"),
        ("demo", "simulated heterogeneous fleet"),
        ("sim", "simulated engine"),
        ("bench", "Poisson arrivals"),
        ("simulate", "virtual time"),
    ):
        r = lbproxy_cmd(sub, "--help")
        assert r.returncode == 0, r.stderr
        description = r.stdout.split("\n\n")[1]  # after the usage block
        assert words in " ".join(description.split()), (sub, r.stdout[:400])
        assert "--log-level LEVEL" in r.stdout and "--log-format FORMAT" in r.stdout


class ServeProcess:
    """`python -m lbproxy serve` on a free port, stderr to a file."""

    def __init__(self, tmp_path: Path, argv: list[str], env: dict[str, str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.err_path = tmp_path / "stderr.log"
        self._err = self.err_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lbproxy", *argv, "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            env={**_clean_env(), **env},
        )

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.err_path.read_text()
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"not serving after {timeout}s: {self.err_path.read_text()}")

    def stop(self) -> str:
        """SIGTERM, wait, and the whole stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._err.close()
        return self.err_path.read_text()


def test_serve_json_logs_one_object_per_line(config: Path, tmp_path: Path) -> None:
    s = ServeProcess(tmp_path, ["serve", "--config", str(config), "--log-format", "json"], {})
    s.wait_healthy()
    err = s.stop()
    lines = err.splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(records) >= 3, err
    for rec in records:
        assert set(rec) >= {"time", "level", "logger", "message"}, rec
        assert rec["time"].startswith("20") and rec["time"].endswith("+00:00")
    messages = [r["message"] for r in records]
    assert any(m.startswith("lbproxy listening on http://127.0.0.1:") for m in messages)
    assert any(r["level"] == "warning" and "127.0.0.1:9" in r["message"] for r in records)


def test_serve_reads_config_and_log_level_from_the_environment(
    config: Path, tmp_path: Path
) -> None:
    env = {"LBPROXY_CONFIG": str(config), "LBPROXY_LOG_LEVEL": "error"}
    s = ServeProcess(tmp_path, ["serve"], env)
    s.wait_healthy()
    err = s.stop()
    assert s.proc.returncode == 0
    assert "listening" not in err and "WARNING" not in err, err  # info and warnings hidden
    # the command line wins over the environment
    s = ServeProcess(tmp_path, ["serve", "--log-level", "info"], env)
    s.wait_healthy()
    assert "lbproxy listening on" in s.stop()


def _assert_one_clear_line(r: subprocess.CompletedProcess[str], port: int, cmd: str) -> None:
    assert r.returncode != 0
    expected = f"port {port} on 127.0.0.1 is already in use"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert lines[0].startswith(f"lbproxy {cmd}: ")


def test_serve_on_a_taken_port_says_so_in_one_line(config: Path, taken_port: int) -> None:
    r = lbproxy_cmd("serve", "--config", str(config), "--port", str(taken_port))
    _assert_one_clear_line(r, taken_port, "serve")


def test_serve_on_a_taken_admin_port_says_so(tmp_path: Path, taken_port: int) -> None:
    cfg = proxy_config([DEAD_BACKEND], admin={"token": "t" * 16, "port": taken_port})
    path = write_config(tmp_path / "admin.yaml", cfg)
    r = lbproxy_cmd("serve", "--config", str(path))
    _assert_one_clear_line(r, taken_port, "serve")


def test_sim_on_a_taken_port_says_so_in_one_line(taken_port: int) -> None:
    r = lbproxy_cmd("sim", "--model", "m", "--port", str(taken_port), "--kv-events", "tcp://*:*")
    _assert_one_clear_line(r, taken_port, "sim")


def test_demo_on_a_taken_port_says_so_in_one_line(taken_port: int) -> None:
    r = lbproxy_cmd("demo", "--port", str(taken_port))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert f"port {taken_port} on 127.0.0.1 is already in use" in lines[0]
