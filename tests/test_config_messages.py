"""`lbproxy check-config` lists every problem in plain words, and `serve` and a reload say
the same: unknown keys with a did-you-mean, no pydantic wording, correct plurals, a clear
message for an empty file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import proxy_config
from tests.ops_helpers import admin_headers, start_proxy_from_file, write_config

ROOT = Path(__file__).resolve().parent.parent

PYDANTIC_WORDING = (
    "Extra inputs are not permitted",
    "Input should be",
    "List should have",
    "Field required",
    "type=",
    "Value error",
    "pydantic",
    "(and ",
)

# Seven problems, in the order the schema meets them.
BROKEN = """\
listen: {port: fast}
pools:
  - name: p
    routing: {scorers: [{type: queue, wieght: 2}], pickr: max}
    backends:
      - {url: "http://127.0.0.1:9", wieght: 2}
      - {url: "http://127.0.0.1:10", weight: -1}
  - name: q
    backends: []
observability: {protect: everyone}
timeoutz: {}
"""
EXPECTED = [
    "listen.port: must be an integer, got text",
    "pools[0].routing.pickr: unknown key; did you mean 'picker'?",
    "pools[0].backends[0].wieght: unknown key; did you mean 'weight'?",
    "pools[0].backends[1].weight: must be greater than 0",
    "pools[1].backends: must have at least 1 item, got 0",
    "observability.protect: must be one of 'none', 'admin_token', 'metrics_token' or "
    "'admin_listener'",
    "timeoutz: unknown key; did you mean 'timeouts'?",
]


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", "check-config", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _no_pydantic_wording(text: str) -> None:
    for words in PYDANTIC_WORDING:
        assert words not in text, text


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.yaml"
    path.write_text(BROKEN)
    r = check_config(path)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines[0] == f"config error: {path}: 7 problems"
    assert [ln.strip() for ln in lines[1:]] == [f"{path}: {e}" for e in EXPECTED]
    _no_pydantic_wording(r.stderr)


def test_semantic_problems_are_all_listed_too(tmp_path: Path) -> None:
    # The schema is valid; the checks after it find two problems.
    path = tmp_path / "lbproxy.yaml"
    path.write_text(
        "pools:\n"
        "  - {name: p, routing: {scorers: [{type: least-request, wieght: 1}]},"
        " backends: [{url: 'http://x'}]}\n"
        "  - {name: p, backends: [{url: 'http://y'}]}\n"
    )
    r = check_config(path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"config error: {path}: 2 problems",
        f"  {path}: pools[0].routing: scorer 'least-request': wieght: unknown key; "
        "did you mean 'weight'?",
        f"  {path}: pools[1].name: duplicate pool name 'p'",
    ]


def test_one_problem_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.yaml"
    path.write_text("pools: [{name: p, backends: [{url: 'http://x', weight: 0}]}]\n")
    r = check_config(path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"config error: {path}: pools[0].backends[0].weight: must be greater than 0"
    )


def test_an_empty_file_says_so(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        r = check_config(path)
        assert r.returncode == 2
        assert r.stderr.strip() == (
            f"config error: {path}: the file is empty; a config needs at least a `pools:` "
            "list (see configs/example.yaml)"
        )


def test_serve_says_the_same(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.yaml"
    path.write_text(BROKEN)
    r = subprocess.run(
        [sys.executable, "-m", "lbproxy", "serve", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr == check_config(path).stderr


def test_a_reload_says_the_same(loop_thread, tmp_path: Path) -> None:
    cfg = proxy_config(["http://127.0.0.1:9"], admin={"token": "admin-secret"})
    cfg["health"] = {"active": False}
    path = write_config(tmp_path / "lbproxy.yaml", cfg)
    proxy = loop_thread.run(start_proxy_from_file(path))
    try:
        path.write_text(BROKEN)
        r = httpx.post(proxy.url + "/admin/reload", headers=admin_headers(), timeout=30)
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert message.splitlines()[0] == f"{path}: 7 problems"
        for expected in EXPECTED:
            assert f"  {path}: {expected}" in message.splitlines()
        _no_pydantic_wording(message)
    finally:
        loop_thread.run(proxy.close())


def test_every_unset_environment_variable_is_named(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.yaml"
    path.write_text(
        "pools:\n"
        "  - name: p\n"
        "    backends:\n"
        "      - {url: '${LBPROXY_TEST_UNSET_A}'}\n"
        "      - {url: 'http://x', api_key: '${LBPROXY_TEST_UNSET_B}'}\n"
    )
    r = check_config(path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"config error: {path}: 2 problems",
        f"  {path}: pools[0].backends[0].url: environment variable LBPROXY_TEST_UNSET_A is "
        "not set (use ${LBPROXY_TEST_UNSET_A:-default})",
        f"  {path}: pools[0].backends[1].api_key: environment variable LBPROXY_TEST_UNSET_B "
        "is not set (use ${LBPROXY_TEST_UNSET_B:-default})",
    ]
