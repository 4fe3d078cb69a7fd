"""Session commands of IPMI over LAN (IPMI v2.0 §22.15-22.20): they need the session table, so
they live with the transport, in their own registry that extends the shared one."""

from __future__ import annotations

import asyncio
import secrets
import struct
from typing import TYPE_CHECKING

from qemu_bmc_shared import subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.ipmi import Completion, Context, IpmiError, NetFn, Privilege, Registry
from qemu_bmc_shared.ipmi.core import LAN_CHANNEL, expect_length, lan_channel
from qemu_bmc_shared.ipmi.transport import SOL_PARAMS
from qemu_bmc_shared.messages import Empty, SolConfig, User, UserChannelAccess, UserRef

from . import framing
from .sol import MAX_PAYLOAD, SolSession, SolTiming

if TYPE_CHECKING:
    from .server import LanServer
    from .sessions import Session

lan_registry = Registry()
command = lan_registry.command


def server_of(context: Context) -> LanServer:
    return context.extra["lan"]


def session_of(context: Context) -> Session:
    if context.session is None:
        raise IpmiError(Completion.INSUFFICIENT_PRIVILEGE)
    return context.session


#: Get Session Challenge completion codes (§22.16)
INVALID_USER_NAME, NULL_USER_DISABLED = 0x81, 0x82
#: Activate Session completion codes (§22.17)
NO_SESSION_SLOT, INVALID_SESSION_ID, PRIVILEGE_ABOVE_LIMIT = 0x81, 0x85, 0x86


@command(NetFn.APP, 0x39, Privilege.CALLBACK, sessionless=True)
async def get_session_challenge(context: Context, data: bytes) -> bytes:
    """Get Session Challenge (§22.16): a pending IPMI 1.5 session and its challenge, for an
    authentication type ``[ipmi] auth_types`` allows (others: 0xCC) and a user that may log in from
    the requester's address now (0x81 for an unknown, disabled or locked-out name; 0x82 for the
    null user); 0xC0 when the state service cannot tell."""
    expect_length(data, 17, 17)
    auth_type, name = data[0] & 0x0F, data[1:17].rstrip(b"\0")
    server = server_of(context)
    if auth_type not in server.auth_types:
        raise IpmiError(Completion.INVALID_FIELD, "authentication type not enabled")
    address: tuple[str, int] = context.extra["address"]
    try:
        verdict, found = await asyncio.gather(server.login_allowed(name, address[0]), server.user(name))
    except BusError as exc:
        raise IpmiError(Completion.NODE_BUSY, f"the login cannot be checked: {exc}") from None
    if not verdict.allowed:
        raise IpmiError(INVALID_USER_NAME, f"locked out from {address[0]} for {verdict.retry_after:.0f} s")
    if found is None:
        await server.record_login(name, address[0], False)
        raise IpmiError(INVALID_USER_NAME if name else NULL_USER_DISABLED,
                        "invalid user name" if name else "null user not enabled")
    session = server.sessions.open(0, False, address)
    if session is None:
        raise IpmiError(Completion.OUT_OF_SPACE, "no session slot")
    credentials, limit = found
    session.auth_type, session.user_name = auth_type, name
    session.user_slot, session.password = credentials.user.slot, (credentials.password or "").encode()
    session.max_privilege = Privilege(limit)
    session.challenge = secrets.token_bytes(16)
    return struct.pack("<I", session.bmc_id) + session.challenge


@command(NetFn.APP, 0x3A, Privilege.CALLBACK)
async def activate_session(context: Context, data: bytes) -> bytes:
    """Activate Session (§22.17): the packet's auth code has proved the password; the challenge
    must match. The session starts at the requested maximum privilege."""
    expect_length(data, 22, 22)
    session = session_of(context)
    server = server_of(context)
    if session.v2 or session.active:
        raise IpmiError(Completion.NOT_SUPPORTED_IN_STATE)
    auth_type, requested = data[0] & 0x0F, data[1] & 0x0F
    if auth_type != session.auth_type or auth_type not in server.auth_types:
        raise IpmiError(Completion.INVALID_FIELD, "authentication type does not match the challenge or is not enabled")
    if data[2:18] != session.challenge:
        raise IpmiError(INVALID_SESSION_ID, "invalid session challenge")
    if not Privilege.CALLBACK <= requested <= Privilege.ADMINISTRATOR or requested > session.max_privilege:
        raise IpmiError(PRIVILEGE_ABOVE_LIMIT, "requested privilege exceeds the user's or channel's limit")
    if not server.sessions.establish(session):
        raise IpmiError(NO_SESSION_SLOT, "no session slot available")
    server.in_background(server.record_login(session.user_name, session.source, True))
    session.max_privilege = session.privilege = Privilege(requested)
    session.outbound = (struct.unpack("<I", data[18:22])[0] - 1) & 0xFFFFFFFF
    first_inbound = secrets.randbits(31) + 1
    session.inbound.highest = first_inbound - 1
    return bytes([auth_type]) + struct.pack("<II", session.bmc_id, first_inbound) + bytes([requested])


@command(NetFn.APP, 0x3B, Privilege.CALLBACK)
async def set_session_privilege_level(context: Context, data: bytes) -> bytes:
    """Set Session Privilege Level (§22.18): 0 returns the current level."""
    expect_length(data, 1, 1)
    session = session_of(context)
    requested = data[0] & 0x0F
    if requested:
        if requested not in (Privilege.USER, Privilege.OPERATOR, Privilege.ADMINISTRATOR):
            raise IpmiError(0x80, "requested level not available")
        if requested > session.max_privilege:
            raise IpmiError(0x81, "requested level exceeds the user's or channel's limit")
        session.privilege = Privilege(requested)
    return bytes([session.privilege])


@command(NetFn.APP, 0x3C, Privilege.CALLBACK)
async def close_session(context: Context, data: bytes) -> bytes:
    """Close Session (§22.19), by id (or by handle when the id is 0). Closing another user's
    session needs Administrator."""
    expect_length(data, 4, 5)
    server, own = server_of(context), session_of(context)
    bmc_id = struct.unpack("<I", data[:4])[0]
    if bmc_id == 0:
        if len(data) < 5:
            raise IpmiError(Completion.LENGTH_INVALID)
        target = next((s for s in server.sessions.active if s.handle == data[4]), None)
        if target is None:
            raise IpmiError(0x88, "invalid session handle")
    else:
        target = server.sessions.get(bmc_id)
        if target is None:
            raise IpmiError(0x87, "invalid session id")
    if target is not own and own.privilege < Privilege.ADMINISTRATOR:
        raise IpmiError(Completion.INSUFFICIENT_PRIVILEGE)
    server.sessions.close(target.bmc_id)
    if server.sol is not None and server.sol.session is target:
        await server.sol.stop(tell_console=False)
    return b""


@command(NetFn.APP, 0x3D, Privilege.USER)
async def get_session_info(context: Context, data: bytes) -> bytes:
    """Get Session Info (§22.20): by index (0 = this session), handle (0xFE) or id (0xFF)."""
    expect_length(data, 1, 5)
    server, own = server_of(context), session_of(context)
    active = sorted(server.sessions.active, key=lambda s: s.handle)
    index = data[0]
    if index == 0:
        target = own
    elif index == 0xFE:
        expect_length(data, 2, 2)
        target = next((s for s in active if s.handle == data[1]), None)
    elif index == 0xFF:
        expect_length(data, 5, 5)
        target = server.sessions.get(struct.unpack("<I", data[1:5])[0])
    else:
        target = active[index - 1] if index <= len(active) else None
    header = bytes([0, server.sessions.capacity & 0x3F, len(active) & 0x3F])
    if target is None or not target.active:
        return header
    host, port = target.address
    try:
        address = bytes(int(part) for part in host.split("."))
    except ValueError:
        address = bytes(4)
    protocol = 0x10 if target.v2 else 0x00
    return (bytes([target.handle, server.sessions.capacity & 0x3F, len(active) & 0x3F, target.user_slot or 0,
                   target.privilege, protocol | LAN_CHANNEL]) + address.ljust(4, b"\0")[:4] + bytes(6)
            + struct.pack("<H", port))


async def _reset_sessions(context: Context) -> bytes:
    server = server_of(context)
    # after this response has left, in this session
    asyncio.get_running_loop().call_later(0.2, server.sessions.clear)
    return b""


@command(NetFn.APP, 0x02, Privilege.ADMINISTRATOR)
async def cold_reset(context: Context, data: bytes) -> bytes:
    """Cold Reset (§20.2): resets the BMC, i.e. its sessions; never the machine."""
    return await _reset_sessions(context)


@command(NetFn.APP, 0x03, Privilege.ADMINISTRATOR)
async def warm_reset(context: Context, data: bytes) -> bytes:
    """Warm Reset (§20.3): as Cold Reset, for a BMC that is only software."""
    return await _reset_sessions(context)


# ---------------------------------------------------------------------- payloads (§24) and SOL (§26)

PAYLOAD_IPMI, PAYLOAD_SOL = framing.PAYLOAD_IPMI, framing.PAYLOAD_SOL
SOL_INSTANCE = 1
# Activate Payload completion codes (§24.1)
PAYLOAD_ALREADY_ACTIVE = 0x80
PAYLOAD_DISABLED = 0x81
PAYLOAD_CANNOT_ENCRYPT = 0x83
PAYLOAD_MUST_ENCRYPT = 0x84
#: Deactivate Payload: already deactivated (§24.2)
PAYLOAD_NOT_ACTIVE = 0x80
#: SOL payload access bit of Set/Get User Payload Access (§24.6)
SOL_ACCESS_BIT = 1 << PAYLOAD_SOL


async def sol_params(context: Context) -> dict[int, bytes]:
    """SOL parameters 1-4 as stored, defaults where unset."""
    stored = (await context.call(subjects.SOL_GET, Empty(), SolConfig)).params
    values = {}
    for number in (1, 2, 3, 4):
        param, value = SOL_PARAMS[number], stored.get(number)
        values[number] = value if value is not None and len(value) == param.size else param.initial(context)
    return values


def _sol_instance(data: bytes) -> None:
    if data[0] & 0x3F != PAYLOAD_SOL:
        raise IpmiError(Completion.INVALID_FIELD, "only the SOL payload can be activated")
    if data[1] & 0x0F != SOL_INSTANCE:
        raise IpmiError(Completion.INVALID_FIELD, "SOL has one instance")


@command(NetFn.APP, 0x48, Privilege.USER)
async def activate_payload(context: Context, data: bytes) -> bytes:
    """Activate Payload (§24.1): SOL instance 1, one per machine, for a user with SOL payload
    access at the SOL privilege level (parameter 2) or above, while SOL is enabled (parameter 1)."""
    expect_length(data, 6, 6)
    _sol_instance(data)
    server, session = server_of(context), session_of(context)
    if not session.v2 or session.keys is None:
        raise IpmiError(Completion.INVALID_COMMAND, "payloads need an RMCP+ session")
    params = await sol_params(context)
    if not params[1][0] & 0x01:
        raise IpmiError(PAYLOAD_DISABLED, "SOL is disabled")
    if session.privilege < params[2][0] & 0x0F:
        raise IpmiError(Completion.INSUFFICIENT_PRIVILEGE, "SOL needs a higher privilege level")
    user = await context.call(subjects.USERS_GET, UserRef(slot=session.user_slot or 1), User)
    if not user.channels.get(LAN_CHANNEL, UserChannelAccess()).payloads & SOL_ACCESS_BIT:
        raise IpmiError(Completion.INSUFFICIENT_PRIVILEGE, "the user has no SOL payload access")
    if server.sol is not None and not server.sol.alive():  # its session has expired
        await server.sol.stop(tell_console=False)
    if server.sol is not None:
        raise IpmiError(PAYLOAD_ALREADY_ACTIVE, "SOL is already active")
    encrypting = session.keys.confidentiality != 0
    if data[2] & 0x80 and not encrypting:
        raise IpmiError(PAYLOAD_CANNOT_ENCRYPT, "the session has no confidentiality algorithm")
    sol = SolSession(server, session, session.address, SolTiming.from_params(params[3], params[4]))
    server.sol = sol
    await sol.start()
    port = int(server.extra.get("lan_port", 623))  # type: ignore[call-overload]
    return (bytes(4) + struct.pack("<HHHH", MAX_PAYLOAD, MAX_PAYLOAD, port, 0xFFFF))


@command(NetFn.APP, 0x49, Privilege.USER)
async def deactivate_payload(context: Context, data: bytes) -> bytes:
    """Deactivate Payload (§24.2), from this or another session."""
    expect_length(data, 6, 6)
    _sol_instance(data)
    server = server_of(context)
    session_of(context)
    if server.sol is None or not server.sol.alive():
        if server.sol is not None:
            await server.sol.stop(tell_console=False)
        raise IpmiError(PAYLOAD_NOT_ACTIVE, "SOL is not active")
    await server.sol.stop()
    return b""


@command(NetFn.APP, 0x4A, Privilege.USER)
async def get_payload_activation_status(context: Context, data: bytes) -> bytes:
    """Get Payload Activation Status (§24.4): instance capacity, then one bit per instance."""
    expect_length(data, 1, 1)
    payload_type = data[0] & 0x3F
    if payload_type == PAYLOAD_SOL:
        sol = server_of(context).sol
        return bytes([1, 0x01 if sol is not None and sol.alive() else 0x00, 0])
    if payload_type == PAYLOAD_IPMI:
        return bytes([1, 0x01, 0])
    raise IpmiError(Completion.INVALID_FIELD, "payload type not supported")


@command(NetFn.APP, 0x4B, Privilege.USER)
async def get_payload_instance_info(context: Context, data: bytes) -> bytes:
    """Get Payload Instance Info (§24.5): the session the instance is active on; for SOL, the
    serial port it is on (1)."""
    expect_length(data, 2, 2)
    _sol_instance(data)
    sol = server_of(context).sol
    if sol is None or not sol.alive():
        return bytes(12)
    return struct.pack("<I", sol.session.bmc_id) + bytes([1]) + bytes(7)


@command(NetFn.APP, 0x4E, Privilege.USER)
async def get_channel_payload_support(context: Context, data: bytes) -> bytes:
    """Get Channel Payload Support (§24.8): IPMI and SOL; the RMCP+ session setup payloads."""
    expect_length(data, 1, 1)
    lan_channel(context, data[0])
    return bytes([1 << PAYLOAD_IPMI | 1 << PAYLOAD_SOL, 0, 0x3F, 0, 0, 0, 0, 0])


@command(NetFn.APP, 0x4F, Privilege.USER)
async def get_channel_payload_version(context: Context, data: bytes) -> bytes:
    """Get Channel Payload Version (§24.9): format version 1.0 of IPMI and SOL."""
    expect_length(data, 2, 2)
    lan_channel(context, data[0])
    if data[1] not in (PAYLOAD_IPMI, PAYLOAD_SOL):
        raise IpmiError(0x80, "payload type not available on this channel")
    return b"\x10"
