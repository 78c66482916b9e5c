"""Config loading: the documented shape works; every error names file, key and problem."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lbproxy.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent

ISSUE_SHAPE = """
listen: {host: 127.0.0.1, port: 8080}
pools:
  - name: granite
    models: [granite-4.1-8b]     # optional: when absent, discovered from each backend's /v1/models
    routing: round-robin         # a built-in profile name, or an inline profile
    backends:
      - {url: "http://127.0.0.1:8001", vendor: vendor-a}
      - {url: "http://127.0.0.1:8002", vendor: vendor-b, labels: {gpu: mi300x}, weight: 2}
"""


def test_documented_shape_loads(tmp_path: Path) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(ISSUE_SHAPE)
    cfg = load_config(f)
    (pool,) = cfg.pools
    assert pool.models == ["granite-4.1-8b"]
    assert [b.vendor for b in pool.backends] == ["vendor-a", "vendor-b"]
    assert pool.backends[1].weight == 2 and pool.backends[1].labels == {"gpu": "mi300x"}
    assert pool.backends[0].name == "127.0.0.1:8001"  # named after the url by default


def test_shipped_configs_are_valid() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_BACKEND", "http://10.0.0.7:8000")
    data = {
        "pools": [
            {
                "name": "p",
                "backends": [{"url": "${LB_BACKEND}"}, {"url": "${LB_UNSET:-http://h:1}"}],
            }
        ]
    }
    cfg = parse_config(data, "x.yaml")
    assert [b.url for b in cfg.pools[0].backends] == ["http://10.0.0.7:8000", "http://h:1"]
    data["pools"][0]["backends"][1]["url"] = "${LB_UNSET}"
    with pytest.raises(ConfigError, match=r"x\.yaml: pools\[0\]\.backends\[1\]\.url: .*LB_UNSET"):
        parse_config(data, "x.yaml")


BAD = [
    ("pools: []", r"pools: must have at least 1 item, got 0"),
    ("pools: [{name: p, backends: [{url: 'ftp://x'}]}]", r"pools\[0\]\.backends\[0\]\.url: must"),
    ("pools: [{name: p, backends: [{url: 'http://x', weight: 0}]}]", r"backends\[0\]\.weight"),
    (
        "pools: [{name: p, backends: [{url: 'http://x', colour: red}]}]",
        r"backends\[0\]\.colour: unknown key",
    ),
    (
        "pools: [{name: p, routing: nope, backends: [{url: 'http://x'}]}]",
        r"pools\[0\]\.routing: unknown routing profile 'nope'",
    ),
    (
        "pools: [{name: p, routing: {picker: zig}, backends: [{url: 'http://x'}]}]",
        r"pools\[0\]\.routing: unknown picker 'zig'",
    ),
    (
        "pools: [{name: p, routing: {scorers: [{type: least-request, wieght: 1}]}, "
        "backends: [{url: 'http://x'}]}]",
        r"scorer 'least-request': wieght: unknown key; did you mean 'weight'\?",
    ),
    ("pools: [{name: p, routing: 5, backends: [{url: 'http://x'}]}]", r"routing: must be"),
    ("pools: [{name: p, backends: [{url: 'http://x'}, {url: 'http://x'}]}]", r"duplicate backend"),
    (
        "pools: [{name: p, models: [m], backends: [{url: 'http://x'}]}, "
        "{name: q, models: [m], backends: [{url: 'http://y'}]}]",
        r"pools\[1\]\.models: model 'm'",
    ),
    ("listen: {port: 99999}\npools: [{name: p, backends: [{url: 'http://x'}]}]", r"listen\.port"),
    ("pools: [{name: p, backends: [{url: 'http://x'}]}]\n  bad: [", r"line \d+, column \d+"),
    ("- just\n- a list", r"\(top level\): must be a mapping"),
]


@pytest.mark.parametrize(("text", "pattern"), BAD)
def test_errors_name_file_key_and_problem(tmp_path: Path, text: str, pattern: str) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: ")
    assert re.search(pattern, str(e.value)), str(e.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"/no/such\.yaml: cannot read"):
        load_config("/no/such.yaml")


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(ISSUE_SHAPE)
    r = subprocess.run(
        [sys.executable, "-m", "lbproxy.cli", "check-config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and "OK" in r.stdout and "pool granite: 2 backends" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [{name: p, backends: [{url: 'nope'}]}]")
    r = subprocess.run(
        [sys.executable, "-m", "lbproxy.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert f"{bad}: pools[0].backends[0].url: must start with http://" in r.stderr


def test_flow_control_as_written_in_the_issue_and_per_pool_overrides(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(
        "flow_control: {enabled: true, max_queue: 1000, max_wait: 30}\n"
        "pools:\n"
        "  - name: chat\n    models: [m]\n    backends: [{url: 'http://127.0.0.1:9'}]\n"
        "  - name: batch\n    models: [b]\n    backends: [{url: 'http://127.0.0.1:9'}]\n"
        "    flow_control: {max_wait: 120, limit: {target_itl: 0.2}}\n"
        "  - name: quiet\n    models: [o]\n    backends: [{url: 'http://127.0.0.1:9'}]\n"
        "    flow_control: {enabled: false}\n"
    )
    cfg = load_config(path)
    chat, batch, off = (p.flow() for p in cfg.pools)
    assert (chat.enabled, chat.max_queue, chat.max_wait) == (True, 1000, 30)
    assert (batch.max_wait, batch.max_queue, batch.limit.target_itl) == (120, 1000, 0.2)
    assert batch.limit.initial == chat.limit.initial  # the rest of `limit` is inherited
    assert off.enabled is False and chat.limit.type == "gradient"


@pytest.mark.parametrize(
    ("flow", "pattern"),
    [
        ("flow_control: {max_wait: 0}\n", r"flow\.yaml: flow_control\.max_wait: .*greater than 0"),
        ("flow_control: {limit: {type: magic}}\n", r"flow_control\.limit\.type: .*gradient"),
        (
            "flow_control: {wait: 3}\n",
            r"flow_control\.wait: unknown key; did you mean 'max_wait'\?",
        ),
    ],
)
def test_flow_control_errors_name_file_and_key(tmp_path: Path, flow: str, pattern: str) -> None:
    path = tmp_path / "flow.yaml"
    pool = "pools: [{name: p, models: [m], backends: [{url: 'http://127.0.0.1:9'}]}]\n"
    path.write_text(flow + pool)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)
    path.write_text(
        "pools: [{name: p, models: [m], backends: [{url: 'http://127.0.0.1:9'}],"
        " flow_control: {max_queue: -1}}]\n"
    )
    with pytest.raises(
        ConfigError, match=r"pools\[0\]\.flow_control\.max_queue: must be at least 0"
    ):
        load_config(path)
