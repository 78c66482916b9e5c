"""lbproxy as installed from a wheel, and without its `bench` extra.

The wheel test builds the wheel as pip does, installs it in a fresh venv outside the
checkout, and runs the installed `lbproxy` console script from another directory: the
hardware profiles and fleets must come from the package. The venv borrows the runtime
dependencies from this interpreter's site-packages (a path in a .pth file), so the test
needs no download; `.ci/run` does the same with a real dependency install.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(
    f"lbproxy/data/{kind}/{p.name}"
    for kind in ("hardware", "fleets")
    for p in (ROOT / "lbproxy" / "data" / kind).glob("*.yaml")
)
HINT = "pip install 'lbproxy[bench]'"


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_checkout_paths_and_shipped_names_read_the_same_files() -> None:
    assert "lbproxy/data/hardware/vendor-a.yaml" in SHIPPED
    assert "lbproxy/data/fleets/demo-3.yaml" in SHIPPED
    for kind in ("hardware", "fleets"):
        assert (ROOT / "configs" / kind).resolve() == (ROOT / "lbproxy" / "data" / kind)


@pytest.mark.packaging
def test_wheel_installed_outside_the_checkout_runs_demo_and_simulate(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    r = _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist),
              str(ROOT)], tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (wheel,) = dist.glob("lbproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [n for n in SHIPPED if n not in names] == []

    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    r = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet",
              "--no-deps", str(wheel)], tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path)
    (Path(site.stdout.strip()) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(py), "-c", "import lbproxy; print(lbproxy.__file__)"], elsewhere)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    lbproxy = str(venv / "bin" / "lbproxy")
    r = _run([lbproxy, "demo", "--workload", "--duration", "5"], elsewhere)
    assert r.returncode == 0, r.stderr
    assert "| cache-aware |" in r.stdout
    r = _run([lbproxy, "simulate", "--fleet", "demo-3", "--workload", "shared-prefix",
              "--rates", "2", "--duration", "5", "--quiet", "--out", "sim"], elsewhere)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "sim" / "results.json").exists()


def _without_bench_extra(*argv: str) -> subprocess.CompletedProcess[str]:
    """`lbproxy ARGV` in an interpreter where numpy, matplotlib and rich cannot be imported."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("numpy", "matplotlib", "rich"):
            sys.modules[name] = None  # import fails, as when the package is not installed
        sys.argv = ["lbproxy", *{list(argv)!r}]
        from lbproxy.cli import main
        sys.exit(main())
        """
    )
    return _run([sys.executable, "-c", code], ROOT, timeout=60)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--workload"],
        ["simulate", "--fleet", "demo-3", "--rates", "1"],
        ["bench", "--target", "http://127.0.0.1:9", "--rates", "1"],
    ],
)
def test_without_the_bench_extra_a_command_says_what_to_install(argv: list[str]) -> None:
    r = _without_bench_extra(*argv)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and HINT in r.stderr


def test_serve_sim_and_demo_need_no_bench_extra() -> None:
    for argv in (["sim", "--help"], ["demo", "--help"], ["check-config", "configs/example.yaml"]):
        r = _without_bench_extra(*argv)
        assert r.returncode == 0, (argv, r.stderr)


def test_runtime_dependencies_exclude_the_bench_stack() -> None:
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in reqs}

    assert names(meta["dependencies"]) & {"numpy", "matplotlib", "rich"} == set()
    assert {"numpy", "matplotlib", "rich"} <= names(meta["optional-dependencies"]["bench"])
    assert "multidict" in names(meta["dependencies"])
    assert "lbproxy[bench]" in meta["optional-dependencies"]["test"]


def test_a_shipped_fleet_by_name_or_by_its_checkout_path() -> None:
    from lbproxy.sim.fleet import load_fleet

    by_name = load_fleet("demo-3")
    by_path = load_fleet("configs/fleets/demo-3.yaml")
    assert by_name.backends == by_path.backends and len(by_name.backends) == 3
    r = _run([sys.executable, "-m", "lbproxy.cli", "sim", "--fleet", "demo-4"], ROOT, timeout=60)
    assert r.returncode == 2
    assert "shipped fleets: a-4, ab-12, abc-20, b-8, c-8, demo-3" in r.stderr
