"""lbproxy: an OpenAI-compatible, cache-aware load balancer for vLLM fleets."""

__version__ = "0.1.0"
