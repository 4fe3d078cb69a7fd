"""The state service on the bus: users, channel access, LAN/SOL parameters and K_G of every machine."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import UNSET
from nats.aio.client import Client
from qemu_bmc_shared import bus, manager_settings, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import Config, VmConfig
from qemu_bmc_shared.discovery import Machines
from qemu_bmc_shared.ipmi.storage import USER_CHANGE_RECORD
from qemu_bmc_shared.messages import (
    AccountPolicy,
    AccountPolicyUpdate,
    ChannelAccess,
    ChannelAccessUpdate,
    ChannelRef,
    ChassisConfig,
    ChassisUpdate,
    Credentials,
    CredentialsRequest,
    Empty,
    KgKey,
    LanConfig,
    LanParamSet,
    LanRef,
    LoginAttempt,
    LoginOutcome,
    LoginUnlock,
    LoginVerdict,
    ManagerSettings,
    ManagerSettingsUpdate,
    PasswordCheck,
    PasswordCheckResult,
    PasswordSet,
    SelAdd,
    SelEntry,
    SelLog,
    SolConfig,
    SolParamSet,
    StateChanged,
    User,
    UserAccessUpdate,
    UserChannelAccess,
    UserList,
    UserRef,
    UserUpdate,
    sel_timestamped,
)
from qemu_bmc_shared.service import argument_parser, run_service

from . import __version__
from .lockout import Lockout
from .sealing import SecretBox, SecretError
from .sel_feed import SelFeed, user_change
from .store import Store, open_bucket

log = logging.getLogger(__name__)
S = TypeVar("S", bound=msgspec.Struct)
Area = Literal["users", "channel", "lan", "sol", "kg", "chassis", "manager", "sel", "policy"]
SERVICE_NAME = "qemu-bmc-state"
MAX_USERS = 15
LAN_CHANNEL = 1
ADMINISTRATOR = 4


class StoredUser(msgspec.Struct):
    slot: int
    name: str = ""
    enabled: bool = False
    password: str | None = None
    """The sealed password (see sealing.py), never the cleartext."""
    channels: dict[int, UserChannelAccess] = {}
    changes: int = 0
    password_change_required: bool = False
    password_changes: int = 0

    def public(self) -> User:
        return User(slot=self.slot, name=self.name, enabled=self.enabled, password_set=self.password is not None,
                    channels=self.channels, changes=self.changes,
                    password_change_required=self.password_change_required, password_changes=self.password_changes)


class StoredKg(msgspec.Struct):
    sealed: str | None = None


def _changes(update: msgspec.Struct, skip: tuple[str, ...]) -> dict[str, object]:
    return {key: value for key, value in msgspec.structs.asdict(update).items()
            if value is not UNSET and key not in skip}


def _ascii_name(name: str) -> str:
    if not name.isascii() or not name.isprintable():
        raise BusError("bad_request", f"a user name is printable ASCII: {name!r}")
    return name


def _password_bytes(password: str) -> bytes:
    raw = password.encode()
    if len(raw) > 20:
        raise BusError("bad_request", "a password has at most 20 bytes")
    return raw


def default_mac(machine: str) -> bytes:
    """A stable, locally administered MAC for the BMC's LAN interface."""
    return bytes([0x02]) + hashlib.sha256(f"qemu-bmc:{machine}".encode()).digest()[:5]


def default_lan(machine: str, vm: VmConfig | None) -> LanConfig:
    """LAN parameters (IPMI v2.0 §23.2) seeded at first start: 3 IP, 4 source, 5 MAC, 6 mask, 12 gateway."""
    address = ipaddress.IPv4Address("0.0.0.0")
    if vm and vm.ipmi:
        try:
            address = ipaddress.IPv4Address(vm.ipmi[0])
        except ValueError:
            pass
    return LanConfig(channel=LAN_CHANNEL, params={
        3: address.packed, 4: b"\x01", 5: default_mac(machine), 6: bytes([255, 255, 255, 0]), 12: bytes(4)})


def default_sol() -> SolConfig:
    """SOL parameters (IPMI v2.0 §26.3): enabled, User privilege, 60 ms / 96 chars, 7 retries
    every 500 ms, 115200 bit/s, channel 1, port 623."""
    return SolConfig(params={1: b"\x01", 2: b"\x02", 3: b"\x0c\x60", 4: b"\x07\x32", 5: b"\x0a", 6: b"\x0a",
                             7: b"\x01", 8: b"\x6f\x02"})


class StateService:
    def __init__(self, store: Store, box: SecretBox, config: Config, nc: Client | None = None) -> None:
        self.store = store
        self.box = box
        self.config = config
        self.nc = nc
        self.machines = Machines(nc, ipmi_addresses=False) if nc is not None else None
        self.seeded: set[str] = set()
        self.naming: dict[str, asyncio.Lock] = {}
        self.lockout = Lockout()

    async def _modify(self, area: Area, machine: str, key: str, kind: type[S], default: Callable[[], S],
                      change: Callable[[S], S]) -> S:
        """Change a stored record, then announce it (event.state) before the request is answered,
        so that a front-end's next read sees it."""
        stored = await self.store.modify(key, kind, default, change)
        if self.nc is not None:
            await bus.publish(self.nc, machine, subjects.EVENT_STATE,
                              StateChanged(machine=machine, area=area, timestamp=time.time()))
        return stored

    # ------------------------------------------------------------------ keys and defaults

    async def known(self, machine: str) -> bool:
        """A machine of this service's config, or one a machine service announces on the bus
        (seeded with the defaults the first time it is seen)."""
        if machine in self.seeded:
            return True
        if machine not in self.config.vms and (self.machines is None or not await self.machines.known(machine)):
            return False
        await self.seed(machine)
        return True

    def _serving_known_machines(self, handler: Callable[[str, Any], Awaitable[Any]]) -> bus.Handler:
        async def serve(machine: str, request: Any) -> Any:
            if not await self.known(machine):
                raise BusError("unknown_machine", f"no machine {machine!r} in the state service's config or on the bus")
            return await handler(machine, request)

        return serve

    @staticmethod
    def _user_key(machine: str, slot: int) -> str:
        return f"{machine}.user.{slot}"

    @staticmethod
    def _channel_key(machine: str, channel: int, volatile: bool) -> str:
        return f"{machine}.channel.{channel}.{'volatile' if volatile else 'nonvolatile'}"

    async def seed(self, machine: str) -> None:
        """Write the first-start defaults; create-only, so existing state is never replaced."""
        state = self.config.state
        admin = StoredUser(slot=2, name=state.default_user, enabled=True,
                           password=self.box.seal(_password_bytes(state.default_password), self._user_key(machine, 2)),
                           channels={LAN_CHANNEL: UserChannelAccess(privilege=ADMINISTRATOR, ipmi_messaging=True,
                                                                     link_auth=True, payloads=0x02)})
        seeded = [
            await self.store.create(self._user_key(machine, 1), StoredUser(slot=1)),
            await self.store.create(self._user_key(machine, 2), admin),
            await self.store.create(f"{machine}.lan.{LAN_CHANNEL}", default_lan(machine, self.config.vms.get(machine))),
            await self.store.create(f"{machine}.sol", default_sol()),
        ]
        for volatile in (True, False):
            seeded.append(await self.store.create(self._channel_key(machine, LAN_CHANNEL, volatile),
                                                  ChannelAccess(channel=LAN_CHANNEL, volatile=volatile)))
        if any(seeded):
            log.info("%s: seeded BMC defaults (user %r in slot 2)", machine, state.default_user)
        self.seeded.add(machine)

    # ------------------------------------------------------------------ users

    async def _user(self, machine: str, slot: int) -> StoredUser:
        return await self.store.get(self._user_key(machine, slot), StoredUser, lambda: StoredUser(slot=slot))

    async def _all_users(self, machine: str) -> list[StoredUser]:
        return list(await asyncio.gather(*(self._user(machine, slot) for slot in range(1, MAX_USERS + 1))))

    async def _find(self, machine: str, slot: int | None, name: str | None) -> StoredUser | None:
        if (slot is None) == (name is None):
            raise BusError("bad_request", "give exactly one of slot and name")
        if slot is not None:
            return await self._user(machine, slot)
        return next((user for user in await self._all_users(machine) if user.name == name), None)

    def _password(self, machine: str, user: StoredUser) -> bytes | None:
        if user.password is None:
            return None
        try:
            return self.box.open(user.password, self._user_key(machine, user.slot))
        except SecretError as exc:
            raise BusError("internal", str(exc)) from None

    async def _modify_user(self, machine: str, slot: int, change: Callable[[StoredUser], StoredUser]) -> User:
        """Change a user slot, and log what changed in the SEL (an OEM record, see sel_feed.user_change)."""
        before: list[StoredUser] = []

        def apply(user: StoredUser) -> StoredUser:
            before[:] = [user]
            return msgspec.structs.replace(change(user), changes=user.changes + 1)

        stored = await self._modify("users", machine, self._user_key(machine, slot), StoredUser,
                                    lambda: StoredUser(slot=slot), apply)
        record = user_change(before[0].public(), stored.public(), before[0].password != stored.password)
        if record is not None:
            try:
                await self.sel_add(machine, SelAdd(data=record, record_type=USER_CHANGE_RECORD))
            except Exception:  # the change is made: a SEL that cannot take its record does not undo it
                log.exception("%s: could not log the change of user %d in the SEL", machine, slot)
        return stored.public()

    async def users_list(self, machine: str, _: Empty) -> UserList:
        return UserList(users=[user.public() for user in await self._all_users(machine)])

    async def users_get(self, machine: str, request: UserRef) -> User:
        return (await self._user(machine, request.slot)).public()

    async def users_set(self, machine: str, request: UserUpdate) -> User:
        """One name per user (checked and written under a lock, so two new users cannot take one
        name at once), and ``if_name`` checked on the stored slot (compare-and-set)."""
        changes = _changes(request, ("slot", "if_name"))

        def change(user: StoredUser) -> StoredUser:
            if request.if_name is not UNSET and user.name != request.if_name:
                raise BusError("invalid_state", f"slot {request.slot} is no longer {request.if_name or 'free'!r}")
            return msgspec.structs.replace(user, **changes)

        async with self.naming.setdefault(machine, asyncio.Lock()):
            if isinstance(name := changes.get("name"), str) and name:
                _ascii_name(name)
                if len(name.encode()) > 16:
                    raise BusError("bad_request", "a user name has at most 16 bytes")
                holder = await self._find(machine, None, name)
                if holder is not None and holder.slot != request.slot:
                    raise BusError("conflict", f"user name {name!r} is already used by slot {holder.slot}")
            return await self._modify_user(machine, request.slot, change)

    async def users_access(self, machine: str, request: UserAccessUpdate) -> User:
        changes = _changes(request, ("slot", "channel"))

        def change(user: StoredUser) -> StoredUser:
            access = msgspec.structs.replace(user.channels.get(request.channel, UserChannelAccess()), **changes)
            return msgspec.structs.replace(user, channels={**user.channels, request.channel: access})

        return await self._modify_user(machine, request.slot, change)

    async def users_password(self, machine: str, request: PasswordSet) -> User:
        """Set or clear a password (from Redfish or IPMI Set User Password), at least the policy's
        ``min_password_length`` long: either way, no password change is required any more, and
        the sessions made with the old one end (``password_changes`` grows)."""
        sealed = None
        if request.password is not None:
            shortest = (await self.policy_get(machine, Empty())).min_password_length
            if len(request.password) < shortest:
                raise BusError("bad_request", f"a password has at least {shortest} characters")
            sealed = self.box.seal(_password_bytes(request.password), self._user_key(machine, request.slot))
        return await self._modify_user(machine, request.slot, lambda user: msgspec.structs.replace(
            user, password=sealed, password_change_required=False, password_changes=user.password_changes + 1))

    async def users_check(self, machine: str, request: PasswordCheck) -> PasswordCheckResult:
        """Compare a password; with a ``source``, a login that the lockout policy counts."""
        if request.source is not None and request.name is not None \
                and not self.lockout.verdict(machine, request.name, request.source).allowed:
            return PasswordCheckResult(ok=False, locked=True)
        user = await self._find(machine, request.slot, request.name)
        stored = self._password(machine, user) if user else None
        ok = user is not None and stored is not None and hmac.compare_digest(stored, request.password.encode())
        if request.source is not None:
            name = request.name if request.name is not None else user.name if user else ""
            await self.login_result(machine, LoginOutcome(name=name, source=request.source, ok=ok))
        return PasswordCheckResult(ok=ok, user=user.public() if ok and user else None)

    # ------------------------------------------------------------------ account policy and lockout

    async def policy_get(self, machine: str, _: Empty) -> AccountPolicy:
        state = self.config.state
        return await self.store.get(f"{machine}.policy", AccountPolicy, lambda: AccountPolicy(
            lockout_threshold=state.lockout_threshold, lockout_duration=state.lockout_duration,
            lockout_reset_after=state.lockout_reset_after, min_password_length=state.min_password_length))

    async def policy_set(self, machine: str, request: AccountPolicyUpdate) -> AccountPolicy:
        current = await self.policy_get(machine, Empty())
        return await self._modify("policy", machine, f"{machine}.policy", AccountPolicy, lambda: current,
                                  lambda policy: msgspec.structs.replace(policy, **_changes(request, ())))

    async def login_check(self, machine: str, request: LoginAttempt) -> LoginVerdict:
        return self.lockout.verdict(machine, request.name, request.source)

    async def login_result(self, machine: str, request: LoginOutcome) -> LoginVerdict:
        verdict, locked_now = self.lockout.record(machine, request.name, request.source, request.ok,
                                                  await self.policy_get(machine, Empty()))
        if locked_now:
            log.warning("%s: user %r locked out from %s for %.0f s after failed logins", machine, request.name,
                        request.source, verdict.retry_after)
        return verdict

    async def login_unlock(self, machine: str, request: LoginUnlock) -> Empty:
        self.lockout.unlock(machine, request.name)
        return Empty()

    async def users_credentials(self, machine: str, request: CredentialsRequest) -> Credentials:
        user = await self._find(machine, request.slot, request.name)
        if user is None:
            raise BusError("not_found", f"no user named {request.name!r}")
        password = self._password(machine, user)
        return Credentials(user=user.public(), password=password.decode(errors="surrogateescape")
                           if password is not None else None)

    # ------------------------------------------------------------------ channel, LAN, SOL, K_G

    async def channel_get(self, machine: str, request: ChannelRef) -> ChannelAccess:
        key = self._channel_key(machine, request.channel, request.volatile)
        return await self.store.get(key, ChannelAccess,
                                    lambda: ChannelAccess(channel=request.channel, volatile=request.volatile))

    async def channel_set(self, machine: str, request: ChannelAccessUpdate) -> ChannelAccess:
        key = self._channel_key(machine, request.channel, request.volatile)
        changes = _changes(request, ("channel", "volatile"))
        return await self._modify("channel", machine, key, ChannelAccess,
                                       lambda: ChannelAccess(channel=request.channel, volatile=request.volatile),
                                       lambda access: msgspec.structs.replace(access, **changes))

    async def lan_get(self, machine: str, request: LanRef) -> LanConfig:
        key = f"{machine}.lan.{request.channel}"
        return await self.store.get(key, LanConfig, lambda: LanConfig(channel=request.channel, params={}))

    async def lan_set(self, machine: str, request: LanParamSet) -> LanConfig:
        key = f"{machine}.lan.{request.channel}"
        return await self._modify(
            "lan", machine, key, LanConfig, lambda: LanConfig(channel=request.channel, params={}),
            lambda lan: LanConfig(channel=lan.channel, params={**lan.params, request.param: request.data}))

    async def sol_get(self, machine: str, _: Empty) -> SolConfig:
        return await self.store.get(f"{machine}.sol", SolConfig, default_sol)

    async def sol_set(self, machine: str, request: SolParamSet) -> SolConfig:
        return await self._modify("sol", machine, f"{machine}.sol", SolConfig, default_sol,
                                       lambda sol: SolConfig(params={**sol.params, request.param: request.data}))

    async def kg_get(self, machine: str, _: Empty) -> KgKey:
        stored = await self.store.get(f"{machine}.kg", StoredKg, StoredKg)
        if stored.sealed is None:
            return KgKey(key=None)
        try:
            return KgKey(key=self.box.open(stored.sealed, f"{machine}.kg"))
        except SecretError as exc:
            raise BusError("internal", str(exc)) from None

    async def kg_set(self, machine: str, request: KgKey) -> KgKey:
        sealed = self.box.seal(request.key, f"{machine}.kg") if request.key is not None else None
        await self._modify("kg", machine, f"{machine}.kg", StoredKg, StoredKg, lambda _: StoredKg(sealed=sealed))
        return request

    async def chassis_get(self, machine: str, _: Empty) -> ChassisConfig:
        return await self.store.get(f"{machine}.chassis", ChassisConfig, ChassisConfig)

    async def chassis_set(self, machine: str, request: ChassisUpdate) -> ChassisConfig:
        """Merge boot parameters; set the restore policy, the asset tag, and chassis identify (on
        for ``identify_seconds`` from now, or forced on until turned off)."""
        if isinstance(request.asset_tag, str) and not request.asset_tag.isprintable():
            raise BusError("bad_request", f"an asset tag is printable text: {request.asset_tag!r}")
        changes = _changes(request, ("boot_params", "identify_seconds"))
        if request.identify_seconds is not UNSET:
            changes["identify_until"] = time.time() + request.identify_seconds

        def change(config: ChassisConfig) -> ChassisConfig:
            return msgspec.structs.replace(config, boot_params={**config.boot_params, **request.boot_params},
                                           **changes)

        return await self._modify("chassis", machine, f"{machine}.chassis", ChassisConfig,
                                  ChassisConfig, change)

    # ------------------------------------------------------------------ the BMC's own settings and clock

    async def manager_get(self, machine: str, _: Empty) -> ManagerSettings:
        return await self.store.get(f"{machine}.manager", ManagerSettings, lambda: ManagerSettings(host_name=machine))

    async def manager_set(self, machine: str, request: ManagerSettingsUpdate) -> ManagerSettings:
        """Check and store the changes; ``clock`` is kept as the offset of the BMC's clock from this host's."""
        if (wrong := manager_settings.problem(request)) is not None:
            raise BusError("bad_request", wrong)
        changes = _changes(request, ("clock",))
        if request.clock is not UNSET:
            changes["clock_offset"] = request.clock - time.time()
        return await self._modify("manager", machine, f"{machine}.manager", ManagerSettings,
                                  lambda: ManagerSettings(host_name=machine),
                                  lambda settings: msgspec.structs.replace(settings, **changes))

    async def bmc_time(self, machine: str, host_time: float | None = None) -> int:
        """The BMC's clock, the SEL time (IPMI v2.0 §31.10), at ``host_time`` (now by default)."""
        return int(manager_settings.bmc_time(await self.manager_get(machine, Empty()), host_time))

    # ------------------------------------------------------------------ system event log

    async def sel_get(self, machine: str, _: Empty) -> SelLog:
        return await self.store.get(f"{machine}.sel", SelLog, lambda: SelLog(entries=[]))

    async def sel_add(self, machine: str, request: SelAdd) -> SelEntry:
        """Append a record; when the log is full the oldest records go (a ring, as many BMCs keep)."""
        if len(request.data) != (9 if sel_timestamped(request.record_type) else 13):
            raise BusError("bad_request", f"record type {request.record_type:#04x} has "
                           f"{9 if sel_timestamped(request.record_type) else 13} data bytes")
        now = await self.bmc_time(machine)
        added: list[SelEntry] = []

        def change(log: SelLog) -> SelLog:
            next_id = (log.entries[-1].record_id % 0xFFFE) + 1 if log.entries else 1
            entry = SelEntry(record_id=next_id, record_type=request.record_type,
                             timestamp=now if request.timestamp is None else request.timestamp, data=request.data)
            added[:] = [entry]
            entries = [*log.entries, entry][-log.capacity:]
            return msgspec.structs.replace(log, entries=entries, last_add=now)

        await self._modify("sel", machine, f"{machine}.sel", SelLog, lambda: SelLog(entries=[]),
                           change)
        return added[0]

    async def sel_clear(self, machine: str, _: Empty) -> SelLog:
        now = await self.bmc_time(machine)
        return await self._modify("sel", machine, f"{machine}.sel", SelLog, lambda: SelLog(entries=[]),
                                       lambda log: msgspec.structs.replace(log, entries=[], last_erase=now))

    def endpoints(self) -> list[bus.Endpoint]:
        table = [
            (subjects.USERS_LIST, Empty, self.users_list),
            (subjects.USERS_GET, UserRef, self.users_get),
            (subjects.USERS_SET, UserUpdate, self.users_set),
            (subjects.USERS_ACCESS, UserAccessUpdate, self.users_access),
            (subjects.USERS_PASSWORD, PasswordSet, self.users_password),
            (subjects.USERS_CHECK, PasswordCheck, self.users_check),
            (subjects.USERS_CREDENTIALS, CredentialsRequest, self.users_credentials),
            (subjects.LOGIN_CHECK, LoginAttempt, self.login_check),
            (subjects.LOGIN_RESULT, LoginOutcome, self.login_result),
            (subjects.LOGIN_UNLOCK, LoginUnlock, self.login_unlock),
            (subjects.ACCOUNT_POLICY_GET, Empty, self.policy_get),
            (subjects.ACCOUNT_POLICY_SET, AccountPolicyUpdate, self.policy_set),
            (subjects.CHANNEL_GET, ChannelRef, self.channel_get),
            (subjects.CHANNEL_SET, ChannelAccessUpdate, self.channel_set),
            (subjects.LAN_GET, LanRef, self.lan_get),
            (subjects.LAN_SET, LanParamSet, self.lan_set),
            (subjects.SOL_GET, Empty, self.sol_get),
            (subjects.SOL_SET, SolParamSet, self.sol_set),
            (subjects.KG_GET, Empty, self.kg_get),
            (subjects.KG_SET, KgKey, self.kg_set),
            (subjects.CHASSIS_GET, Empty, self.chassis_get),
            (subjects.CHASSIS_SET, ChassisUpdate, self.chassis_set),
            (subjects.MANAGER_GET, Empty, self.manager_get),
            (subjects.MANAGER_SET, ManagerSettingsUpdate, self.manager_set),
            (subjects.SEL_GET, Empty, self.sel_get),
            (subjects.SEL_ADD, SelAdd, self.sel_add),
            (subjects.SEL_CLEAR, Empty, self.sel_clear),
        ]
        return [bus.Endpoint(name=operation.replace(".", "-"), subject=subjects.any_machine(operation),
                             request_type=request_type, handler=self._serving_known_machines(handler))
                for operation, request_type, handler in table]


async def serve(nc: Client, config: Config, stop: asyncio.Event) -> None:
    try:
        box = SecretBox.from_key_file(config.state.key_file)
    except (SecretError, OSError) as exc:
        raise SystemExit(f"qemu-bmc-state: key file: {exc}") from None
    store = Store(await open_bucket(nc))
    await store.start()
    state = StateService(store, box, config, nc)
    for machine in config.vms:
        await state.seed(machine)
    service = await bus.serve(nc, name=SERVICE_NAME, version=__version__,
                              description="BMC state: users, channel access, LAN and SOL parameters, K_G",
                              endpoints=state.endpoints(),
                              metadata={"machines": ",".join(config.machine_names)})
    feed = await SelFeed(nc, state).start()
    log.info("serving BMC state of %d machine(s)", len(config.vms))
    try:
        await stop.wait()
    finally:
        await feed.stop()
        await service.stop()
        await store.stop()


def main() -> None:
    args = argument_parser("qemu-bmc state service: BMC users and configuration over NATS").parse_args()
    run_service(SERVICE_NAME, args, serve)
