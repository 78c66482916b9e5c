"""P/D figures of a simulated rate step, as the live proxy's P/D metrics count them
(`lbproxy_pd_requests_total` by mode and reason, prefill time and decode TTFT by pair)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lbproxy.bench.stats import _pcts


@dataclass(slots=True)
class PDStats:
    reasons: Counter[str] = field(default_factory=Counter)  # the decision's reason
    pairs: Counter[str] = field(default_factory=Counter)  # "prefill->decode" decodes sent
    prefill_s: list[float] = field(default_factory=list)  # prefill sent -> answered
    decode_ttft_s: list[float] = field(default_factory=list)  # decode sent -> first token
    kv_transfer_s: list[float] = field(default_factory=list)  # the pull over the link

    def summary(self) -> dict[str, Any]:
        """The `pd` entry of a results.json step."""
        split = self.reasons.get("split", 0)
        p50, p90 = _pcts(self.prefill_s, (50, 90))
        d50, d90 = _pcts(self.decode_ttft_s, (50, 90))
        (k50,) = _pcts(self.kv_transfer_s, (50,))
        return {
            "disaggregated": split,
            "aggregated": sum(self.reasons.values()) - split,
            "reasons": dict(sorted(self.reasons.items())),
            "prefill_p50_s": p50,
            "prefill_p90_s": p90,
            "decode_ttft_p50_s": d50,
            "decode_ttft_p90_s": d90,
            "kv_transfer_p50_s": k50,
            "pairs": dict(sorted(self.pairs.items())),
        }
