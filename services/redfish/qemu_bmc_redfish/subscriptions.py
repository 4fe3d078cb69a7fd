"""Event subscriptions (EventDestination resources) kept in a JetStream key-value bucket, so that
every replica of the Redfish service knows every subscription, whichever replica made it.

Keys of the bucket ``qemu_bmc_redfish_subscriptions``::

    sub.<Id>         →  SubscriptionRecord (JSON), its HttpHeaders included (the bucket holds them;
                        the Redfish resource never shows them)
    power.<machine>  →  PowerRecord (JSON): the last power state a replica delivered events for

Each replica keeps a copy of the ``sub.*`` keys in memory, updated by a watch of the bucket (the
events are delivered from that copy; the resources are read from it too). The ``power.*`` keys
make events real transitions across replicas: the replica that gets a power event (a NATS queue
group gives each event to one replica) delivers it only when it changes the state stored there,
written with compare-and-set, so that a second "On" (a QMP RESET) is not a change even when
another replica had the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from qemu_bmc_shared.bus import key_value, watch
from qemu_bmc_shared.messages import PowerEvent

log = logging.getLogger(__name__)

BUCKET = "qemu_bmc_redfish_subscriptions"
SUBSCRIPTION_ID = re.compile(r"^[0-9a-f]{8}$")
MAX_SUBSCRIPTIONS = 64
SYNC_TIMEOUT = 5.0


class SubscriptionRecord(msgspec.Struct):
    """One push subscription as stored."""

    id: str
    destination: str
    context: str | None
    user: str
    """Who made it."""
    machines: list[str]
    """The machines whose events it gets: those its maker logged in to when making it."""
    created: float
    registry_prefixes: list[str] = []
    resource_types: list[str] = []
    http_headers: dict[str, str] = {}
    """Sent with every event POST; never shown (they may hold credentials)."""


class PowerRecord(msgspec.Struct):
    state: str
    timestamp: float
    """The PowerEvent's (0 for a state read with power.get when a subscription was made)."""


def subscription_key(subscription_id: str) -> str:
    return f"sub.{subscription_id}"


def power_key(machine: str) -> str:
    return f"power.{machine}"


class SubscriptionStore:
    """The subscriptions in the bucket, and this replica's copy of them (``records``)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.records: dict[str, SubscriptionRecord] = {}
        self._revisions: dict[str, int] = {}
        """Subscription Id → the newest revision this replica knows of (a watched entry older than
        that, such as the record of a subscription this replica just deleted, is ignored)."""
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()
        self._synced = asyncio.Event()
        self._watching: asyncio.Task[None] | None = None

    async def bucket(self) -> KeyValue:
        """The bucket (made when absent), with the copy of its subscriptions loaded."""
        if self._kv is not None:
            return self._kv
        async with self._lock:
            if self._kv is None:
                kv = await key_value(self.nc, BUCKET, "qemu-bmc Redfish event subscriptions")
                self._watching = asyncio.create_task(self._watch(kv))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._synced.wait(), SYNC_TIMEOUT)
                self._kv = kv
        return self._kv

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None

    async def _watch(self, kv: KeyValue) -> None:
        """Keep ``records`` as the bucket's ``sub.*`` keys; start over when the watch fails."""
        while True:
            try:
                loading: dict[str, tuple[SubscriptionRecord | None, int]] | None = {}
                async for entry in watch(kv, "sub.>"):
                    if entry is None:  # the end of what was stored: the copy is complete
                        if loading is not None:
                            self._replace(loading)
                            loading = None
                        continue
                    subscription_id = entry.key.split(".", 1)[1]
                    record = None
                    if entry.operation not in ("DEL", "PURGE") and entry.value:
                        try:
                            record = msgspec.json.decode(entry.value, type=SubscriptionRecord)
                        except msgspec.ValidationError:
                            log.warning("ignoring the malformed subscription %s", entry.key)
                    if loading is not None:
                        loading[subscription_id] = (record, entry.revision or 0)
                    else:
                        self._apply(subscription_id, record, entry.revision or 0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watching the event subscriptions failed; watching again")
            await asyncio.sleep(1)

    def _replace(self, loaded: dict[str, tuple[SubscriptionRecord | None, int]]) -> None:
        self.records = {key: record for key, (record, _) in loaded.items() if record is not None}
        self._revisions = {key: revision for key, (_, revision) in loaded.items()}
        self._synced.set()

    def _apply(self, subscription_id: str, record: SubscriptionRecord | None, revision: int) -> None:
        if revision and revision <= self._revisions.get(subscription_id, 0):
            return
        self._revisions[subscription_id] = revision
        if record is None:
            self.records.pop(subscription_id, None)
        else:
            self.records[subscription_id] = record

    def all(self) -> list[SubscriptionRecord]:
        return sorted(self.records.values(), key=lambda record: (record.created, record.id))

    async def get(self, subscription_id: str) -> SubscriptionRecord | None:
        await self.bucket()
        return self.records.get(subscription_id) if SUBSCRIPTION_ID.match(subscription_id) else None

    async def create(self, record: SubscriptionRecord) -> SubscriptionRecord:
        """Store a new subscription under a new Id (``record.id`` is replaced)."""
        kv = await self.bucket()
        while True:
            record = msgspec.structs.replace(record, id=secrets.token_hex(4))
            try:
                revision = await kv.create(subscription_key(record.id), msgspec.json.encode(record))
            except KeyWrongLastSequenceError:  # the Id is taken: draw again
                continue
            self._apply(record.id, record, revision)
            return record

    async def update(self, record: SubscriptionRecord) -> SubscriptionRecord:
        kv = await self.bucket()
        revision = await kv.put(subscription_key(record.id), msgspec.json.encode(record))
        self._apply(record.id, record, revision)
        return record

    async def delete(self, record: SubscriptionRecord) -> None:
        """Delete it: this replica stops delivering to it at once, the others when their watch
        sees the delete (milliseconds)."""
        kv = await self.bucket()
        await kv.delete(subscription_key(record.id))
        self.records.pop(record.id, None)

    def subscribers(self, machine: str, registry: str, resource_type: str) -> list[SubscriptionRecord]:
        """The subscriptions that get an event of ``machine`` from ``registry`` about a
        ``resource_type`` (an empty RegistryPrefixes or ResourceTypes filters nothing)."""
        return [record for record in self.all() if machine in record.machines
                and (not record.registry_prefixes or registry in record.registry_prefixes)
                and (not record.resource_types or resource_type in record.resource_types)]

    async def know_state(self, machine: str, state: str) -> None:
        """The power state ``machine`` is in, read when a subscription for it is made: stored when
        no state is stored yet, so that the first event after it is compared with something."""
        kv = await self.bucket()
        with contextlib.suppress(KeyWrongLastSequenceError):
            await kv.create(power_key(machine), msgspec.json.encode(PowerRecord(state, 0.0)))

    async def transition(self, event: PowerEvent) -> bool:
        """Record ``event``'s state as its machine's: True when that changes the stored state
        (or none was stored), False for the same state again or an event older than the state
        stored (compare-and-set: replicas handling two events of a machine at once agree)."""
        kv = await self.bucket()
        key = power_key(event.machine)
        value = msgspec.json.encode(PowerRecord(event.state, event.timestamp))
        for _ in range(8):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                entry = None
            try:
                if entry is None or not entry.value:
                    await kv.create(key, value)
                    return True
                stored = msgspec.json.decode(entry.value, type=PowerRecord)
                if stored.state == event.state or stored.timestamp > event.timestamp:
                    return False
                await kv.update(key, value, last=entry.revision)
                return True
            except KeyWrongLastSequenceError:  # another replica wrote first: read again
                continue
        log.warning("could not record the power state of %s; delivering its event", event.machine)
        return True
