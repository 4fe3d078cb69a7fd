"""The BMC's network settings as a Redfish EthernetInterface (and the names and NTP servers of its
ManagerNetworkProtocol): what they look like, and what a PATCH of them changes.

Two stores lie behind them, both the state service's:

* the IPv4 configuration and the VLAN are the IPMI LAN configuration parameters (IPMI v2.0 §23.2:
  3 IP address, 4 its source, 5 MAC, 6 subnet mask, 12 default gateway, 20 VLAN id, 21 VLAN
  priority), so that ``ipmitool lan print`` shows what Redfish set and Redfish what ``ipmitool lan
  set`` did; a value Redfish writes passes the same checks as Set LAN Configuration Parameters;
* the host and domain name, DNS and NTP servers and the static IPv6 configuration are the
  ManagerSettings.

The IP address is the one a client set; until one is set (or once it is cleared, 0.0.0.0 over
IPMI, an empty IPv4StaticAddresses over Redfish) it is the address the IPMI over LAN front-end
listens on. Setting it changes what the BMC reports, not where the front-end listens, which is the
operator's configuration (``ipmi = "host:port"``). Setting a static address makes the address
source static. There is no DHCP nor DHCPv6 client: DHCPv4's DHCPEnabled is the IPMI address source.

Arrays are PATCHed as DSP0266 §7.7 (PATCH on array properties) says: an element is replaced by the
request's element at its index, kept by ``{}``, removed by ``null``, and the elements past the end
of the request's array are removed."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar

from msgspec import UNSET
from qemu_bmc_shared import manager_settings as checks
from qemu_bmc_shared.ipmi.core import LAN_CHANNEL
from qemu_bmc_shared.ipmi.transport import LAN_PARAMS
from qemu_bmc_shared.messages import Ipv6Address, LanConfig, ManagerSettings, ManagerSettingsUpdate

from .errors import RedfishError
from .resources import ENABLED, writable

T = TypeVar("T")

ETHERNET_INTERFACE_TYPE = "#EthernetInterface.v1_12_4.EthernetInterface"
#: The one Ethernet interface: the IPMI LAN channel whose parameters it shows.
INTERFACE_ID = str(LAN_CHANNEL)
#: IPMI LAN configuration parameters (IPMI v2.0 §23.2, table 23-4).
LAN_IP, LAN_IP_SOURCE, LAN_MAC, LAN_NETMASK, LAN_GATEWAY, LAN_VLAN, LAN_VLAN_PRIORITY = 3, 4, 5, 6, 12, 20, 21
#: IP address sources (parameter 4).
STATIC, DHCP = 1, 2
VLAN_ENABLED = 0x80
MAX_VLAN_ID, MAX_VLAN_PRIORITY = 4094, 7
SPEED_MBPS = 1000
#: NameServers and IPv4Addresses, the older forms of StaticNameServers and IPv4StaticAddresses
#: (plus AddressOrigin), are writable too: OCP's baseline profile requires it.
INTERFACE_WRITABLE = ("HostName", "FQDN", "StaticNameServers", "NameServers", "IPv4StaticAddresses", "IPv4Addresses",
                      "DHCPv4", "IPv6StaticAddresses", "IPv6StaticDefaultGateways", "VLAN")


# ---------------------------------------------------------------- reading

def ipv4(params: dict[int, bytes], number: int) -> str | None:
    """An IPv4 address parameter; None when it is absent or 0.0.0.0 (not set)."""
    value = params.get(number)
    return str(ipaddress.IPv4Address(value)) if value is not None and len(value) == 4 and any(value) else None


def mac_address(params: dict[int, bytes]) -> str | None:
    value = params.get(LAN_MAC)
    return ":".join(f"{byte:02x}" for byte in value) if value is not None and len(value) == 6 else None


def address_origin(params: dict[int, bytes]) -> str:
    """IP Address Source (parameter 4, low nibble): 2 is DHCP; static, BIOS-loaded and others are Static."""
    source = params.get(LAN_IP_SOURCE, b"")
    return "DHCP" if source and source[0] & 0x0F == DHCP else "Static"


def link_local(mac: str) -> str:
    """The IPv6 link-local address of a MAC (modified EUI-64, RFC 4291 appendix A)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    interface = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + interface))


def vlan(params: dict[int, bytes]) -> dict[str, Any]:
    """Parameter 20 (VLAN id [11:0], enabled [15]) and 21 (priority [2:0]); traffic is tagged
    exactly when the VLAN is enabled."""
    value = params.get(LAN_VLAN, bytes(2)).ljust(2, b"\0")
    enabled = bool(value[1] & VLAN_ENABLED)
    priority = params.get(LAN_VLAN_PRIORITY, b"\0")[:1] or b"\0"
    return {"VLANEnable": enabled, "VLANId": (value[1] & 0x0F) << 8 | value[0],
            "VLANPriority": priority[0] & MAX_VLAN_PRIORITY, "Tagged": enabled}


def fqdn(settings: ManagerSettings) -> str:
    return f"{settings.host_name}.{settings.domain_name}" if settings.domain_name else settings.host_name


def ipv6_static(entries: list[Ipv6Address]) -> list[dict[str, Any]]:
    return [{"Address": entry.address, "PrefixLength": entry.prefix_length} for entry in entries]


def ethernet_interface(path: str, lan: LanConfig, settings: ManagerSettings, listening: str | None
                       ) -> dict[str, Any]:
    """The interface; ``listening``: the IPv4 address the IPMI over LAN front-end listens on, if known."""
    params = lan.params
    origin, configured = address_origin(params), ipv4(params, LAN_IP)
    mask, gateway, mac = ipv4(params, LAN_NETMASK), ipv4(params, LAN_GATEWAY), mac_address(params)
    address = configured or listening
    ipv6 = [{"Address": link_local(mac), "PrefixLength": 64, "AddressOrigin": "LinkLocal",
             "AddressState": "Preferred"}] if mac else []
    ipv6 += [{**entry, "AddressOrigin": "Static", "AddressState": "Preferred"}
             for entry in ipv6_static(settings.ipv6_addresses)]
    return {
        "@odata.id": path, "@odata.type": ETHERNET_INTERFACE_TYPE, "Id": INTERFACE_ID,
        "Name": f"BMC LAN channel {lan.channel}",
        "Description": "The BMC's network interface: the IPMI LAN configuration of the machine",
        "InterfaceEnabled": True, "LinkStatus": "LinkUp", "SpeedMbps": SPEED_MBPS, "Status": ENABLED,
        **writable(*INTERFACE_WRITABLE),
        "MACAddress": mac, "HostName": settings.host_name, "FQDN": fqdn(settings),
        "NameServers": settings.name_servers, "StaticNameServers": settings.name_servers,
        "DHCPv4": {"DHCPEnabled": origin == "DHCP"},
        "IPv4Addresses": [{"Address": address, "SubnetMask": mask, "AddressOrigin": origin, "Gateway": gateway}]
        if address else [],
        "IPv4StaticAddresses": [{"Address": configured, "SubnetMask": mask, "Gateway": gateway}]
        if configured and origin == "Static" else [],
        "DHCPv6": {"OperatingMode": "Disabled"},
        "IPv6Addresses": ipv6,
        "IPv6StaticAddresses": ipv6_static(settings.ipv6_addresses),
        "MaxIPv6StaticAddresses": checks.MAX_IPV6_ADDRESSES,
        "IPv6StaticDefaultGateways": ipv6_static(settings.ipv6_gateways),
        "IPv6DefaultGateway": settings.ipv6_gateways[0].address if settings.ipv6_gateways else None,
        "VLAN": vlan(params),
    }


# ---------------------------------------------------------------- PATCH

def of_type(value: Any, kind: type[T], prop: str) -> T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RedfishError(400, "PropertyValueTypeError", value, prop)
    return value


def in_form(value: Any, ok: Callable[[str], bool], prop: str) -> str:
    """A string ``ok`` accepts (400 PropertyValueFormatError naming ``prop`` otherwise)."""
    if not ok(of_type(value, str, prop)):
        raise RedfishError(400, "PropertyValueFormatError", value, prop)
    return value


def refuse_others(body: dict[str, Any], current: dict[str, Any], writable: tuple[str, ...]) -> None:
    """400 for a property of the PATCH ``body`` that is not ``writable``: PropertyNotWritable for
    one the resource ``current`` has, PropertyUnknown for others."""
    for key in body:
        if key not in writable:
            raise RedfishError(400, "PropertyNotWritable" if key in current else "PropertyUnknown", key)


def only_keys(value: Any, writable: tuple[str, ...], prop: str) -> dict[str, Any]:
    for key in of_type(value, dict, prop):
        if key not in writable:
            raise RedfishError(400, "PropertyNotWritable", f"{prop}/{key}")
    return value


def patched_array(current: list[T], request: Any, prop: str, limit: int,
                  element: Callable[[Any, T | None], T]) -> list[T]:
    """The array a PATCH makes of ``current`` (DSP0266 §7.7): ``element(requested, current or None)``
    builds each new element; more than ``limit``: 400 ArraySizeTooLong."""
    result = []
    for index, requested in enumerate(of_type(request, list, prop)):
        old = current[index] if index < len(current) else None
        if requested is None:
            continue
        if requested == {}:
            if old is not None:
                result.append(old)
            continue
        result.append(element(requested, old))
    if len(result) > limit:
        raise RedfishError(400, "ArraySizeTooLong", prop, limit)
    return result


def names(body: dict[str, Any], update: ManagerSettingsUpdate) -> None:
    """HostName and FQDN (the host name, then the domain name) into ``update``."""
    if "HostName" in body:
        update.host_name = in_form(body["HostName"], checks.host_name_ok, "HostName")
    if "FQDN" in body:
        host, _, domain = in_form(body["FQDN"], lambda name: bool(name) and checks.domain_name_ok(name),
                                  "FQDN").partition(".")
        if "HostName" in body and host != body["HostName"]:
            raise RedfishError(400, "PropertyValueConflict", "FQDN", "HostName")
        update.host_name, update.domain_name = host, domain


def servers(current: list[str], request: Any, prop: str, ok: Callable[[str], bool]) -> list[str]:
    return patched_array(current, request, prop, checks.MAX_SERVERS, lambda value, _: in_form(value, ok, prop))


def ipv6_entries(current: list[Ipv6Address], request: Any, prop: str, limit: int) -> list[Ipv6Address]:
    def element(value: Any, old: Ipv6Address | None) -> Ipv6Address:
        only_keys(value, ("Address", "PrefixLength"), prop)
        if "Address" not in value and old is None:
            raise RedfishError(400, "PropertyMissing", f"{prop}/Address")
        entry = Ipv6Address(address=of_type(value.get("Address", old and old.address), str, f"{prop}/Address"),
                            prefix_length=of_type(value.get("PrefixLength", old.prefix_length if old else 64), int,
                                                  f"{prop}/PrefixLength"))
        if not checks.ipv6_ok(entry):
            raise RedfishError(400, "PropertyValueFormatError", f"{entry.address}/{entry.prefix_length}", prop)
        return entry

    return patched_array(current, request, prop, limit, element)


def packed(value: Any, number: int, prop: str) -> bytes:
    """An IPv4 address as LAN parameter ``number`` takes it (its Set check included)."""
    try:
        address = ipaddress.IPv4Address(of_type(value, str, prop)).packed
    except ValueError:
        raise RedfishError(400, "PropertyValueFormatError", value, prop) from None
    if not any(address) or not LAN_PARAMS[number].check(address):
        raise RedfishError(400, "PropertyValueFormatError", value, prop)
    return address


def ipv4_static(static: list[dict[str, Any]], assigned: dict[str, Any], request: Any, lan: dict[int, bytes],
                prop: str = "IPv4StaticAddresses") -> None:
    """IPv4StaticAddresses (one address: parameters 3, 6 and 12) into ``lan``; none: 0.0.0.0. A new
    static address keeps the subnet mask and gateway ``assigned`` has, unless the request sets them."""
    fields = {"Address": LAN_IP, "SubnetMask": LAN_NETMASK, "Gateway": LAN_GATEWAY}

    def element(value: Any, old: dict[str, Any] | None) -> dict[str, Any]:
        only_keys(value, tuple(fields), prop)
        if "Address" not in value and old is None:
            raise RedfishError(400, "PropertyMissing", f"{prop}/Address")
        return {**(old or {key: assigned.get(key) for key in ("SubnetMask", "Gateway")}), **value}

    entries = patched_array(static, request, prop, 1, element)
    if not entries:
        lan[LAN_IP] = bytes(4)
        return
    for key, number in fields.items():
        value = entries[0].get(key)
        if value is None and key == "Gateway":
            lan[number] = bytes(4)  # no gateway
        elif value is not None or key == "Address":
            lan[number] = packed(value, number, f"{prop}/{key}")
    lan[LAN_IP_SOURCE] = bytes([STATIC])


def ipv4_assigned(current: dict[str, Any], request: Any, lan: dict[int, bytes]) -> None:
    """IPv4Addresses, the older way to set the address: an element whose AddressOrigin is DHCP
    turns DHCP on; otherwise (AddressOrigin Static, or none) it is IPv4StaticAddresses' element."""
    prop = "IPv4Addresses"
    assigned = current[prop][0] if current[prop] else {}
    elements = of_type(request, list, prop)
    first = elements[0] if elements else None
    if isinstance(first, dict) and first.get("AddressOrigin", "Static") != "Static":
        if first["AddressOrigin"] != "DHCP" or len(elements) > 1:
            raise RedfishError(400, "PropertyValueNotInList", first["AddressOrigin"], f"{prop}/AddressOrigin")
        lan[LAN_IP_SOURCE] = bytes([DHCP])  # the rest of the element is DHCP's to choose
        return
    static = [{key: value for key, value in element.items() if key != "AddressOrigin"}
              if isinstance(element, dict) else element for element in elements]
    ipv4_static([{key: assigned.get(key) for key in ("Address", "SubnetMask", "Gateway")}] if assigned else [],
                assigned, static, lan, prop)


def vlan_params(current: dict[str, Any], request: Any, lan: dict[int, bytes]) -> None:
    """VLAN into parameters 20 and 21 (Tagged is VLANEnable: the IPMI VLAN tags the BMC's traffic)."""
    changes = only_keys(request, ("VLANEnable", "VLANId", "VLANPriority", "Tagged"), "VLAN")
    enabled = of_type(changes.get("VLANEnable", changes.get("Tagged", current["VLANEnable"])), bool, "VLAN/VLANEnable")
    if of_type(changes.get("Tagged", enabled), bool, "VLAN/Tagged") != enabled:
        raise RedfishError(400, "PropertyValueConflict", "VLAN/Tagged", "VLAN/VLANEnable")
    vlan_id = of_type(changes.get("VLANId", current["VLANId"]), int, "VLAN/VLANId")
    priority = of_type(changes.get("VLANPriority", current["VLANPriority"]), int, "VLAN/VLANPriority")
    if not (1 if enabled else 0) <= vlan_id <= MAX_VLAN_ID:
        raise RedfishError(400, "PropertyValueOutOfRange", vlan_id, "VLAN/VLANId")
    if not 0 <= priority <= MAX_VLAN_PRIORITY:
        raise RedfishError(400, "PropertyValueOutOfRange", priority, "VLAN/VLANPriority")
    lan[LAN_VLAN] = bytes([vlan_id & 0xFF, (VLAN_ENABLED if enabled else 0) | vlan_id >> 8])
    lan[LAN_VLAN_PRIORITY] = bytes([priority])


def interface_changes(current: dict[str, Any], body: dict[str, Any], settings: ManagerSettings
                      ) -> tuple[dict[int, bytes], ManagerSettingsUpdate]:
    """The LAN parameters and settings a PATCH of the interface ``current`` asks for (400 naming
    what is wrong, before anything is changed)."""
    refuse_others(body, current, INTERFACE_WRITABLE)
    lan: dict[int, bytes] = {}
    update = ManagerSettingsUpdate()
    names(body, update)
    for prop in ("StaticNameServers", "NameServers"):  # the same servers: every name server is static
        if prop in body:
            name_servers = servers(settings.name_servers, body[prop], prop, checks.address_ok)
            if update.name_servers is not UNSET and update.name_servers != name_servers:
                raise RedfishError(400, "PropertyValueConflict", "NameServers", "StaticNameServers")
            update.name_servers = name_servers
    if "IPv6StaticAddresses" in body:
        update.ipv6_addresses = ipv6_entries(settings.ipv6_addresses, body["IPv6StaticAddresses"],
                                             "IPv6StaticAddresses", checks.MAX_IPV6_ADDRESSES)
    if "IPv6StaticDefaultGateways" in body:
        update.ipv6_gateways = ipv6_entries(settings.ipv6_gateways, body["IPv6StaticDefaultGateways"],
                                            "IPv6StaticDefaultGateways", checks.MAX_IPV6_GATEWAYS)
    if "VLAN" in body:
        vlan_params(current["VLAN"], body["VLAN"], lan)
    if "IPv4StaticAddresses" in body and "IPv4Addresses" in body:
        raise RedfishError(400, "PropertyValueConflict", "IPv4Addresses", "IPv4StaticAddresses")
    if "IPv4StaticAddresses" in body:
        assigned = current["IPv4Addresses"][0] if current["IPv4Addresses"] else {}
        ipv4_static(current["IPv4StaticAddresses"], assigned, body["IPv4StaticAddresses"], lan)
    if "IPv4Addresses" in body:
        ipv4_assigned(current, body["IPv4Addresses"], lan)
    if "DHCPv4" in body and "DHCPEnabled" in only_keys(body["DHCPv4"], ("DHCPEnabled",), "DHCPv4"):
        dhcp = of_type(body["DHCPv4"]["DHCPEnabled"], bool, "DHCPv4/DHCPEnabled")
        if dhcp and lan.get(LAN_IP_SOURCE) == bytes([STATIC]):
            raise RedfishError(400, "PropertyValueConflict", "IPv4StaticAddresses", "DHCPv4/DHCPEnabled")
        lan[LAN_IP_SOURCE] = bytes([DHCP if dhcp else STATIC])
    return lan, update
