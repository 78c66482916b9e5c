"""The `lbproxy` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from lbproxy.bench.cli import add_bench_parsers
from lbproxy.config import ConfigError, load_config
from lbproxy.demo import add_demo_parser
from lbproxy.sim.cli import add_sim_parser


def run_loop(coro: Coroutine[Any, Any, None], loop: str = "auto") -> None:
    """Run `coro` on uvloop when asked for or, with "auto", when it is installed."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError as e:
            if loop == "uvloop":
                raise SystemExit("--loop uvloop: uvloop is not installed") from e
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def _cmd_serve(args: argparse.Namespace) -> int:
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
    sub = parser.add_subparsers(dest="command", required=True)

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

    add_demo_parser(sub)
    add_sim_parser(sub)
    add_bench_parsers(sub)
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
