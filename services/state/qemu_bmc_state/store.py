"""The state store: JetStream key-value, one key per user slot, channel, LAN, SOL and K_G record.

Every write is a compare-and-set on the key's revision, retried on conflict, so two writers
never lose each other's update. Absent keys read as their defaults; the first start seeds the
defaults with create-only writes, which never replace existing state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from qemu_bmc_shared.bus import BusError

BUCKET = "qemu_bmc_state"
MAX_ATTEMPTS = 32

S = TypeVar("S", bound=msgspec.Struct)


async def open_bucket(nc, replicas: int = 1) -> KeyValue:  # type: ignore[no-untyped-def]
    js = nc.jetstream()
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(
            bucket=BUCKET, description="qemu-bmc BMC state", history=5, storage=StorageType.FILE,
            replicas=replicas))


class Store:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def read(self, key: str, kind: type[S], default: Callable[[], S]) -> tuple[S, int | None]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return default(), None
        return msgspec.json.decode(entry.value or b"{}", type=kind), entry.revision

    async def get(self, key: str, kind: type[S], default: Callable[[], S]) -> S:
        return (await self.read(key, kind, default))[0]

    async def modify(self, key: str, kind: type[S], default: Callable[[], S], change: Callable[[S], S]) -> S:
        """Read, change and write back with a revision check; on a concurrent write, do it again."""
        for _ in range(MAX_ATTEMPTS):
            current, revision = await self.read(key, kind, default)
            new = change(current)
            value = msgspec.json.encode(new)
            try:
                if revision is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=revision)
            except KeyWrongLastSequenceError:
                continue
            return new
        raise BusError("conflict", f"{key}: too many concurrent writers")

    async def create(self, key: str, value: msgspec.Struct) -> bool:
        """Write ``value`` only if ``key`` has none; True if it was written."""
        try:
            await self.kv.create(key, msgspec.json.encode(value))
        except KeyWrongLastSequenceError:
            return False
        return True
