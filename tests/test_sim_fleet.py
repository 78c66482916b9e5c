"""Fleet YAML loading and validation, starting a fleet in one process, and `lbproxy sim`."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lbproxy.sim.fleet import load_fleet, parse_fleet, start_fleet

ROOT = Path(__file__).resolve().parent.parent


def test_demo_fleet() -> None:
    fleet = load_fleet(ROOT / "configs/fleets/demo-3.yaml")
    assert fleet.model == "granite-4.1-8b"
    assert [b.name for b in fleet.backends] == ["sim-a", "sim-b", "sim-c"]
    assert [b.profile.name for b in fleet.backends] == ["vendor-a", "vendor-b", "vendor-c"]
    assert [b.port for b in fleet.backends] == [8001, 8002, 8003]
    assert len({b.kv_events_topic for b in fleet.backends}) == 3


def test_count_expands_an_entry() -> None:
    fleet = parse_fleet(
        {
            "model": "m",
            "speed": 4,
            "backends": [
                {"name": "a", "profile": "vendor-a", "port": 9000},
                {
                    "name": "b",
                    "profile": "vendor-b",
                    "port": 9001,
                    "count": 3,
                    "kv_events": "tcp://*:5600",
                    "stream_interval": 2,
                },
                {
                    "name": "c",
                    "profile": "vendor-c",
                    "port": 9004,
                    "kv_events": "tcp://127.0.0.1:5557",
                    "count": 2,
                    "kv_events_topic": "t",
                },
            ],
        }
    )
    b = fleet.backends
    assert [x.name for x in b] == ["a", "b-0", "b-1", "b-2", "c-0", "c-1"]
    assert [x.port for x in b] == [9000, 9001, 9002, 9003, 9004, 9005]
    # binding endpoints get consecutive ports, connecting ones stay (topics tell them apart)
    assert [x.kv_events for x in b[1:4]] == ["tcp://*:5600", "tcp://*:5601", "tcp://*:5602"]
    assert [x.kv_events for x in b[4:]] == ["tcp://127.0.0.1:5557"] * 2
    assert [x.kv_events_topic for x in b] == ["kv-events-a", "kv-events-b-0", "kv-events-b-1",
                                              "kv-events-b-2", "t-0", "t-1"]  # fmt: skip
    assert [x.stream_interval for x in b] == [1, 2, 2, 2, 1, 1]
    assert all(x.speed == 4.0 for x in b)
    assert len({x.seed for x in b}) == len(b)


BACKEND = {"name": "a", "profile": "vendor-a", "port": 9000}


def one(**entry: Any) -> dict[str, Any]:
    """A fleet of one backend whose entry is BACKEND updated with `entry`."""
    return {"model": "m", "backends": [{**BACKEND, **entry}]}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "expected a mapping"),
        ({"backends": [BACKEND]}, "model: required key is missing"),
        ({"model": "m"}, "backends: must be a non-empty list"),
        ({**one(), "extra": 1}, "extra: unknown key"),
        (one(colour="red"), r"backends\[0\]\.colour: unknown key"),
        ({"model": "m", "backends": [{"name": "a", "port": 1}]}, r"backends\[0\]\.profile: req"),
        (one(profile="vendor-x"), r"backends\[0\]\.profile: .*vendor-x"),
        (one(port="80"), r"backends\[0\]\.port: must be an integer"),
        (one(port=70000), r"backends\[0\]\.port: must be <= 65535"),
        (one(count=0), r"backends\[0\]\.count: must be >= 1"),
        ({**one(), "speed": 0}, "speed: must be a number > 0"),
        ({"model": "m", "backends": [BACKEND, BACKEND]}, "name 'a' is used twice"),
        ({"model": "m", "backends": [BACKEND, {**BACKEND, "name": "b"}]}, "port 9000 is used"),
    ],
)
def test_fleet_errors_name_the_key(data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_fleet(data, "fleet.yaml")
    assert str(info.value).startswith("fleet.yaml: ")


def test_load_fleet_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing\.yaml: cannot read"):
        load_fleet(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML"):
        load_fleet(bad)


def sim_driver_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("sim-driver")]


async def test_start_fleet_serves_every_backend(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({
        "model": "tiny", "speed": 50,
        "backends": [{"name": "a", "profile": "vendor-a", "port": 0, "count": 2},
                     {"name": "c", "profile": "vendor-c", "port": 0}],
    }))  # fmt: skip
    handles = await start_fleet(path)
    try:
        assert len(handles) == 3 and len({h.port for h in handles}) == 3
        async with aiohttp.ClientSession() as http:
            for h, block in zip(handles, ("16", "16", "128"), strict=True):
                async with http.get(h.url + "/v1/models") as r:
                    assert (await r.json())["data"][0]["id"] == "tiny"
                async with http.get(h.url + "/metrics") as r:
                    assert f'block_size="{block}"' in await r.text()
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
                async with http.post(h.url + "/v1/completions", json=body) as r:
                    assert (await r.json())["usage"]["completion_tokens"] == 3
    finally:
        for h in handles:
            await h.close()
    assert sim_driver_tasks() == []


async def test_start_fleet_failure_closes_started_backends() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet = parse_fleet({"model": "m", "backends": [
            {"name": "ok", "profile": "vendor-b", "port": 0},
            {"name": "clash", "profile": "vendor-b", "port": port},
        ]}, "f.yaml")  # fmt: skip
        with pytest.raises(OSError, match=r"f\.yaml: backend 'clash'"):
            await start_fleet(fleet)
    assert sim_driver_tasks() == []


# --------------------------------------------------------------------------- the CLI
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbproxy.cli", "sim", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_cli_rejects_bad_arguments() -> None:
    r = run_cli("--port", "1")
    assert r.returncode == 2 and "--model is required" in r.stderr
    r = run_cli("--fleet", "configs/fleets/demo-3.yaml", "--model", "x")
    assert r.returncode == 2 and "--model cannot be used with --fleet" in r.stderr
    r = run_cli("--model", "m", "--profile", "vendor-x", "--port", str(free_port()))
    assert r.returncode == 2 and "vendor-x" in r.stderr


def test_cli_serves_until_sigint() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbproxy.cli", "sim", "--port", str(port), "--profile", "vendor-a",
         "--model", "m", "--speed", "20", "--loop", "asyncio"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"m on http://127.0.0.1:{port} (vendor-a, speed 20)" in banner

        async def use() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http:
                body = {"model": "m", "prompt": "hello", "max_tokens": 4}
                async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                    return await r.json()

        assert asyncio.run(use())["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
