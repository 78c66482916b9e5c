"""External routing plugins: a real distribution on PYTHONPATH, a real `lbproxy` process.

The distribution is what `pip install examples/external_plugin` leaves in site-packages:
the package, and a `*.dist-info` directory whose `entry_points.txt` is written from the
example's pyproject.toml.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx

from tests.conftest import proxy_config
from tests.ops_helpers import write_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "external_plugin"
GROUP = "lbproxy.plugins"


def install(site: Path, name: str, entry_points: dict[str, str], package: Path | None) -> Path:
    """A distribution `name` in `site` declaring `entry_points` in lbproxy's group."""
    dist = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = [f"[{GROUP}]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    if package is not None:
        shutil.copytree(package, site / package.name)
    return site


def install_example(site: Path) -> Path:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    eps = project["entry-points"][GROUP]
    return install(site, project["name"], eps, EXAMPLE / "lbproxy_example_plugin")


def env_with(site: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(site), str(ROOT)) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def check_config(cfg: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", "check-config", "--config", str(cfg)],
        cwd=ROOT,
        env=env_with(site),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def labelled_config(urls: list[str], scorer_type: str = "prefer-label") -> dict:
    cfg = proxy_config(urls, expose_backend_header=True)
    pool = cfg["pools"][0]
    pool["routing"] = {
        "scorers": [{"type": scorer_type, "weight": 1, "label": "zone", "value": "near"}],
        "picker": "max-score",
    }
    for i, b in enumerate(pool["backends"]):
        b["labels"] = {"zone": "near" if i == 2 else "far"}
    return cfg


def test_external_scorer_from_an_entry_point_routes_a_real_proxy(
    tmp_path: Path, fake_backends
) -> None:
    site = install_example(tmp_path / "site")
    backends = fake_backends(3)
    cfg = write_config(tmp_path / "lbproxy.yaml", labelled_config([b.url for b in backends]))
    r = check_config(cfg, site)
    assert r.returncode == 0, r.stderr + r.stdout

    proc = subprocess.Popen(
        [sys.executable, "-m", "lbproxy", "--log-level", "info", "serve", "--config",
         str(cfg), "--port", "0", "--loop", "asyncio"],
        cwd=ROOT, env=env_with(site), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            for line in list(lines):
                if m := re.search(r"lbproxy listening on (http://\S+)", line):
                    url = m.group(1)
            time.sleep(0.05)
        assert url is not None, "".join(lines)
        served = []
        with httpx.Client(timeout=30) as c:
            for i in range(12):
                resp = c.post(
                    url + "/v1/completions",
                    json={"model": "fake-model", "prompt": f"hello {i}", "max_tokens": 2},
                )
                assert resp.status_code == 200, resp.text
                served.append(resp.headers["x-lbproxy-backend"])
        # The external scorer alone decides: every request on the one "near" backend
        # (max-score would otherwise break the ties at random over all three).
        assert served == ["be2"] * 12, served
        assert len(backends[2].received) == 12
        assert not backends[0].received and not backends[1].received
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert 'lbproxy_routing_plugin_seconds_count{plugin="prefer-label",pool="main"}' in (
            metrics
        ), metrics
    finally:
        proc.kill()
        proc.wait(10)
        reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()


def test_a_name_clash_with_a_built_in_is_a_config_error_naming_both(tmp_path: Path) -> None:
    site = install_example(tmp_path / "site")
    install(site, "evil-plugins", {"prefix-hash": "evil_mod"}, None)
    cfg = write_config(tmp_path / "lbproxy.yaml", labelled_config(["http://127.0.0.1:9"] * 3))
    r = check_config(cfg, site)
    assert r.returncode == 2, r.stderr + r.stdout
    out = r.stderr + r.stdout
    assert "Traceback" not in out, out
    assert str(cfg) in out and "pools[0].routing" in out, out
    assert "'prefix-hash' is declared twice" in out, out
    assert "lbproxy.routing.plugins.prefix_hash" in out, out
    assert "evil-plugins" in out and "prefix-hash = evil_mod" in out, out


def test_a_broken_plugin_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install(site, "broken-plugins", {"broken-scorer": "broken_pkg.scorer"}, None)
    pkg = site / "broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scorer.py").write_text("import no_such_module_anywhere\n")
    cfg = write_config(
        tmp_path / "lbproxy.yaml",
        labelled_config(["http://127.0.0.1:9"] * 3, scorer_type="broken-scorer"),
    )
    r = check_config(cfg, site)
    out = r.stderr + r.stdout
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    assert str(cfg) in out and "pools[0].routing" in out, out
    assert "'broken-scorer'" in out and "broken-plugins" in out, out
    assert "cannot be imported: ModuleNotFoundError" in out, out


def test_an_unknown_plugin_still_lists_the_known_ones(tmp_path: Path) -> None:
    site = install_example(tmp_path / "site")
    cfg = write_config(
        tmp_path / "lbproxy.yaml",
        labelled_config(["http://127.0.0.1:9"] * 3, scorer_type="no-such-scorer"),
    )
    r = check_config(cfg, site)
    out = r.stderr + r.stdout
    assert r.returncode == 2, out
    assert "unknown scorer 'no-such-scorer'" in out and "prefix-hash" in out, out
