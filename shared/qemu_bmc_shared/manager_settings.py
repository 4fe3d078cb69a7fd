"""The BMC's own settings (:class:`~qemu_bmc_shared.messages.ManagerSettings`): the checks the
state service makes before it stores them and the front-ends make to name what a client got
wrong, and the BMC's clock."""

from __future__ import annotations

import ipaddress
import re
import time
from datetime import timedelta, timezone

from .messages import Ipv6Address, ManagerSettings, ManagerSettingsUpdate

#: DNS and NTP servers a BMC keeps (a resolver reads three: MAXNS of resolv.h).
MAX_SERVERS = 3
MAX_IPV6_ADDRESSES = 4
#: One static IPv6 default gateway: Redfish's IPv6DefaultGateway names one.
MAX_IPV6_GATEWAYS = 1
#: SEL timestamps are 32-bit seconds since 1970; FFFFFFFFh means "unspecified" (IPMI v2.0 §31.10, §37).
LAST_SEL_TIME = 0xFFFFFFFE
#: A host name label (RFC 1123 §2.1): letters, digits and hyphens, not first or last.
LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
#: Redfish DateTimeLocalOffset (Manager schema's pattern).
LOCAL_OFFSET = re.compile(r"^([-+])([01][0-9]):([0-5][0-9])$")


def host_name_ok(name: str) -> bool:
    """One DNS label (RFC 1123)."""
    return bool(LABEL.match(name))


def domain_name_ok(name: str) -> bool:
    """Empty (no domain), or DNS labels separated by dots, at most 253 characters (RFC 1035 §2.3.4)."""
    return not name or (len(name) <= 253 and all(LABEL.match(label) for label in name.split(".")))


def address_ok(text: str) -> bool:
    """An IPv4 or IPv6 address a host can have (not 0.0.0.0, ::, nor a multicast address)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (address.is_unspecified or address.is_multicast)


def server_ok(text: str) -> bool:
    """A server given by IP address or by DNS name."""
    if address_ok(text):
        return True
    name = text.rstrip(".")
    return bool(name) and not name.replace(".", "").isdigit() and domain_name_ok(name)


def ipv6_ok(entry: Ipv6Address) -> bool:
    """A static IPv6 address or gateway: IPv6, not ::, ::1 nor multicast; a prefix of 1 to 128 bits."""
    try:
        address = ipaddress.IPv6Address(entry.address)
    except ValueError:
        return False
    unicast = not (address.is_unspecified or address.is_loopback or address.is_multicast)
    return unicast and 0 < entry.prefix_length <= 128


def local_offset_ok(text: str) -> bool:
    """``[+-]hh:mm`` from -12:00 to +14:00 (the offsets of the world's time zones)."""
    match = LOCAL_OFFSET.match(text)
    if not match:
        return False
    minutes = (int(match[2]) * 60 + int(match[3])) * (-1 if match[1] == "-" else 1)
    return -12 * 60 <= minutes <= 14 * 60


def local_zone(offset: str) -> timezone:
    """The time zone of a local offset that ``local_offset_ok`` accepts."""
    sign = -1 if offset.startswith("-") else 1
    return timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))


def clock_ok(seconds: float) -> bool:
    """A time the SEL can stamp records with (1970 to 2106)."""
    return 0 <= seconds <= LAST_SEL_TIME


def problem(update: ManagerSettingsUpdate) -> str | None:
    """What is wrong with ``update``, or None."""
    if isinstance(update.host_name, str) and not host_name_ok(update.host_name):
        return f"host name {update.host_name!r}: one DNS label of letters, digits and hyphens (RFC 1123)"
    if isinstance(update.domain_name, str) and not domain_name_ok(update.domain_name):
        return f"domain name {update.domain_name!r}: DNS labels separated by dots"
    for field, servers, check in (("name_servers", update.name_servers, address_ok),
                                  ("ntp_servers", update.ntp_servers, server_ok)):
        if isinstance(servers, list):
            if len(servers) > MAX_SERVERS:
                return f"{field}: at most {MAX_SERVERS}"
            if bad := [server for server in servers if not check(server)]:
                return f"{field}: not an IP address{'' if check is address_ok else ' or DNS name'}: {bad[0]!r}"
    for field, entries, limit in (("ipv6_addresses", update.ipv6_addresses, MAX_IPV6_ADDRESSES),
                                  ("ipv6_gateways", update.ipv6_gateways, MAX_IPV6_GATEWAYS)):
        if isinstance(entries, list):
            if len(entries) > limit:
                return f"{field}: at most {limit}"
            if bad_entries := [entry for entry in entries if not ipv6_ok(entry)]:
                return f"{field}: not a unicast IPv6 address with a prefix length: {bad_entries[0].address!r}"
    if isinstance(update.clock, float | int) and not clock_ok(update.clock):
        return f"clock {update.clock}: seconds since 1970, before 2106 (a 32-bit SEL timestamp)"
    if isinstance(update.local_offset, str) and not local_offset_ok(update.local_offset):
        return f"local offset {update.local_offset!r}: [+-]hh:mm from -12:00 to +14:00"
    return None


def bmc_time(settings: ManagerSettings, host_time: float | None = None) -> float:
    """The BMC's clock at ``host_time`` (now by default): the host's clock plus the offset a
    client set (Redfish DateTime, IPMI Set SEL Time)."""
    return (time.time() if host_time is None else host_time) + settings.clock_offset
