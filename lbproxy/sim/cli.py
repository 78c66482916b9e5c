"""`lbproxy sim`: run one simulated vLLM server, or a fleet of them, until SIGINT/SIGTERM.

lbproxy sim --port 8001 --profile vendor-b --model granite-4.1-8b [--speed 10]
    [--stream-interval N] [--kv-events tcp://*:5557 --kv-events-topic kv-events
     --kv-events-replay tcp://*:5558] [--tokenizer PATH] [--chat-template PATH]
    [--kv-role producer|consumer|both [--kv-side-channel-port P] [--kv-hold-timeout S]
     [--kv-link-gbps G]]
lbproxy sim --fleet configs/fleets/demo-3.yaml [--host H] [--port-offset K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from lbproxy.event_loop import run_loop
from lbproxy.sim.kv_transfer import DEFAULT_HOLD_TIMEOUT_S, DEFAULT_LINK_GBPS, KV_ROLES

# Options of the single-server form; with --fleet they come from the YAML instead.
_SINGLE = (
    "port",
    "profile",
    "model",
    "speed",
    "stream_interval",
    "kv_events",
    "kv_events_topic",
    "kv_events_replay",
    "tokenizer",
    "chat_template",
    "seed",
    "kv_role",
    "kv_side_channel_port",
    "kv_hold_timeout",
    "kv_link_gbps",
)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The options of `lbproxy sim` (its one-line help is in `lbproxy.cli`)."""
    p.description = (
        "Serve vLLM's OpenAI API, /metrics, /tokenize and KV events from a "
        "simulated engine running in (scaled) real time."
    )
    p.add_argument(
        "--fleet", help="fleet YAML, or a shipped fleet by name (demo-3): start every backend"
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8000)")
    p.add_argument("--port-offset", type=int, default=0, help="with --fleet: add to every port")
    p.add_argument("--profile", help="hardware profile name or YAML path (default vendor-b)")
    p.add_argument("--model", help="served model name (required without --fleet)")
    p.add_argument("--speed", type=float, help="engine seconds per wall second (default 1)")
    p.add_argument("--stream-interval", type=int, help="tokens per SSE chunk (default 1)")
    p.add_argument(
        "--kv-events",
        metavar="ENDPOINT",
        help="ZMQ PUB endpoint for KV events (binds with '*', else connects)",
    )
    p.add_argument("--kv-events-topic", help="topic of the KV event messages (default kv-events)")
    p.add_argument(
        "--kv-events-replay",
        metavar="ENDPOINT",
        help="ZMQ ROUTER endpoint replaying recent KV event batches",
    )
    p.add_argument("--tokenizer", help="tokenizer.json or model directory (default: shipped)")
    p.add_argument("--chat-template", help="chat template file (default: next to the tokenizer)")
    p.add_argument("--seed", type=int, help="seed of the sampled tokens (default 0)")
    p.add_argument(
        "--kv-role",
        choices=KV_ROLES,
        help="prefill/decode disaggregation as vLLM's NixlConnector: producer answers "
        "do_remote_decode requests and holds their KV, consumer pulls it for "
        "do_remote_prefill requests, both does both (default: none)",
    )
    p.add_argument(
        "--kv-side-channel-port",
        type=int,
        help="producer: port of the side channel consumers pull KV from, on --host "
        "(default 0: a free port; vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT)",
    )
    p.add_argument(
        "--kv-hold-timeout",
        type=float,
        help="producer: engine seconds held KV waits to be pulled before it is freed "
        f"(default {DEFAULT_HOLD_TIMEOUT_S:g}: vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT)",
    )
    p.add_argument(
        "--kv-link-gbps",
        type=float,
        help="consumer: link bandwidth for KV pulls, Gb/s; transfer time = KV bytes of the "
        f"pulled blocks / link (default {DEFAULT_LINK_GBPS:g}: an assumed 100 Gb/s NIC "
        "per node; RDMA fabrics reach 400)",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    p.set_defaults(func=run_sim)


def run_sim(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 2 on bad settings or a taken port."""
    if args.fleet:
        given = [f"--{k.replace('_', '-')}" for k in _SINGLE if getattr(args, k) is not None]
        if given:
            print(
                f"lbproxy sim: {', '.join(given)} cannot be used with --fleet "
                "(set them in the fleet file)",
                file=sys.stderr,
            )
            return 2
    elif not args.model:
        print("lbproxy sim: --model is required (or use --fleet)", file=sys.stderr)
        return 2
    else:
        for key in ("kv_side_channel_port", "kv_hold_timeout", "kv_link_gbps"):
            if getattr(args, key) is not None and not args.kv_role:
                print(f"lbproxy sim: --{key.replace('_', '-')} needs --kv-role", file=sys.stderr)
                return 2
        if args.kv_link_gbps is not None and not args.kv_link_gbps > 0:
            print("lbproxy sim: --kv-link-gbps must be > 0", file=sys.stderr)
            return 2
    try:
        run_loop(_serve(args), args.loop)
    except (ValueError, OSError) as exc:
        print(f"lbproxy sim: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from lbproxy.sim.fleet import start_fleet
    from lbproxy.sim.kv_transfer import LinkTable
    from lbproxy.sim.server import start_sim_server
    from lbproxy.tokenization.tokenizer import Tokenizer

    if args.fleet:
        handles = await start_fleet(args.fleet, host=args.host, port_offset=args.port_offset)
    else:
        tokenizer = None
        if args.tokenizer or args.chat_template:
            tokenizer = Tokenizer.from_file(args.tokenizer, chat_template=args.chat_template)
        handles = [
            await start_sim_server(
                host=args.host,
                port=8000 if args.port is None else args.port,
                profile=args.profile or "vendor-b",
                model=args.model,
                speed=1.0 if args.speed is None else args.speed,
                stream_interval=args.stream_interval or 1,
                kv_events=args.kv_events,
                kv_events_topic=args.kv_events_topic or "kv-events",
                kv_events_replay=args.kv_events_replay,
                tokenizer=tokenizer,
                seed=args.seed or 0,
                kv_role=args.kv_role,
                kv_side_channel_port=args.kv_side_channel_port or 0,
                kv_hold_timeout=args.kv_hold_timeout or DEFAULT_HOLD_TIMEOUT_S,
                kv_links=LinkTable(args.kv_link_gbps or DEFAULT_LINK_GBPS),
            )
        ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for h in handles:
            p = h.server.profile
            line = f"{h.model} on {h.url} ({p.name}, speed {h.server.speed:g})"
            if h.kv_events_endpoint:
                topic = h.server.publisher.topic if h.server.publisher else ""
                line += f", KV events {h.kv_events_endpoint} topic {topic!r}"
            if h.kv_events_replay_endpoint:
                line += f", replay {h.kv_events_replay_endpoint}"
            if h.server.kv_role:
                line += f", kv_role {h.server.kv_role}"
                if h.kv_side_channel_port:
                    line += f", KV side channel port {h.kv_side_channel_port}"
            print(line, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for h in handles:
            with contextlib.suppress(Exception):
                await h.close()
