"""The hardware profiles and fleets shipped inside the package (`lbproxy/data/`).

They are package data so that a wheel or `pip install .` has them; in a checkout,
`configs/hardware` and `configs/fleets` are symlinks to the same directories, so the
documented paths (`configs/fleets/abc-20.yaml`) and the shipped names (`abc-20`) read the
same files.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

__all__ = ["shipped_file", "shipped_names"]


def _dir(kind: str) -> Traversable:
    return resources.files("lbproxy") / "data" / kind


def shipped_names(kind: str) -> list[str]:
    """Names (file stems) of the shipped `kind` ("hardware" or "fleets"), sorted."""
    return sorted(
        f.name.removesuffix(".yaml") for f in _dir(kind).iterdir() if f.name.endswith(".yaml")
    )


def shipped_file(kind: str, name: str) -> Traversable:
    """The shipped `kind` file called `name` (it may not exist: reading it then fails)."""
    return _dir(kind) / f"{name}.yaml"


def is_bare_name(name_or_path: str) -> bool:
    """A shipped name (`vendor-a`) rather than a file path (`x.yaml`, `dir/x`)."""
    return not name_or_path.endswith((".yaml", ".yml")) and "/" not in name_or_path
