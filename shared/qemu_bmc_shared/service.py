"""What every service process shares: command line, logging, config, and a clean stop on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from nats.aio.client import Client

from . import bus
from .config import Config, ConfigError, load

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
NATS_URL_FILE = "nats.url"


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", default=os.environ.get("QEMU_BMC_CONFIG"),
                        help="TOML config file (env QEMU_BMC_CONFIG); none: the demo machine")
    parser.add_argument("--nats", default=os.environ.get("NATS_URL"), help="NATS URL (env NATS_URL)")
    parser.add_argument("--log-level", default=os.environ.get("QEMU_BMC_LOG_LEVEL", "INFO"))
    return parser


def nats_url(explicit: str | None, config: Config) -> str:
    """--nats, else the config's [nats] url, else the one `qemu-bmc up` wrote, else the default."""
    if explicit:
        return explicit
    if config.nats_url:
        return config.nats_url
    written = Path(config.runtime_dir) / NATS_URL_FILE
    if written.exists():
        return written.read_text().strip()
    return DEFAULT_NATS_URL


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def load_config_or_exit(path: str | None) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"qemu-bmc: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on uvloop until it returns; SIGTERM and SIGINT set ``stop``."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    uvloop.run(runner())


def run_service(name: str, args: argparse.Namespace, serve: Callable[[Client, Config, asyncio.Event], Awaitable[None]]
                ) -> None:
    """A service process: logging and config from ``args``, a NATS connection as ``name``, then
    ``serve(nc, config, stop)`` until SIGTERM or SIGINT."""
    setup_logging(args.log_level)
    config = load_config_or_exit(args.config)

    async def main(stop: asyncio.Event) -> None:
        nc = await bus.connect(nats_url(args.nats, config), name)
        try:
            await serve(nc, config, stop)
        finally:
            with contextlib.suppress(Exception):  # the NATS server may be gone already
                await nc.drain()

    run(main)
