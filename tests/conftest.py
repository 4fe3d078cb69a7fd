"""Shared fixtures: a real nats-server with JetStream on a random port, the services as real
processes, real QEMU machines, and the tiny boot images the guests run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401  (imported now: its pytest plugin importing it late, at the summary, trips a CPython 3.11.7 compiler bug)
import msgspec
import pytest
from guest_images import GuestImages
from nats.aio.client import Client
from ports import free_tcp_port, free_udp_port, free_udp_ports  # noqa: F401 (for the tests)
from processes import processes_with
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import BootEvent, MediaStatus, PowerEvent
from waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> GuestImages:
    return GuestImages(tmp_path_factory.mktemp("images")).build()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (unix socket paths have a 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="qb-", dir="/tmp"))
    yield path
    for pid in processes_with("qemu-system", f"{path}/"):  # a machine service left running: the test's own QEMU
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def nats_server(short_dir: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(short_dir / "nats")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await bus.connect(nats_server.url, "tests")
    yield client
    await client.close()


class ServiceProcess:
    """One service as its own process, as `qemu-bmc up` and compose run it."""

    def __init__(self, module: str, config: Path, nats_url: str, *extra: str, env: dict[str, str] | None = None,
                 log: Path) -> None:
        self.argv = [sys.executable, "-m", module, "--nats", nats_url, "--config", str(config), *extra]
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, nc: Client, service_name: str) -> ServiceProcess:
        with self.log.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(*self.argv, stdout=output, stderr=output,
                                                                env=self.env)
        await wait_for(lambda: self._pinged(nc, service_name), timeout=15, message=f"{service_name} on the bus")
        return self

    async def _pinged(self, nc: Client, service_name: str) -> bool:
        if self.process and self.process.returncode is not None:
            raise AssertionError(f"{self.argv} exited {self.process.returncode}:\n{self.log.read_text()}")
        try:
            await nc.request(f"$SRV.PING.{service_name}", b"", timeout=0.5)
        except Exception:
            return False
        return True

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode or 0


@pytest.fixture
async def services(nats_server: NatsServer, nc: Client, short_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await services(kind, config, *extra)`` starts the ``machine``, ``state`` or ``ipmi-lan`` service."""
    started: list[ServiceProcess] = []

    async def start(kind: str, config: Path, *extra: str, env: dict[str, str] | None = None) -> ServiceProcess:
        service = ServiceProcess(f"qemu_bmc_{kind.replace('-', '_')}", config, nats_server.url, *extra, env=env,
                                 log=short_dir / f"{kind}.log")
        started.append(service)
        return await service.start(nc, f"qemu-bmc-{kind}")

    yield start
    for service in reversed(started):
        await service.stop()


def write_config(directory: Path, text: str) -> Path:
    path = directory / "qemu-bmc.toml"
    path.write_text(f'runtime_dir = "{directory / "rt"}"\n' + text)
    return path


#: A ``[redfish]`` line for the tests whose image servers and event receivers are on 127.0.0.1,
#: which the Redfish service refuses to reach by default.
INTERNAL_TARGETS = "allow_internal_targets = true\n"


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def serial_log(directory: Path, machine: str) -> str:
    path = directory / "rt" / "vm" / machine / "serial.log"
    return path.read_text(errors="replace") if path.exists() else ""


class Events:
    """Collects the events of one machine from the bus."""

    TYPES = {subjects.EVENT_POWER: PowerEvent, subjects.EVENT_BOOT: BootEvent, subjects.EVENT_MEDIA: MediaStatus}

    def __init__(self) -> None:
        self.received: list[tuple[str, Any]] = []

    @classmethod
    async def subscribe(cls, nc: Client, machine: str) -> Events:
        events = cls()

        async def handler(message: Any) -> None:
            kind = message.subject.split(".", 2)[2]
            if kind in cls.TYPES:  # not the state service's event.state
                events.received.append((kind, msgspec.json.decode(message.data, type=cls.TYPES[kind])))

        await nc.subscribe(f"{subjects.PREFIX}.{machine}.event.>", cb=handler)
        await nc.flush()
        return events

    def of(self, kind: str) -> list[Any]:
        return [event for event_kind, event in self.received if event_kind == kind]


async def bmc_request(nc: Client, machine: str, operation: str, message: Any, reply_type: type, **kw: Any) -> Any:
    return await bus.request(nc, machine, operation, message, reply_type, **kw)


@contextlib.contextmanager
def no_exception_logged(log: Path) -> Iterator[None]:
    start = log.stat().st_size if log.exists() else 0
    yield
    text = log.read_text()[start:] if log.exists() else ""
    assert "Traceback" not in text, text


@pytest.fixture(scope="session")
def linux_guest() -> Any:
    """The tiny Linux test guest (tests/linux_guest.py), built once and cached across runs."""
    from linux_guest import LinuxGuest, default_cache

    return LinuxGuest(default_cache()).build()
