"""Where the BMC may be sent: the addresses of virtual media and firmware images (fetched by the
machine service and QEMU) and of event destinations (POSTed to by this service).

An Administrator must not be able to make the BMC's host reach what only that host reaches: a
target whose host name resolves to a loopback, link-local (169.254.0.0/16, fe80::/10: cloud
metadata services live there), unspecified, multicast or reserved address, or to an address of the
BMC's own (this host's addresses, the IPMI over LAN addresses the services announce), is refused,
unless ``[redfish] allow_internal_targets = true``. Every address the name resolves to is checked
(an IPv4-mapped IPv6 address as its IPv4 address). A name that does not resolve is not refused
here: nothing is reached through it now, and the fetch itself fails.

Event deliveries check again when they connect, and connect to the address they checked (see
:meth:`Targets.pinned`), so that a name that resolves to something else by then (DNS rebinding)
reaches nothing internal. An image is fetched by the machine service (QEMU's curl driver), which
resolves the name itself: the check when the request is made is all there is for images."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
DEFAULT_PORTS = {"http": 80, "https": 443}


class TargetRefused(Exception):
    """A target the BMC must not reach; the message says why (for the client)."""


def kind_of(address: Address) -> str | None:
    """What makes ``address`` internal, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified or address in THIS_NETWORK:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    return None


def on_this_host(address: Address) -> bool:
    """``address`` is one of this host's own: a datagram socket connected to it gets it as its
    source address (the kernel's local route; nothing is sent)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(address), 9))
        except OSError:
            return False
        return ipaddress.ip_address(probe.getsockname()[0].split("%")[0]) == address


class Targets:
    """The check of outbound targets. ``own_addresses`` gives the ``host:port`` addresses the
    services announce (the IPMI over LAN endpoints), which are the BMC's own wherever they run."""

    def __init__(self, allow_internal: bool, own_addresses: Callable[[], list[str]]) -> None:
        self.allow_internal = allow_internal
        self.own_addresses = own_addresses

    async def resolve(self, host: str, port: int) -> list[Address]:
        try:
            return [ipaddress.ip_address(host.strip("[]").split("%")[0])]
        except ValueError:
            pass
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return []
        return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found))

    def refusal(self, host: str, address: Address) -> str | None:
        kind = kind_of(address)
        if kind is None:
            announced = {where.rpartition(":")[0].strip("[]") for where in self.own_addresses()}
            if str(address) in announced or on_this_host(address):
                kind = "the BMC's own"
        if kind is None:
            return None
        shown = host if host.strip("[]") == str(address) else f"{host} ({address})"
        return f"{shown} is a {kind} address, which the BMC does not reach ([redfish] allow_internal_targets)"

    async def check(self, url: str) -> list[Address]:
        """The addresses of ``url``'s host (none: it does not resolve); TargetRefused when one of
        them is internal and internal targets are not allowed."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        addresses = await self.resolve(host, parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 80))
        if not self.allow_internal:
            for address in addresses:
                reason = self.refusal(host, address)
                if reason is not None:
                    raise TargetRefused(reason)
        return addresses

    async def pinned(self, url: str) -> tuple[str, dict[str, str], dict[str, str]] | None:
        """The request for ``url`` made to the address just checked: the URL with that address
        for its host, the Host header, and the TLS server name (httpx's ``sni_hostname``
        extension); None for a name that does not resolve (nothing is to be sent: httpx would
        resolve it again). TargetRefused as :meth:`check`."""
        if self.allow_internal:
            return url, {}, {}
        addresses = await self.check(url)
        if not addresses:
            return None
        original = httpx.URL(url)
        pinned = original.copy_with(host=str(addresses[0]))
        named = original.host != str(addresses[0])  # not an address already (TLS sends no name for those)
        extensions = {"sni_hostname": original.host} if original.scheme == "https" and named else {}
        return str(pinned), {"Host": original.netloc.decode("ascii")}, extensions
