"""Built-in routing plugins, one module each. Add a new one to BUILTIN_MODULES."""

from lbproxy.routing.plugins import (
    least_request,
    max_score,
    random_pick,
    round_robin,
    weighted_random,
)

BUILTIN_MODULES = [
    round_robin,
    random_pick,
    max_score,
    weighted_random,
    least_request,
]
