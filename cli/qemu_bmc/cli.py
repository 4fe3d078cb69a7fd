"""The `qemu-bmc` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from qemu_bmc_shared import bus, kvm, subjects
from qemu_bmc_shared.bus import BusError, BusUnreachable
from qemu_bmc_shared.config import Config, ConfigError, find_config, load
from qemu_bmc_shared.discovery import listeners, service_infos, unserved
from qemu_bmc_shared.messages import (
    BootOverride,
    BootOverrideUpdate,
    MediaInsert,
    MediaStatus,
    PowerRequest,
    PowerStatus,
)
from qemu_bmc_shared.service import nats_url, run, setup_logging

from . import __version__, compose, vm
from .up import AlreadyUp, hold_runtime_lock, up

CONNECT_TIMEOUT = 5.0
#: Exit status of a command that could not reach the bus.
NO_BUS = 2

BOOT_TARGETS = {"none": "None", "pxe": "Pxe", "hdd": "Hdd", "disk": "Hdd", "cd": "Cd", "cdrom": "Cd",
                "bios": "BiosSetup", "biossetup": "BiosSetup"}


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=os.environ.get("QEMU_BMC_CONFIG"),
                        help="TOML config file (default: ./qemu-bmc.toml, ./qqmgr.toml, "
                        "~/.config/qemu-bmc/config.toml, ~/.config/qqmgr/conf.toml: the first found)")
    common.add_argument("--nats", default=os.environ.get("NATS_URL"), help="NATS URL")
    common.add_argument("--json", action="store_true", help="print the reply as JSON")
    on_bus = argparse.ArgumentParser(add_help=False)
    on_bus.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT,
                        help=f"seconds to wait for the bus before giving up (default {CONNECT_TIMEOUT:g})")

    top = argparse.ArgumentParser(prog="qemu-bmc", description="A real BMC for QEMU virtual machines.")
    top.add_argument("--version", action="version", version=f"qemu-bmc {__version__}")
    commands = top.add_subparsers(dest="command", required=True)

    start = commands.add_parser("up", parents=[common], help="run NATS and every service on this machine")
    start.add_argument("--keep-vms", action="store_true", help="leave managed VMs running when stopping")
    start.add_argument("--log-level", default="INFO")

    commands.add_parser("services", parents=[common, on_bus], help="the services on the bus ($SRV discovery)")

    power = commands.add_parser("power", parents=[common, on_bus], help="power status and control")
    power.add_argument("action", choices=["status", "on", "off", "soft", "reset", "cycle", "nmi"])
    power.add_argument("machine")

    boot = commands.add_parser("boot", parents=[common, on_bus], help="show or set the boot override")
    boot.add_argument("machine")
    boot.add_argument("--target", choices=sorted(BOOT_TARGETS))
    how = boot.add_mutually_exclusive_group()
    how.add_argument("--once", action="store_const", dest="enabled", const="Once")
    how.add_argument("--continuous", action="store_const", dest="enabled", const="Continuous")
    how.add_argument("--disable", action="store_const", dest="enabled", const="Disabled")
    mode = boot.add_mutually_exclusive_group()
    mode.add_argument("--uefi", action="store_const", dest="mode", const="UEFI")
    mode.add_argument("--legacy", action="store_const", dest="mode", const="Legacy")

    media = commands.add_parser("media", parents=[common, on_bus], help="virtual media (CD)")
    media.add_argument("action", choices=["status", "insert", "eject"])
    media.add_argument("machine")
    media.add_argument("image", nargs="?", help="local path or http(s) URL (insert)")
    media.add_argument("--writable", action="store_true", help="insert without write protection")

    screenshot = commands.add_parser("screenshot", parents=[common, on_bus],
                                     help="save the machine's screen as a PNG image")
    screenshot.add_argument("machine")
    screenshot.add_argument("file", help="the PNG file to write")

    vm.add_parser(commands, common)
    compose.add_parser(commands)
    return top


def show(reply: msgspec.Struct | Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(msgspec.to_builtins(reply), indent=2))
    elif isinstance(reply, PowerStatus):
        pid = f", pid {reply.pid}" if reply.pid else ""
        print(f"{reply.machine}: {reply.state} ({reply.run_state}, {reply.mode}{pid})")
    elif isinstance(reply, BootOverride):
        print(f"boot override: target {reply.target}, {reply.enabled}, mode {reply.mode}")
    elif isinstance(reply, MediaStatus):
        print(f"{reply.machine} {reply.device}: " + (f"inserted {reply.image}" if reply.inserted else "empty"))
    else:
        print(reply)


async def client_command(args: argparse.Namespace, url: str) -> int:
    nc = await bus.connect(url, "qemu-bmc-cli", timeout=args.timeout)
    try:
        if args.command == "services":
            infos = sorted(await service_infos(nc, first=0.5, quiet=0.2, verb="INFO"),
                           key=lambda info: (info.get("name", ""), info.get("id", "")))
            if args.json:
                print(json.dumps(infos, indent=2))
            for info in [] if args.json else infos:
                machines = info.get("metadata", {}).get("machines", "")
                print(f"{info['name']} {info['version']} id={info['id']} endpoints={len(info.get('endpoints') or [])}"
                      + (f" machines={machines}" if machines else ""))
                for what, address in sorted(listeners(info).items()):
                    print(f"  {what}: {address}")
            for what, why in [] if args.json else sorted(unserved(infos).items()):
                print(f"NOT SERVED {what}: {why}")
            return 0
        reply: msgspec.Struct
        machine = args.machine
        if args.command == "screenshot":
            png = await kvm.screenshot(nc, machine)
            try:
                Path(args.file).write_bytes(png)
            except OSError as exc:
                print(f"qemu-bmc: cannot write {args.file}: {exc.strerror}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps({"machine": machine, "file": args.file, "bytes": len(png)}))
            return 0
        if args.command == "power":
            if args.action == "status":
                reply = await bus.request(nc, machine, subjects.POWER_GET, None, PowerStatus)
            else:
                reply = await bus.request(nc, machine, subjects.POWER_SET, PowerRequest(action=args.action),
                                          PowerStatus, timeout=60)
        elif args.command == "boot":
            changes = {key: value for key, value in (("target", BOOT_TARGETS.get(args.target or "")),
                                                     ("enabled", args.enabled), ("mode", args.mode)) if value}
            if changes:
                if "target" in changes and "enabled" not in changes and changes["target"] != "None":
                    changes["enabled"] = "Once"
                reply = await bus.request(nc, machine, subjects.BOOT_SET, BootOverrideUpdate(**changes), BootOverride)
            else:
                reply = await bus.request(nc, machine, subjects.BOOT_GET, None, BootOverride)
        elif args.action == "insert":
            if not args.image:
                print("qemu-bmc: media insert needs an image (path or URL)", file=sys.stderr)
                return 2
            image = args.image if "://" in args.image else os.path.abspath(args.image)
            reply = await bus.request(nc, machine, subjects.MEDIA_INSERT,
                                      MediaInsert(image=image, write_protected=not args.writable), MediaStatus,
                                      timeout=60)
        elif args.action == "eject":
            reply = await bus.request(nc, machine, subjects.MEDIA_EJECT, None, MediaStatus)
        else:
            reply = await bus.request(nc, machine, subjects.MEDIA_GET, None, MediaStatus)
        show(reply, args.json)
        return 0
    except BusError as exc:
        if args.json:
            print(json.dumps({"error": exc.error, "message": exc.message}))
        print(f"qemu-bmc: {exc}", file=sys.stderr)
        return 1
    finally:
        await nc.close()


INTERRUPT_GRACE = 1.0
"""Seconds a command has to end once cancelled by Ctrl-C or SIGTERM, before the process exits
anyway (nats-py can swallow a cancellation while it connects)."""


def run_command(command: Callable[[], Awaitable[int]]) -> int:
    """Run one CLI command to its exit status; Ctrl-C or SIGTERM ends it at once (status 130)."""

    async def runner() -> int:
        task = asyncio.ensure_future(command())
        loop = asyncio.get_running_loop()

        def interrupted() -> None:
            task.cancel()
            loop.call_later(INTERRUPT_GRACE, exit_now)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupted)
        try:
            return await task
        except asyncio.CancelledError:
            return 130

    return uvloop.run(runner())


def exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def unreachable(exc: BusUnreachable, config: Config) -> str:
    """One line for a bus that does not answer: where, why, and what would start it (no credentials)."""
    start = f"qemu-bmc up -c {config.path}" if config.path else "qemu-bmc up"
    return f"qemu-bmc: {exc}; is qemu-bmc up running? ({start})"


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "compose":  # no config, no bus
        raise SystemExit(compose.compose_command(args))
    try:
        path = find_config(args.config)
        if path is None and args.command == "vm":
            raise ConfigError("no config: give -c FILE, or write ./qemu-bmc.toml (or qqmgr's ./qqmgr.toml) or "
                              "~/.config/qemu-bmc/config.toml")
        config = load(path)
    except ConfigError as exc:
        print(f"qemu-bmc: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    if args.command == "up":
        try:
            lock = hold_runtime_lock(config.runtime_dir)
        except AlreadyUp as exc:
            print(f"qemu-bmc: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        setup_logging(args.log_level)

        async def run_up(stop: asyncio.Event) -> None:
            await up(config, args.nats or config.nats_url, args.keep_vms, stop)

        try:
            run(run_up)
        finally:
            lock.close()
        return

    url = nats_url(args.nats, config)

    async def command() -> int:
        if args.command == "vm":
            return await vm.vm_command(args, config, url)
        try:
            return await client_command(args, url)
        except BusUnreachable as exc:
            if args.json:
                print(json.dumps({"error": "unreachable", "message": str(exc)}))
            print(unreachable(exc, config), file=sys.stderr)
            return NO_BUS

    raise SystemExit(run_command(command))
