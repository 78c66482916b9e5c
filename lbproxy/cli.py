"""The `lbproxy` command line.

Only `serve` and `check-config` are defined here. The other subcommands (demo, sim, bench,
simulate, plan) live with the code they run and are imported only when one of them is parsed
or its help printed, so `lbproxy serve` never loads the simulator, the benchmark tools
or their numpy/matplotlib/rich.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from lbproxy import __version__
from lbproxy.config import ConfigError, load_config
from lbproxy.event_loop import run_loop
from lbproxy.log_format import configure_logging

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
    (
        "plan",
        "what-if planner: prefill/decode role layouts of a fleet, by simulation",
        "lbproxy.bench.plan_cli:configure_plan_parser",
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


CONFIG_ENV = "LBPROXY_CONFIG"
LOG_LEVEL_ENV = "LBPROXY_LOG_LEVEL"
LOG_FORMAT_ENV = "LBPROXY_LOG_FORMAT"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")


def _config_path(args: argparse.Namespace) -> str:
    """--config (or check-config's positional form), else $LBPROXY_CONFIG; a usage error
    (exit 2) without any."""
    parser: argparse.ArgumentParser = args.subparser
    given = [p for p in (getattr(args, "config_pos", None), args.config) if p]
    if len(given) == 2 and given[0] != given[1]:
        parser.error(f"two config files given: {given[0]} and {given[1]}")
    path = given[0] if given else os.environ.get(CONFIG_ENV)
    if not path:
        parser.error(f"no config file: give --config PATH or set {CONFIG_ENV}")
    return path


def _cmd_serve(args: argparse.Namespace) -> int:
    from lbproxy import startup_hup

    startup_hup.hold()  # before the slow part (config, imports): a SIGHUP must not kill us
    cfg = load_config(args.config)
    if args.workers > 1:
        return _serve_workers(args, cfg)
    from lbproxy.proxy.app import serve_forever
    from lbproxy.replicas.workers import announce_sighup_held

    announce_sighup_held()  # a worker of --workers: SIGHUP may now be sent to it
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(
            serve_forever(cfg, host=args.host, port=args.port, config_path=args.config),
            args.loop,
        )
    return 0


def _serve_workers(args: argparse.Namespace, cfg: Any) -> int:
    """`serve --workers N`: this process supervises N `serve` processes (replicas/workers)."""
    from lbproxy.replicas.workers import run_workers, worker_command

    level, fmt = args.log_settings
    argv = worker_command(args.config, args.loop, level, fmt)
    host = args.host or cfg.listen.host
    port = cfg.listen.port if args.port is None else args.port
    return run_workers(args.workers, argv, host, port)


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


def _global_options() -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand. SUPPRESS: a subcommand's parser
    must not overwrite a value given before it with its default."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        default=argparse.SUPPRESS,
        help=f"{', '.join(LOG_LEVELS)}: application log level "
        f"(default: ${LOG_LEVEL_ENV}, else info)",
    )
    common.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        metavar="FORMAT",
        default=argparse.SUPPRESS,
        help="text, or json: one object per line with time, level, logger, message "
        f"(default: ${LOG_FORMAT_ENV}, else text)",
    )
    return common


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog="lbproxy",
        description="OpenAI-compatible, cache-aware load balancer for vLLM",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"lbproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_LazyParser)
    config_help = f"YAML config file (default: ${CONFIG_ENV})"

    serve = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run lbproxy until SIGTERM or SIGINT (graceful shutdown); SIGHUP "
        "re-reads the config file.",
        parents=[common],
    )
    serve.add_argument("--config", help=config_help)
    serve.add_argument("--host", default=None, help="override listen.host")
    serve.add_argument("--port", type=int, default=None, help="override listen.port")
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="N proxy processes sharing the port (SO_REUSEPORT), supervised by this one; "
        "signals are passed on to all (default 1: this process serves)",
    )
    serve.set_defaults(func=_cmd_serve, subparser=serve)

    check = sub.add_parser(
        "check-config",
        help="validate a config file and exit",
        description="Validate a config file as `serve` would load it and list every "
        "problem; exit status 0 when it is valid, 2 otherwise.",
        parents=[common],
    )
    check.add_argument("config_pos", nargs="?", metavar="CONFIG", help=config_help)
    check.add_argument("--config", help="the same, as an option (as for serve)")
    check.set_defaults(func=_cmd_check_config, subparser=check)

    for name, help_text, configure in _LAZY_SUBCOMMANDS:
        sub.add_parser(name, help=help_text, configure=configure, parents=[common])
    return parser


def _setting(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    name: str,
    env: str,
    choices: tuple[str, ...],
    default: str,
) -> str:
    """The command line's value, else the environment's (checked), else `default`."""
    value = getattr(args, name, None)
    if value is None:
        value = os.environ.get(env, "").strip().lower() or None
        if value is not None and value not in choices:
            parser.error(f"{env}={value}: must be one of {', '.join(choices)}")
    return value or default


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("serve", "check-config"):
        args.config = _config_path(args)
    args.log_settings = (
        _setting(args, parser, "log_level", LOG_LEVEL_ENV, LOG_LEVELS, "info"),
        _setting(args, parser, "log_format", LOG_FORMAT_ENV, LOG_FORMATS, "text"),
    )
    configure_logging(*args.log_settings)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        print(f"lbproxy {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
