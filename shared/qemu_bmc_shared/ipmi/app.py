"""Application commands (netfn 0x06): device identity, the system interface's message flags,
channels, users and keys (IPMI v2.0 §20-22)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from importlib import metadata

from .. import subjects
from ..messages import (
    ChannelAccess,
    ChannelAccessUpdate,
    ChannelRef,
    Credentials,
    CredentialsRequest,
    Empty,
    Inventory,
    KgKey,
    PasswordSet,
    User,
    UserAccessUpdate,
    UserChannelAccess,
    UserList,
    UserRef,
    UserUpdate,
    WatchdogStatus,
)
from .core import (
    CIPHER_SUITES,
    CURRENT_CHANNEL,
    LAN_CHANNEL,
    SYSTEM_INTERFACE,
    Completion,
    Context,
    IpmiError,
    NetFn,
    Privilege,
    expect_length,
    lan_channel,
    registry,
)
from .transport import auth_type_support, supported_cipher_suites

command = registry.command

MAX_USERS = 15
#: IANA enterprise number of the IPMI forum, used for channel vendor ids (IPMI v2.0 §22.24).
IPMI_IANA = (7154).to_bytes(3, "little")

#: Set BMC Global Enables per machine (only the system interface uses them; not persisted).
_global_enables: dict[str, int] = {}


def _firmware_revision() -> bytes:
    """qemu-bmc's version as Get Device ID's firmware revision: major, then minor in BCD."""
    try:
        major, minor = (int(part) for part in metadata.version("qemu-bmc").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        major, minor = 0, 0
    return bytes([major & 0x7F, ((minor // 10) % 10) << 4 | minor % 10])


FIRMWARE_REVISION = _firmware_revision()


def ipmi_guid(value: uuid.UUID) -> bytes:
    """A GUID as IPMI sends it: least significant byte first, the RFC 4122 bytes reversed (§20.8)."""
    return value.bytes[::-1]


def user_id(data: int) -> int:
    """A user id from its request byte (bits 5:0); 1-15, or 0xCC."""
    slot = data & 0x3F
    if not 1 <= slot <= MAX_USERS:
        raise IpmiError(Completion.INVALID_FIELD, f"user id {slot} out of 1..{MAX_USERS}")
    return slot


# ---------------------------------------------------------------- device and system interface

@command(NetFn.APP, 0x01, Privilege.USER)
async def get_device_id(context: Context, data: bytes) -> bytes:
    """Get Device ID (§20.1): an IPMI 2.0 BMC (device id 0x20) with chassis, SEL, SDR, FRU and
    sensor support."""
    return bytes([0x20, 0x01]) + FIRMWARE_REVISION + bytes([0x02, 0x8F]) + bytes(5)


@command(NetFn.APP, 0x04, Privilege.USER)
async def get_self_test_results(context: Context, data: bytes) -> bytes:
    """Get Self Test Results (§20.4): 0x55, no error."""
    return b"\x55\x00"


@command(NetFn.APP, 0x08, Privilege.USER)
async def get_device_guid(context: Context, data: bytes) -> bytes:
    """Get Device GUID (§20.8): the BMC's own GUID, stable per machine name."""
    return ipmi_guid(uuid.UUID(bytes=hashlib.sha256(f"qemu-bmc-device:{context.machine}".encode()).digest()[:16],
                               version=4))


@command(NetFn.APP, 0x37, Privilege.USER)
async def get_system_guid(context: Context, data: bytes) -> bytes:
    """Get System GUID (§22.14): the machine's SMBIOS UUID."""
    inventory = await context.call(subjects.INVENTORY_GET, None, Inventory)
    return ipmi_guid(uuid.UUID(inventory.uuid))


@command(NetFn.APP, 0x2E, Privilege.ADMINISTRATOR)
async def set_bmc_global_enables(context: Context, data: bytes) -> bytes:
    """Set BMC Global Enables (§22.1)."""
    expect_length(data, 1, 1)
    _global_enables[context.machine] = data[0]
    return b""


@command(NetFn.APP, 0x2F, Privilege.USER)
async def get_bmc_global_enables(context: Context, data: bytes) -> bytes:
    """Get BMC Global Enables (§22.2); System Event Logging enabled by default."""
    return bytes([global_enables(context.machine)])


def global_enables(machine: str) -> int:
    """The machine's BMC Global Enables (§22.1): bit 0 receive message queue interrupt, bit 1
    event message buffer full interrupt, bit 2 event message buffer, bit 3 system event logging."""
    return _global_enables.get(machine, 0x08)


#: Get/Clear Message Flags bit 3: "watchdog pre-timeout interrupt occurred" (§22.3, §22.4).
WATCHDOG_PRETIMEOUT_FLAG = 0x08


async def _watchdog(context: Context, operation: str) -> WatchdogStatus | None:
    """The machine service's watchdog timer, after ``operation``; None when no machine service
    owns the machine (then no timer runs, and no pre-timeout can have occurred)."""
    try:
        return await context.call(operation, None, WatchdogStatus)
    except IpmiError as error:
        if error.completion == Completion.DESTINATION_UNAVAILABLE:
            return None
        raise


@command(NetFn.APP, 0x30, Privilege.USER)
async def clear_message_flags(context: Context, data: bytes) -> bytes:
    """Clear Message Flags (§22.3): bit 3 clears the watchdog pre-timeout flag; no message or
    event is ever queued, so the other bits have nothing to clear."""
    expect_length(data, 1, 1)
    if data[0] & WATCHDOG_PRETIMEOUT_FLAG:
        await _watchdog(context, subjects.WATCHDOG_PRETIMEOUT_CLEAR)
    return b""


@command(NetFn.APP, 0x31, Privilege.USER)
async def get_message_flags(context: Context, data: bytes) -> bytes:
    """Get Message Flags (§22.4): bit 3 while the watchdog's pre-timeout interrupt occurred and was
    not cleared; never a message or an event."""
    watchdog = await _watchdog(context, subjects.WATCHDOG_GET)
    return bytes([WATCHDOG_PRETIMEOUT_FLAG if watchdog is not None and watchdog.pretimeout_occurred else 0])


@command(NetFn.APP, 0x33, Privilege.USER)
async def get_message(context: Context, data: bytes) -> bytes:
    """Get Message (§22.6): the receive message queue is always empty (0x80)."""
    raise IpmiError(0x80, "no message")


@command(NetFn.APP, 0x35, Privilege.USER)
async def read_event_message_buffer(context: Context, data: bytes) -> bytes:
    """Read Event Message Buffer (§22.8): always empty (0x80)."""
    raise IpmiError(0x80, "no event")


# ---------------------------------------------------------------- channels

def _requested_channel(context: Context, channel: int) -> int:
    channel &= 0x0F
    return context.channel if channel == CURRENT_CHANNEL else channel


async def _channel_access(context: Context, volatile: bool = True) -> ChannelAccess:
    return await context.call(subjects.CHANNEL_GET, ChannelRef(channel=LAN_CHANNEL, volatile=volatile), ChannelAccess)


@command(NetFn.APP, 0x38, Privilege.CALLBACK, sessionless=True)
async def get_channel_authentication_capabilities(context: Context, data: bytes) -> bytes:
    """Get Channel Authentication Capabilities (§22.13): the authentication types, the login
    kinds (null and non-null user names), K_G and, when asked, the IPMI 2.0 extension."""
    expect_length(data, 2, 2)
    channel = lan_channel(context, data[0])
    if not Privilege.CALLBACK <= data[1] & 0x0F <= Privilege.OEM:
        raise IpmiError(Completion.INVALID_FIELD, "requested privilege level out of range")
    users, access, kg = await asyncio.gather(context.call(subjects.USERS_LIST, Empty(), UserList),
                                             _channel_access(context),
                                             context.call(subjects.KG_GET, None, KgKey))
    auth_types = auth_type_support(context)
    extended = bool(data[0] & 0x80)
    can_log_in = [user for user in users.users if user.enabled and not user.password_change_required and
                  (grant := user.channels.get(LAN_CHANNEL)) is not None and grant.ipmi_messaging]
    login = ((0x04 if any(user.name for user in can_log_in) else 0)
             | (0x02 if any(not user.name and user.password_set for user in can_log_in) else 0)
             | (0x01 if any(not user.name and not user.password_set for user in can_log_in) else 0))
    flags = ((0x20 if kg.key and any(kg.key) else 0) | (0 if access.per_message_auth else 0x10)
             | (0 if access.user_auth else 0x08) | login)
    return (bytes([channel, auth_types | (0x80 if extended else 0), flags, 0x03 if extended else 0x00])
            + bytes(4))


@command(NetFn.APP, 0x54, Privilege.CALLBACK, sessionless=True)
async def get_channel_cipher_suites(context: Context, data: bytes) -> bytes:
    """Get Channel Cipher Suites (§22.15): with list index bit 7 the suite records (start of
    record 0xC0, suite id, then its authentication, integrity and confidentiality algorithms),
    without it each supported algorithm once (with its tag bits); 16 bytes per index."""
    expect_length(data, 3, 3)
    channel = lan_channel(context, data[0])
    if data[1] > 0x3F:
        raise IpmiError(Completion.INVALID_FIELD, "payload type out of range")
    suites = {suite: bytes([auth, 0x40 | integrity, 0x80 | confidentiality])
              for suite in supported_cipher_suites(context)
              for auth, integrity, confidentiality in [CIPHER_SUITES[suite]]}
    if data[2] & 0x80:
        records = b"".join(bytes([0xC0, suite]) + algorithms for suite, algorithms in suites.items())
    else:
        records = bytes(sorted({algorithm for algorithms in suites.values() for algorithm in algorithms}))
    index = data[2] & 0x3F
    return bytes([channel]) + records[index * 16:index * 16 + 16]


@command(NetFn.APP, 0x40, Privilege.ADMINISTRATOR)
async def set_channel_access(context: Context, data: bytes) -> bytes:
    """Set Channel Access (§22.22): access mode, authentication and alerting switches and the
    privilege limit, volatile and/or non-volatile."""
    expect_length(data, 3, 3)
    channel = lan_channel(context, data[0])
    access_selector, limit_selector, limit = data[1] >> 6, data[2] >> 6, data[2] & 0x0F
    if access_selector == 3 or limit_selector == 3 or (access_selector and data[1] & 0x07 > 3):
        raise IpmiError(Completion.INVALID_FIELD, "reserved selector or access mode")
    if limit_selector and not Privilege.CALLBACK <= limit <= Privilege.OEM:
        raise IpmiError(Completion.INVALID_FIELD, "privilege limit out of range")
    for volatile, wanted in ((False, 1), (True, 2)):
        update = ChannelAccessUpdate(channel=channel, volatile=volatile)
        if access_selector == wanted:
            update.access_mode = data[1] & 0x07
            update.alerting, update.per_message_auth, update.user_auth = (
                not data[1] & 0x20, not data[1] & 0x10, not data[1] & 0x08)
        if limit_selector == wanted:
            update.privilege_limit = limit
        if access_selector == wanted or limit_selector == wanted:
            await context.call(subjects.CHANNEL_SET, update, ChannelAccess)
    return b""


@command(NetFn.APP, 0x41, Privilege.USER)
async def get_channel_access(context: Context, data: bytes) -> bytes:
    """Get Channel Access (§22.23), volatile (selector 10b) or non-volatile (01b)."""
    expect_length(data, 2, 2)
    channel = lan_channel(context, data[0])
    selector = data[1] >> 6
    if selector not in (1, 2):
        raise IpmiError(Completion.INVALID_FIELD, "access selector must be volatile or non-volatile")
    access = await context.call(subjects.CHANNEL_GET, ChannelRef(channel=channel, volatile=selector == 2),
                                ChannelAccess)
    return bytes([(0 if access.alerting else 0x20) | (0 if access.per_message_auth else 0x10)
                  | (0 if access.user_auth else 0x08) | access.access_mode, access.privilege_limit])


@command(NetFn.APP, 0x42, Privilege.USER)
async def get_channel_info(context: Context, data: bytes) -> bytes:
    """Get Channel Info (§22.24): channel 1 is an 802.3 LAN, multi-session; 15 is the KCS system
    interface, session-less. Other channels are not implemented (0xCC)."""
    expect_length(data, 1, 1)
    channel = _requested_channel(context, data[0])
    if channel == LAN_CHANNEL:
        sessions = int(context.extra.get("active_sessions", 0)) & 0x3F
        return bytes([channel, 0x04, 0x01, 0x80 | sessions]) + IPMI_IANA + b"\x00\x00"
    if channel == SYSTEM_INTERFACE:
        return bytes([channel, 0x0C, 0x05, 0x00]) + IPMI_IANA + b"\xff\xff"
    raise IpmiError(Completion.INVALID_FIELD, f"channel {channel} is not implemented")


# ---------------------------------------------------------------- users

@command(NetFn.APP, 0x43, Privilege.ADMINISTRATOR)
async def set_user_access(context: Context, data: bytes) -> bytes:
    """Set User Access (§22.26): a user's privilege limit and, when bit 7 says so, its callback,
    link authentication and IPMI messaging switches on a channel."""
    expect_length(data, 3, 4)
    channel = lan_channel(context, data[0])
    slot, limit = user_id(data[1]), data[2] & 0x0F
    if limit not in (1, 2, 3, 4, 5, 0x0F):
        raise IpmiError(Completion.INVALID_FIELD, "privilege limit out of range")
    if len(data) == 4 and data[3] & 0x0F:
        raise IpmiError(Completion.INVALID_FIELD, "user session limits are not supported")
    update = UserAccessUpdate(slot=slot, channel=channel, privilege=limit)
    if data[0] & 0x80:
        update.callback_only, update.link_auth, update.ipmi_messaging = (
            bool(data[0] & 0x40), bool(data[0] & 0x20), bool(data[0] & 0x10))
    await context.call(subjects.USERS_ACCESS, update, User)
    return b""


@command(NetFn.APP, 0x44, Privilege.OPERATOR)
async def get_user_access(context: Context, data: bytes) -> bytes:
    """Get User Access (§22.27): the user count (15, one fixed name: the null user), whether
    this user is enabled, and its access on the channel."""
    expect_length(data, 2, 2)
    channel = lan_channel(context, data[0])
    slot = user_id(data[1])
    users = (await context.call(subjects.USERS_LIST, Empty(), UserList)).users
    user = next(user for user in users if user.slot == slot)
    access = user.channels.get(channel, UserChannelAccess())
    enabled = sum(1 for other in users if other.enabled)
    return bytes([MAX_USERS, (0x40 if user.enabled else 0x80) | enabled, 1,
                  (0x40 if access.callback_only else 0) | (0x20 if access.link_auth else 0)
                  | (0x10 if access.ipmi_messaging else 0) | access.privilege])


@command(NetFn.APP, 0x45, Privilege.ADMINISTRATOR)
async def set_user_name(context: Context, data: bytes) -> bytes:
    """Set User Name (§22.28): 16 bytes, zero-padded; user 1 is the null user, its name fixed."""
    expect_length(data, 17, 17)
    slot = user_id(data[0])
    name = data[1:].split(b"\0", 1)[0]
    if slot == 1 or not name.isascii() or not all(0x20 <= byte < 0x7F for byte in name):
        raise IpmiError(Completion.INVALID_FIELD, "the null user's name is fixed; names are printable ASCII")
    await context.call(subjects.USERS_SET, UserUpdate(slot=slot, name=name.decode()), User)
    return b""


@command(NetFn.APP, 0x46, Privilege.OPERATOR)
async def get_user_name(context: Context, data: bytes) -> bytes:
    """Get User Name (§22.29)."""
    expect_length(data, 1, 1)
    user = await context.call(subjects.USERS_GET, UserRef(slot=user_id(data[0])), User)
    return user.name.encode().ljust(16, b"\0")


@command(NetFn.APP, 0x47, Privilege.ADMINISTRATOR)
async def set_user_password(context: Context, data: bytes) -> bytes:
    """Set User Password (§22.30): disable, enable, set or test, 16- or 20-byte form (bit 7).
    A failed test answers 0x80 (wrong password) or 0x81 (wrong size)."""
    expect_length(data, 2, 22)
    slot, operation, size = user_id(data[0]), data[1] & 0x03, 20 if data[0] & 0x80 else 16
    if operation in (0, 1):
        await context.call(subjects.USERS_SET, UserUpdate(slot=slot, enabled=operation == 1), User)
        return b""
    expect_length(data, 2 + size, 2 + size)
    password = data[2:].rstrip(b"\0")
    if not password.isascii():
        raise IpmiError(Completion.INVALID_FIELD, "passwords are ASCII")
    if operation == 2:
        await context.call(subjects.USERS_PASSWORD, PasswordSet(slot=slot, password=password.decode()), User)
        return b""
    stored = (await context.call(subjects.USERS_CREDENTIALS, CredentialsRequest(slot=slot), Credentials)).password
    stored_bytes = (stored or "").encode()
    if size == 16 and len(stored_bytes) > 16:
        raise IpmiError(0x81, "the password was set in the 20-byte form")
    if stored is None or stored_bytes != password:
        raise IpmiError(0x80, "password test failed")
    return b""


@command(NetFn.APP, 0x4C, Privilege.ADMINISTRATOR)
async def set_user_payload_access(context: Context, data: bytes) -> bytes:
    """Set User Payload Access (§24.6): enable (00b) or disable (01b) the payloads whose bits
    are set (standard payloads 1-7, OEM payloads 0-7)."""
    expect_length(data, 6, 6)
    channel = lan_channel(context, data[0])
    operation, slot = data[1] >> 6, user_id(data[1])
    if operation > 1:
        raise IpmiError(Completion.INVALID_FIELD, "operation must be enable or disable")
    user = await context.call(subjects.USERS_GET, UserRef(slot=slot), User)
    access = user.channels.get(channel, UserChannelAccess())
    standard, oem = data[2] & 0xFE, data[4]
    if operation == 0:
        payloads, oem_payloads = access.payloads | standard, access.oem_payloads | oem
    else:
        payloads, oem_payloads = access.payloads & ~standard, access.oem_payloads & ~oem
    await context.call(subjects.USERS_ACCESS, UserAccessUpdate(slot=slot, channel=channel, payloads=payloads,
                                                               oem_payloads=oem_payloads), User)
    return b""


@command(NetFn.APP, 0x4D, Privilege.OPERATOR)
async def get_user_payload_access(context: Context, data: bytes) -> bytes:
    """Get User Payload Access (§24.7)."""
    expect_length(data, 2, 2)
    channel = lan_channel(context, data[0])
    user = await context.call(subjects.USERS_GET, UserRef(slot=user_id(data[1])), User)
    access = user.channels.get(channel, UserChannelAccess())
    return bytes([access.payloads & 0xFE, 0, access.oem_payloads, 0])


@command(NetFn.APP, 0x56, Privilege.ADMINISTRATOR)
async def set_channel_security_keys(context: Context, data: bytes) -> bytes:
    """Set Channel Security Keys (§22.25): read or set K_G (key id 1); K_R (0) is the user's
    password here, so it reads as zeros and cannot be set (0x84). Keys are never locked."""
    expect_length(data, 3)
    lan_channel(context, data[0])
    operation, key_id, value = data[1] & 0x03, data[2], data[3:]
    if key_id > 1 or operation > 1:
        raise IpmiError(Completion.INVALID_FIELD, "key id is 0 (K_R) or 1 (K_G); operation read or set")
    if operation == 0:
        expect_length(data, 3, 3)
        key = (await context.call(subjects.KG_GET, None, KgKey)).key if key_id == 1 else None
        return b"\x00" + (key or b"").ljust(20, b"\0")
    if key_id == 0:
        raise IpmiError(0x84, "K_R is not used: the user's password is")
    if len(value) < 20:
        raise IpmiError(0x81, "insufficient key bytes")
    if len(value) > 20:
        raise IpmiError(0x82, "too many key bytes")
    await context.call(subjects.KG_SET, KgKey(key=bytes(value) if any(value) else None), KgKey)
    return b"\x00"

