"""The `bench` extra (numpy, matplotlib, rich): checked before the commands that need it
import it, so that a runtime-only install says what to install instead of a traceback."""

from __future__ import annotations

import importlib.util
import sys

BENCH_MODULES = ("numpy", "matplotlib", "rich")
INSTALL_HINT = "pip install 'lbproxy[bench]'"


def missing_bench_modules() -> list[str]:
    """The modules of the bench extra that cannot be imported (found without importing)."""
    missing = []
    for name in BENCH_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked install
            found = False
        if not found:
            missing.append(name)
    return missing


def require_bench_extra(what: str) -> None:
    """Exit 2 with one line naming the install command when the bench extra is missing."""
    missing = missing_bench_modules()
    if missing:
        print(
            f"lbproxy {what} needs the bench extra (missing: {', '.join(missing)}); "
            f"install it with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        raise SystemExit(2)
