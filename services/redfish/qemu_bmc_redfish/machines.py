"""The machines on the bus: what every machine service announces (nats.micro INFO metadata)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import nats.errors
from nats.aio.client import Client

MACHINE_SERVICE = "qemu-bmc-machine"


class Machines:
    """Machine names, asked of every machine service; answered from the last answer while a
    newer one is asked for in the background once it is ``max_age`` seconds old.

    A machine stays listed until no answer has named it for ``forget_after`` seconds: a machine
    service that is slow to answer one round (a loaded host) does not make its machines vanish
    from the Systems collection, nor their sessions lose their access, for a moment."""

    def __init__(self, nc: Client, max_age: float = 2.0, forget_after: float = 6.0) -> None:
        self.nc, self.max_age, self.forget_after = nc, max_age, forget_after
        self.names: list[str] | None = None
        self.seen: dict[str, float] = {}
        """Machine name → when an answer last named it (time.monotonic())."""
        self.at = 0.0
        self.refreshing: asyncio.Task[None] | None = None

    async def list(self) -> list[str]:
        if self.names is None:
            if self.refreshing is None:
                self.refreshing = asyncio.create_task(self._refresh())
            await asyncio.shield(self.refreshing)
        elif time.monotonic() - self.at >= self.max_age and (self.refreshing is None or self.refreshing.done()):
            self.refreshing = asyncio.create_task(self._refresh())
        assert self.names is not None
        return self.names

    async def _refresh(self) -> None:
        found = await self._discover()
        now = time.monotonic()
        self.seen.update(dict.fromkeys(found, now))
        self.seen = {name: at for name, at in self.seen.items() if now - at < self.forget_after}
        self.names = sorted(self.seen)
        self.at = now

    async def _discover(self, first: float = 0.5, quiet: float = 0.02) -> list[str]:
        inbox = self.nc.new_inbox()
        subscription = await self.nc.subscribe(inbox)
        names: set[str] = set()
        try:
            await self.nc.publish(f"$SRV.INFO.{MACHINE_SERVICE}", b"", reply=inbox)
            timeout = first
            while True:
                try:
                    message = await subscription.next_msg(timeout=timeout)
                except TimeoutError:
                    break
                timeout = quiet
                try:
                    listed = json.loads(message.data).get("metadata", {}).get("machines", "")
                except (ValueError, AttributeError):
                    continue
                names.update(name for name in listed.split(",") if name)
        finally:
            with contextlib.suppress(nats.errors.Error):  # the connection closed meanwhile
                await subscription.unsubscribe()
        return sorted(names)
