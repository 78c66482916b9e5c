"""prefix-hash's footprint through the proxy: the output a request asks for (max_tokens,
max_completion_tokens) is charged to its backend's LRU, as the simulator charges it."""

from __future__ import annotations

import httpx

from tests.conftest import proxy_config
from tests.replicas_support import samples

PROMPT = "a shared system prompt, " * 32  # 768 bytes: hashed whole (the span is 16 KB)


def _entries(url: str) -> float:
    return sum(
        v
        for lab, v in samples(url, "lbproxy_prefix_index_entries")
        if lab["index"] == "prefix-hash"
    )


def test_the_output_a_request_asks_for_is_charged_to_its_backend(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], routing="cache-aware"))
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        sent = {"model": "fake-model", "prompt": PROMPT}
        assert c.post("/v1/completions", json=sent).status_code == 200
        held = _entries(proxy.url)  # the prompt's blocks; nothing past them
        assert held > 0
        # the same prompt again, asking for 1,000 tokens: its blocks are held already, so
        # the one new entry is the footprint of its output
        assert c.post("/v1/completions", json={**sent, "max_tokens": 1000}).status_code == 200
        assert _entries(proxy.url) == held + 1
        chat = {
            "model": "fake-model",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_completion_tokens": 1000,
        }
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        with_chat = _entries(proxy.url)
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert _entries(proxy.url) == with_chat + 1
