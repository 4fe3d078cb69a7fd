"""What every service process shares: command line, logging, config, and a clean stop on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from nats.aio.client import Client

from . import bus
from .config import Config, ConfigError, load
from .discovery import UNSERVED

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
NATS_URL_FILE = "nats.url"
WILDCARDS = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}


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


# ---------------------------------------------------------------------- listeners that cannot bind


def _proc_net_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1A0A`` (IPv4) or 32 hex digits (IPv6) from /proc/net/*: 32-bit words in host order."""
    address, port = text.split(":")
    words = [int(address[i:i + 8], 16) for i in range(0, len(address), 8)]
    packed = struct.pack(f"={len(words)}I", *words)
    found = ipaddress.ip_address(packed)
    if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped:
        return found.ipv4_mapped, int(port, 16)
    return found, int(port, 16)


def address_holder(protocol: str, host: str, port: int) -> int | None:
    """The pid of a process that has a ``protocol`` ("udp" or "tcp") socket bound to (listening on,
    for TCP) ``host:port`` or to the wildcard address on that port: the socket's inode in
    /proc/net/{udp,tcp}{,6}, then the process with that inode among its file descriptors. None
    when not found (another user's process, or another network namespace)."""
    try:
        wanted = ipaddress.ip_address(host or "0.0.0.0")
    except ValueError:
        return None
    inodes = set()
    for table in (protocol, protocol + "6"):
        try:
            lines = Path("/proc/net", table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or (protocol == "tcp" and fields[3] != "0A"):  # 0A: LISTEN
                continue
            with contextlib.suppress(ValueError):
                address, bound_port = _proc_net_address(fields[1])
                if bound_port == port and (address == wanted or address in WILDCARDS or wanted in WILDCARDS):
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for descriptor in (process / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(descriptor) in inodes:
                        return int(process.name)
    return None


def bind_failure(exc: OSError, protocol: str, host: str, port: int) -> str:
    """Why ``host:port`` could not be bound, in words, naming the process that holds it:
    ``address in use (held by pid 1234)``."""
    if exc.errno is None and isinstance(exc.__cause__, OSError):  # uvloop: "could not bind to local_addr"
        exc = exc.__cause__
    if exc.errno == errno.EADDRINUSE:
        holder = address_holder(protocol, host, port)
        return "address in use" + (f" (held by pid {holder})" if holder else " (by a process not visible here)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available (not an address of this host)"
    if exc.errno == errno.EACCES:
        return "permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
    return (exc.strerror or str(exc)).lower()


def unserved_key(kind: str, machine: str | None = None) -> str:
    """The service metadata key that tells an address a service should serve and cannot:
    ``unserved.<kind>.<machine>`` (``unserved.redfish``); its value is ``<host>:<port>: <reason>``."""
    return f"{UNSERVED}{kind}" + (f".{machine}" if machine else "")


def listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket listening on ``host:port`` (IPv6 when ``host`` is), for a server given it
    ready-made, so that a failure to bind is the caller's to report. ``reuse_port``: SO_REUSEPORT,
    so that replicas (processes of the same user that set it too) share the port, the kernel
    spreading the connections between them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048, reuse_port=reuse_port)
