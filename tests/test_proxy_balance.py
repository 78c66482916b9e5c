"""Round-robin spreads exactly; weights are honoured; least-request follows load."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from tests.conftest import proxy_config

# Client-facing: the same answers from lbproxy's own server and from its ASGI face.
PROXY_FACES = ("native", "asgi")

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 1}


@pytest.mark.parametrize(
    ("n", "weights", "requests", "expected"),
    [
        (3, None, 300, [100, 100, 100]),
        (2, [1, 2], 300, [100, 200]),
        (3, [1, 1, 3], 50, [10, 10, 30]),
    ],
)
def test_round_robin_counts(fake_backends, run_proxy, n, weights, requests, expected) -> None:
    backends = fake_backends(n)
    cfg = proxy_config(backends, **({"weights": weights} if weights else {}))
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url) as c:
        for _ in range(requests):
            assert c.post("/v1/completions", json=BODY).status_code == 200
    assert [len(b.received) for b in backends] == expected


def test_random_and_least_request_serve_everything(fake_backends, run_proxy) -> None:
    for profile in ("random", "least-request"):
        backends = fake_backends(3)
        proxy = run_proxy(proxy_config(backends, routing=profile))
        with httpx.Client(base_url=proxy.url) as c:
            served = Counter(
                c.post("/v1/completions", json=BODY).headers["x-served-by"] for _ in range(60)
            )
        assert sum(served.values()) == 60
        # sequential requests leave nothing in flight, so ties at random spread the load
        assert len(served) == 3, (profile, served)
