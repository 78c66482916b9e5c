"""The `lbproxy` command line.

Only `serve` and `check-config` are defined here. The other subcommands (demo, sim, bench,
simulate) live with the code they run and are imported only when one of them is parsed
or its help printed, so `lbproxy serve` never loads the simulator, the benchmark tools
or their numpy/matplotlib/rich.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from lbproxy.config import ConfigError, load_config
from lbproxy.event_loop import run_loop

__all__ = ["build_parser", "main", "run_loop"]

# (name, one-line help for `lbproxy --help`, "module:function" that adds the options,
# description and `func` to the subcommand's parser)
_LAZY_SUBCOMMANDS = (
    (
        "demo",
        "a simulated fleet with lbproxy in front (no GPU, no config)",
        "lbproxy.demo:configure_parser",
    ),
    ("sim", "run simulated vLLM servers", "lbproxy.sim.cli:configure_parser"),
    (
        "bench",
        "open-loop load generator against a live target",
        "lbproxy.bench.cli:configure_bench_parser",
    ),
    (
        "simulate",
        "offline fleet simulator in virtual time",
        "lbproxy.bench.cli:configure_simulate_parser",
    ),
)


class _LazyParser(argparse.ArgumentParser):
    """A subcommand parser that imports its module and adds its arguments only when it is
    first used (parsing, usage, help)."""

    def __init__(self, *args: Any, configure: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._configure = configure

    def _load(self) -> None:
        if self._configure is None:
            return
        target, self._configure = self._configure, None
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(self)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._load()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._load()
        return super().format_usage()

    def format_help(self) -> str:
        self._load()
        return super().format_help()


def _cmd_serve(args: argparse.Namespace) -> int:
    from lbproxy import startup_hup

    startup_hup.hold()  # before the slow part (config, imports): a SIGHUP must not kill us
    from lbproxy.proxy.app import serve_forever

    cfg = load_config(args.config)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(
            serve_forever(cfg, host=args.host, port=args.port, config_path=args.config),
            args.loop,
        )
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for pool in cfg.pools:
        models = ", ".join(pool.models) if pool.models else "(discovered from backends)"
        routing = pool.routing if isinstance(pool.routing, str) else "inline profile"
        print(
            f"pool {pool.name}: {len(pool.backends)} backends, routing {routing}, models {models}"
        )
    print(f"{args.config}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbproxy", description="OpenAI-compatible, cache-aware load balancer for vLLM"
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_LazyParser)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--host", default=None, help="override listen.host")
    serve.add_argument("--port", type=int, default=None, help="override listen.port")
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    serve.set_defaults(func=_cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config")
    check.set_defaults(func=_cmd_check_config)

    for name, help_text, configure in _LAZY_SUBCOMMANDS:
        sub.add_parser(name, help=help_text, configure=configure)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
