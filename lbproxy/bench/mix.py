"""Traffic classes: several tenants or priorities sharing one rate step.

`--mix light:1,heavy:5` splits each step's arrivals between a tenant `light` and one sending
5x as much; `--mix high:1:10,low:4:0` adds priorities (higher is served first). A request's
class is drawn from the shares with a seeded generator, so a live run and a simulated one
give each request index the same class. Live, a class is sent as the flow header
(`x-tenant`, the flow control's `flow_header`) and the priority header.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FLOW_HEADER = "x-tenant"
PRIORITY_HEADER = "x-lbproxy-priority"


@dataclass(frozen=True, slots=True)
class TrafficClass:
    name: str
    share: float  # relative to the other classes' shares
    priority: int = 0


def parse_mix(text: str) -> list[TrafficClass]:
    """`name:share[:priority],...` -> classes; ValueError says what is wrong."""
    classes: list[TrafficClass] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError(f"--mix items are name:share[:priority], got {item!r}")
        try:
            share = float(parts[1])
            priority = int(parts[2]) if len(parts) == 3 else 0
        except ValueError:
            raise ValueError(
                f"--mix {item!r}: share must be a number, priority an integer"
            ) from None
        if not share > 0:
            raise ValueError(f"--mix {item!r}: share must be > 0")
        if any(c.name == parts[0] for c in classes):
            raise ValueError(f"--mix: class {parts[0]!r} is listed twice")
        classes.append(TrafficClass(parts[0], share, priority))
    if not classes:
        raise ValueError("--mix lists no class")
    return classes


def class_sequence(
    classes: list[TrafficClass], first_index: int, n: int, seed: int
) -> list[TrafficClass]:
    """The class of requests first_index .. first_index + n - 1 (deterministic per index)."""
    weights = [c.share for c in classes]
    out = []
    for i in range(first_index, first_index + n):
        rng = random.Random(seed * 1_000_003 + i)
        out.append(rng.choices(classes, weights)[0])
    return out
