"""The state store: JetStream key-value, one key per user slot, channel, LAN, SOL and K_G record.

Every write is a compare-and-set on the key's revision, retried on conflict, so two writers
never lose each other's update. Absent keys read as their defaults; the first start seeds the
defaults with create-only writes, which never replace existing state.

Reads come from a mirror of the bucket in memory, kept current by a watch on every key (and by
this process's own writes, at once), so a read costs no JetStream round trip. Another replica's
write reaches the mirror within milliseconds; a write based on a stale mirror fails its revision
check and is done again on the stored value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from qemu_bmc_shared.bus import BusError, key_value, watch

log = logging.getLogger(__name__)
BUCKET = "qemu_bmc_state"
MAX_ATTEMPTS = 32

S = TypeVar("S", bound=msgspec.Struct)


async def open_bucket(nc) -> KeyValue:  # type: ignore[no-untyped-def]
    return await key_value(nc, BUCKET, "qemu-bmc BMC state", history=5)


class Store:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.mirror: dict[str, tuple[bytes, int]] = {}
        self._follower: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Load the mirror and keep following the bucket."""
        loaded = asyncio.Event()
        self._follower = asyncio.create_task(self._follow(loaded))
        await asyncio.wait_for(loaded.wait(), timeout)

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower

    async def _follow(self, loaded: asyncio.Event) -> None:
        async for entry in watch(self.kv):
            if entry is None:  # the stored values are all in
                loaded.set()
            elif entry.operation in ("DEL", "PURGE"):
                self.mirror.pop(entry.key, None)
            else:
                self._remember(entry.key, entry.value or b"{}", entry.revision or 0)

    def _remember(self, key: str, value: bytes, revision: int) -> None:
        if revision > self.mirror.get(key, (b"", 0))[1]:
            self.mirror[key] = (value, revision)

    async def read(self, key: str, kind: type[S], default: Callable[[], S], fresh: bool = False
                   ) -> tuple[S, int | None]:
        """The value and revision of ``key``, from the mirror (``fresh``: from the bucket)."""
        if fresh or self._follower is None:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                return default(), None
            self._remember(key, entry.value or b"{}", entry.revision or 0)
            return msgspec.json.decode(entry.value or b"{}", type=kind), entry.revision
        stored = self.mirror.get(key)
        if stored is None:
            return default(), None
        return msgspec.json.decode(stored[0], type=kind), stored[1]

    async def get(self, key: str, kind: type[S], default: Callable[[], S]) -> S:
        return (await self.read(key, kind, default))[0]

    async def modify(self, key: str, kind: type[S], default: Callable[[], S], change: Callable[[S], S]) -> S:
        """Read, change and write back with a revision check; on a concurrent write, do it again."""
        for attempt in range(MAX_ATTEMPTS):
            current, revision = await self.read(key, kind, default, fresh=attempt > 0)
            new = change(current)
            value = msgspec.json.encode(new)
            try:
                if revision is None:
                    written = await self.kv.create(key, value)
                else:
                    written = await self.kv.update(key, value, last=revision)
            except KeyWrongLastSequenceError:
                continue
            self._remember(key, value, written)
            return new
        raise BusError("conflict", f"{key}: too many concurrent writers")

    async def create(self, key: str, value: msgspec.Struct) -> bool:
        """Write ``value`` only if ``key`` has none; True if it was written."""
        encoded = msgspec.json.encode(value)
        try:
            written = await self.kv.create(key, encoded)
        except KeyWrongLastSequenceError:
            return False
        self._remember(key, encoded, written)
        return True
