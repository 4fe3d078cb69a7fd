"""IPMI transport commands (netfn 0x0C): the LAN and SOL configuration parameters.

Each parameter set is a table from parameter number to a :class:`Param` (its size, whether it
can be written, its default, a value check); the state service keeps the written bytes as they
are, so every check is made here. Read-only parameters are computed from the context (what the
LAN front-end really offers), never stored.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .. import subjects
from ..config import IPMI_AUTH_TYPES, IpmiConfig
from ..messages import AccountPolicy, Empty, LanConfig, LanParamSet, LanRef, SolConfig, SolParamSet
from .core import (
    CIPHER_SUITES,
    LAN_CHANNEL,
    Completion,
    Context,
    IpmiError,
    NetFn,
    Privilege,
    expect_length,
    lan_channel,
    registry,
)

#: Parameter revision of the LAN and SOL parameters: present 1, oldest compatible 1 (§23.2, §26.3).
REVISION = 0x11
#: Completion codes of the Set/Get … Configuration Parameters commands (§23.1, §26.2).
PARAMETER_NOT_SUPPORTED = 0x80
SET_IN_PROGRESS_BUSY = 0x81
READ_ONLY_PARAMETER = 0x82

#: Authentication type bits (§22.13): none, MD5, straight password/key (bit n: session header auth type n).
AUTH_NONE, AUTH_MD5, AUTH_PASSWORD = 0x01, 0x04, 0x10
SECONDARY_RMCP_PORT = 664


def supported_cipher_suites(context: Context) -> list[int]:
    """The RMCP+ cipher suite ids the LAN front-end offers: ``extra["cipher_suites"]`` when it
    says, else all qemu-bmc implements, suite 0 only when ``extra["cipher_suite_0"]`` enables it."""
    offered = context.extra.get("cipher_suites")
    if offered is None:
        offered = [suite for suite in CIPHER_SUITES if suite or context.extra.get("cipher_suite_0")]
    return sorted(offered)[:16]  # parameter 23 holds at most 16 entries


def front_end(ipmi: IpmiConfig, address: tuple[str, int] | None = None) -> dict[str, Any]:
    """What the command layer answers about a machine's IPMI over LAN front-end, for the
    ``extra`` of a :class:`Context`: its cipher suites and IPMI 1.5 authentication types
    (``[ipmi]`` in the config; ``auth_types`` as the §22.13 bits) and, given its listen address,
    where clients reach it (LAN parameters 3 and 8)."""
    extra: dict[str, Any] = {
        "cipher_suites": sorted(ipmi.cipher_suites),
        "auth_types": sum(1 << IPMI_AUTH_TYPES[name] for name in set(ipmi.auth_types))}
    if address is not None:
        host, extra["lan_port"] = address
        if reached := reachable_address(host):
            extra["lan_address"] = reached
    return extra


def reachable_address(host: str) -> str | None:
    """The IPv4 address clients reach an endpoint bound to ``host`` at: ``host`` itself, or for
    0.0.0.0 the host's address on its default route (connecting a UDP socket sends nothing)."""
    if host != "0.0.0.0":
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 623))
            return probe.getsockname()[0]
        except OSError:
            return None


def auth_type_support(context: Context) -> int:
    """Authentication types (§22.13) of IPMI 1.5 sessions: those the LAN front-end allows
    (``extra["auth_types"]``); when no front-end says, MD5 and straight password, and none with
    ``extra["auth_none"]``."""
    allowed = context.extra.get("auth_types")
    if allowed is not None:
        return int(allowed)
    return AUTH_MD5 | AUTH_PASSWORD | (AUTH_NONE if context.extra.get("auth_none") else 0)


def _port(context: Context) -> bytes:
    return int(context.extra.get("lan_port", 623)).to_bytes(2, "little")


def _listening_address(context: Context) -> bytes | None:
    """The IPv4 address the LAN front-end listens on, when it says and it is a real one: parameter
    3 until a client sets an address (a client's address is kept and shown, Redfish's too, but the
    front-end keeps listening where its configuration says; 0.0.0.0 goes back to this one)."""
    try:
        address = ipaddress.IPv4Address(context.extra.get("lan_address") or "")
    except ValueError:
        return None
    return None if address.is_unspecified else address.packed


def _cipher_privileges(context: Context) -> bytes:
    """Parameter 24 default: Administrator as the maximum privilege of every supported suite.
    Nibble n (low nibble first) is cipher suite id n, as ipmitool and FreeIPMI read it; ids
    above 15 have no nibble."""
    supported = supported_cipher_suites(context)
    nibbles = [Privilege.ADMINISTRATOR if suite in supported else 0 for suite in range(16)]
    return bytes([0]) + bytes(nibbles[i] | nibbles[i + 1] << 4 for i in range(0, 16, 2))


def cipher_suite_privileges(value: bytes) -> list[int]:
    """Parameter 24's maximum privilege level of cipher suite ids 0-15 (0: the suite is unused),
    from its 9 data bytes. The LAN front-end limits the sessions of each suite to it."""
    return [byte >> shift & 0x0F for byte in value[1:9] for shift in (0, 4)]


async def _bad_password_threshold(context: Context) -> bytes:
    """Parameter 26 (IPMI v2.0 errata): the login lockout of the state service's account policy
    (the same for IPMI and Redfish, counted per user and source address), read-only here: no
    event, N failures within the reset interval lock the user out for the lockout interval (both
    in 10 s units; a lockout repeated without a success between lasts longer each time)."""
    policy = await context.call(subjects.ACCOUNT_POLICY_GET, Empty(), AccountPolicy)
    return bytes([0, min(policy.lockout_threshold, 255)]) + b"".join(
        min(65535, -(-int(seconds) // 10)).to_bytes(2, "little")
        for seconds in (policy.lockout_reset_after, policy.lockout_duration))


def _host_address(value: bytes) -> bool:
    address = ipaddress.IPv4Address(value)
    return not (address.is_multicast or address.is_reserved)  # reserved: 240/4, with 255.255.255.255


def _netmask(value: bytes) -> bool:
    host_bits = ~int.from_bytes(value, "big") & 0xFFFFFFFF
    return host_bits & (host_bits + 1) == 0  # ones then zeros


def _unicast_mac(value: bytes) -> bool:
    return not value[0] & 0x01  # the group bit: multicast and broadcast


def _vlan(value: bytes) -> bool:
    vlan_id = (value[1] & 0x0F) << 8 | value[0]
    return not value[1] & 0x70 and (not value[1] & 0x80 or 1 <= vlan_id <= 4094)


def _nibbles_at_most(limit: int) -> Callable[[bytes], bool]:
    return lambda value: all(byte & 0x0F <= limit and byte >> 4 <= limit for byte in value[1:])


def _byte_in(*allowed: int) -> Callable[[bytes], bool]:
    return lambda value: value[0] in allowed


def _bits_clear(mask: int) -> Callable[[bytes], bool]:
    return lambda value: not any(byte & mask for byte in value)


@dataclass(frozen=True)
class Param:
    """One configuration parameter: ``size`` data bytes; ``live`` computes the answer from the
    context (read-only parameters, or an override of the stored value when it returns bytes);
    ``zero_is_unset``: a stored value of zeros reads as the default."""

    size: int
    default: bytes | Callable[[Context], bytes | None] = b""
    writable: bool = True
    check: Callable[[bytes], bool] = lambda value: True
    live: Callable[[Context], bytes | None] | None = None
    zero_is_unset: bool = False
    fetch: Callable[[Context], Awaitable[bytes]] | None = None
    """A read-only value another service keeps (read from the bus on every Get)."""

    def initial(self, context: Context) -> bytes:
        default = self.default(context) if callable(self.default) else self.default
        return default or bytes(self.size)


def _read_only(size: int, value: Callable[[Context], bytes]) -> Param:
    return Param(size, writable=False, live=value)


#: Parameter 0 of both sets: [1:0] 0 set complete, 1 set in progress, 2 commit write (§23.1).
SET_IN_PROGRESS = Param(1, check=_byte_in(0, 1, 2))

#: LAN Configuration Parameters (§23.2, table 23-4; 50-55 from the IPv6 addendum).
LAN_PARAMS: dict[int, Param] = {
    0: SET_IN_PROGRESS,
    1: _read_only(1, lambda context: bytes([auth_type_support(context)])),
    2: Param(5, lambda context: bytes([auth_type_support(context)]) * 5, check=_bits_clear(0xC8)),  # per privilege
    3: Param(4, _listening_address, check=_host_address, zero_is_unset=True),
    4: Param(1, b"\x01", check=lambda value: value[0] <= 4),  # unspecified, static, DHCP, BIOS, other
    5: Param(6, check=_unicast_mac),
    6: Param(4, bytes([255, 255, 255, 0]), check=_netmask),
    7: Param(3, b"\x40\x40\x10"),  # TTL, flags (don't fragment), precedence and type of service
    8: _read_only(2, _port),
    9: _read_only(2, lambda context: SECONDARY_RMCP_PORT.to_bytes(2, "little")),
    10: Param(1, check=_bits_clear(0xFC)),  # [1] ARP responses, [0] gratuitous ARPs
    11: Param(1),  # gratuitous ARP interval, 500 ms units
    12: Param(4, check=_host_address),
    13: Param(6, check=_unicast_mac),
    14: Param(4, check=_host_address),
    15: Param(6, check=_unicast_mac),
    16: Param(18, b"public".ljust(18, b"\0")),  # community string
    20: Param(2, check=_vlan),  # VLAN id [11:0], [15] enabled
    21: Param(1, check=_bits_clear(0xF8)),  # VLAN priority
    22: _read_only(1, lambda context: bytes([len(supported_cipher_suites(context))])),
    23: _read_only(17, lambda context: bytes([0, *supported_cipher_suites(context)])),
    24: Param(9, _cipher_privileges, check=_nibbles_at_most(Privilege.OEM)),
    26: Param(6, writable=False, fetch=_bad_password_threshold),
    50: _read_only(1, lambda context: b"\x00"),  # IPv4 only: no IPv6, nor both at once
    51: Param(1, check=_byte_in(0)),  # addressing enables: only 0, IPv4 only
    55: _read_only(3, lambda context: bytes(3)),  # IPv6 status: no static, no dynamic address, no DHCPv6/SLAAC
}

#: SOL Configuration Parameters (§26.3, table 26-5).
SOL_PARAMS: dict[int, Param] = {
    0: SET_IN_PROGRESS,
    1: Param(1, b"\x01", check=_bits_clear(0xFE)),  # SOL enable
    2: Param(1, b"\x02", check=lambda value: Privilege.USER <= value[0] & 0x0F <= Privilege.OEM),
    3: Param(2, b"\x0c\x60", check=lambda value: value[0] != 0),  # accumulate interval (5 ms), send threshold
    4: Param(2, b"\x07\x32", check=lambda value: not value[0] & 0xF8),  # retry count, interval (10 ms)
    5: Param(1, b"\x0a", check=_byte_in(0, 6, 7, 8, 9, 10)),  # non-volatile bit rate: serial, 9600 … 115200
    6: Param(1, b"\x0a", check=_byte_in(0, 6, 7, 8, 9, 10)),  # volatile bit rate
    7: _read_only(1, lambda context: bytes([LAN_CHANNEL])),
    8: _read_only(2, _port),
}


@dataclass(frozen=True)
class ParamSet:
    """A parameter table and where its values are stored, with the Get and Set commands' logic."""

    params: dict[int, Param]
    load: Callable[[Context, int], Awaitable[dict[int, bytes]]]
    store: Callable[[Context, int, int, bytes], Awaitable[object]]

    def _param(self, number: int) -> Param:
        if number not in self.params:
            raise IpmiError(PARAMETER_NOT_SUPPORTED, f"parameter {number} is not supported")
        return self.params[number]

    async def get(self, context: Context, data: bytes) -> bytes:
        """Request: channel ([7] revision only), parameter, set selector, block selector."""
        expect_length(data, 4, 4)
        channel = lan_channel(context, data[0])
        if data[0] & 0x80:
            return bytes([REVISION])
        number = data[1]
        param = self._param(number)
        value = param.live(context) if param.live else await param.fetch(context) if param.fetch else None
        if value is None:
            value = (await self.load(context, channel)).get(number)
            if value is None or len(value) != param.size or (param.zero_is_unset and not any(value)):
                value = param.initial(context)
        return bytes([REVISION]) + value

    async def set(self, context: Context, data: bytes) -> bytes:
        """Request: channel, parameter, the parameter's data."""
        expect_length(data, 2)
        channel = lan_channel(context, data[0])
        number, value = data[1], data[2:]
        param = self._param(number)
        if not param.writable:
            raise IpmiError(READ_ONLY_PARAMETER, f"parameter {number} is read-only")
        if len(value) != param.size:
            raise IpmiError(Completion.LENGTH_INVALID, f"parameter {number} has {param.size} data bytes")
        if not param.check(value):
            raise IpmiError(Completion.INVALID_FIELD, f"invalid value {value.hex()} for parameter {number}")
        if number == 0:
            current = (await self.load(context, channel)).get(0, b"\0")
            if value[0] == 1 and current[:1] == b"\x01":
                raise IpmiError(SET_IN_PROGRESS_BUSY, "a set is already in progress")
            value = b"\0" if value[0] == 2 else value  # writes apply at once: a commit completes the set
        await self.store(context, channel, number, value)
        return b""


async def _lan_load(context: Context, channel: int) -> dict[int, bytes]:
    return (await context.call(subjects.LAN_GET, LanRef(channel=channel), LanConfig)).params


async def _lan_store(context: Context, channel: int, number: int, value: bytes) -> object:
    return await context.call(subjects.LAN_SET, LanParamSet(param=number, data=value, channel=channel), LanConfig)


async def _sol_load(context: Context, channel: int) -> dict[int, bytes]:
    return (await context.call(subjects.SOL_GET, Empty(), SolConfig)).params


async def _sol_store(context: Context, channel: int, number: int, value: bytes) -> object:
    return await context.call(subjects.SOL_SET, SolParamSet(param=number, data=value), SolConfig)


LAN = ParamSet(LAN_PARAMS, _lan_load, _lan_store)
SOL = ParamSet(SOL_PARAMS, _sol_load, _sol_store)


@registry.command(NetFn.TRANSPORT, 0x01, Privilege.ADMINISTRATOR)
async def set_lan_configuration_parameters(context: Context, data: bytes) -> bytes:
    """Set LAN Configuration Parameters (IPMI v2.0 §23.1)."""
    return await LAN.set(context, data)


@registry.command(NetFn.TRANSPORT, 0x02, Privilege.OPERATOR)
async def get_lan_configuration_parameters(context: Context, data: bytes) -> bytes:
    """Get LAN Configuration Parameters (IPMI v2.0 §23.2)."""
    return await LAN.get(context, data)


@registry.command(NetFn.TRANSPORT, 0x21, Privilege.ADMINISTRATOR)
async def set_sol_configuration_parameters(context: Context, data: bytes) -> bytes:
    """Set SOL Configuration Parameters (IPMI v2.0 §26.2)."""
    return await SOL.set(context, data)


@registry.command(NetFn.TRANSPORT, 0x22, Privilege.USER)
async def get_sol_configuration_parameters(context: Context, data: bytes) -> bytes:
    """Get SOL Configuration Parameters (IPMI v2.0 §26.3)."""
    return await SOL.get(context, data)
