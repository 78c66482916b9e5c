"""`lbproxy serve` and `check-config` load only what a plain config needs.

The simulator, the benchmark tools and their heavy libraries (numpy, matplotlib, rich),
and zmq / tokenizers (KV events and precise-prefix routing only) must not be imported by
the proxy's start-up on a round-robin config; the other subcommands load when they run.
Each check runs in a fresh interpreter, as `lbproxy` does.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.conftest import proxy_config
from tests.ops_helpers import write_config
from tests.test_ops_shutdown import Serve

ROOT = Path(__file__).resolve().parent.parent

# Not needed to serve a round-robin pool.
HEAVY = (
    "matplotlib",
    "numpy",
    "rich",
    "zmq",
    "tokenizers",
    "jinja2",
    "lbproxy.sim",
    "lbproxy.bench",
    "lbproxy.demo",
    "lbproxy.tokenization",
)


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_serve_start_up_on_round_robin_imports_nothing_heavy(tmp_path: Path) -> None:
    # What `lbproxy serve` runs, up to listening (start-up hooks included: health checks,
    # scraper, KV subscriber), plus `check-config` on the same file.
    cfg = write_config(tmp_path / "rr.yaml", proxy_config(["http://127.0.0.1:9"]))
    modules = _modules_after(
        f"""
        import asyncio
        from lbproxy.cli import build_parser, main
        from lbproxy.config import load_config
        from lbproxy.proxy.app import start_proxy

        args = build_parser().parse_args(["serve", "--config", {str(cfg)!r}])
        assert main(["check-config", args.config]) == 0

        async def up_and_down():
            proxy = await start_proxy(load_config(args.config), port=0)
            await proxy.close()

        asyncio.run(up_and_down())
        """
    )
    assert "lbproxy.proxy.app" in modules  # the check did reach the proxy
    assert _heavy(modules) == []


def test_help_lists_every_subcommand_without_importing_them() -> None:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lbproxy.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    for line in ("serve", "check-config", "demo", "sim", "bench", "simulate"):
        assert f"    {line} " in r.stdout
    assert "open-loop load generator against a live target" in r.stdout
    imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if "|" in ln}
    assert "lbproxy.config" in imported  # (lbproxy.cli itself runs as __main__)
    assert _heavy(imported) == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sim", "--help"], "--kv-events-replay ENDPOINT"),
        (["demo", "--help"], "Without arguments it serves until Ctrl-C"),
        (["bench", "--help"], "--mix NAME:SHARE[:PRIORITY],..."),
        (["simulate", "--help"], "--capacity"),
        (["simulate"], "lbproxy simulate: error: the following arguments are required: --fleet"),
    ],
)
def test_a_subcommand_loads_its_options_when_used(argv: list[str], expected: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "lbproxy.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == (0 if "--help" in argv else 2), r.stderr
    assert expected in r.stdout + r.stderr


def test_no_module_imports_the_cli_back() -> None:
    """Subcommands run from `lbproxy.cli`; none of them may import it (a cycle). Only
    the entry points in front of it (`lbproxy.console`, `python -m lbproxy`) do."""
    offenders = []
    entry = {ROOT / "lbproxy" / n for n in ("cli.py", "console.py", "__main__.py")}
    for path in sorted((ROOT / "lbproxy").rglob("*.py")):
        if path in entry:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if "lbproxy.cli" in names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_simulator_and_signals_do_not_import_the_proxy() -> None:
    sim = [f"lbproxy.sim.{p.stem}" for p in (ROOT / "lbproxy" / "sim").glob("*.py")]
    signals = [f"lbproxy.signals.{p.stem}" for p in (ROOT / "lbproxy" / "signals").glob("*.py")]
    modules = _modules_after("\n".join(f"import {m}" for m in sorted(sim + signals)))
    assert "lbproxy.sim.server" in modules and "lbproxy.signals.scraper" in modules
    assert (
        sorted(m for m in modules if m == "lbproxy.proxy" or m.startswith("lbproxy.proxy.")) == []
    )


def _mapped_libraries(pid: int) -> set[str]:
    """Shared objects of numpy, zmq, tokenizers or matplotlib that process `pid` has loaded."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        for lib in ("numpy", "zmq", "pyzmq", "tokenizers", "matplotlib"):
            if f"/{lib}/" in line or f"/{lib}." in line:
                found.add(lib)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_lbproxy_serve_on_round_robin_answers_without_heavy_libraries(
    fake_backends, tmp_path: Path
) -> None:
    backend = fake_backends(1)[0]
    s = Serve(write_config(tmp_path / "rr.yaml", proxy_config([backend])))
    try:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        r = httpx.post(
            s.url + "/v1/completions",
            json={"model": "fake-model", "prompt": "hi", "max_tokens": 3},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        assert len(backend.received) == 1
        assert _mapped_libraries(s.proc.pid) == set()
    finally:
        s.stop()
