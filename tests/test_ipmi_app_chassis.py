"""IPMI application (netfn 0x06) and chassis (netfn 0x00) commands through the registry, against a
real nats-server, the real state service and, where a machine is needed, the real machine service
with a real QEMU. The byte layouts and completion codes are those of IPMI v2.0 (§20, §22, §24, §28);
what real clients do with them is tested in test_ipmi_lan.py."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc_shared import bus, ipmi, subjects
from qemu_bmc_shared.ipmi import Context, NetFn, Privilege, Request, Response, app, chassis
from qemu_bmc_shared.messages import BootOverride, BootOverrideUpdate, Inventory, KgKey

REGISTRY = ipmi.load()
APP, CHASSIS = NetFn.APP, NetFn.CHASSIS
LAN, SYSTEM = 1, 0x0F
#: IANA enterprise number of the IPMI forum (7154), least significant byte first (§22.24).
IPMI_IANA = bytes([0xF2, 0x1B, 0x00])
#: The cipher suites offered by default and their algorithms (§22.15.2, table 22-20).
DEFAULT_SUITES = {1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1), 15: (3, 0, 0), 16: (3, 4, 0), 17: (3, 4, 1)}


@pytest.fixture(autouse=True)
def fresh_bmc_runtime():
    """What a BMC forgets when it restarts (global enables, identify, restart cause) starts empty."""
    app._global_enables.pop("n1", None)
    chassis._runtime.pop("n1", None)
    yield
    app._global_enables.pop("n1", None)
    chassis._runtime.pop("n1", None)


@pytest.fixture
async def state(nc, services, short_dir: Path):
    """The state service only: every command that needs no machine."""
    config = write_config(short_dir, '[vm.n1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:6230"\n')
    await services("state", config)
    return nc


@pytest.fixture
async def machine(nc, services, short_dir: Path, images: GuestImages):
    """The state service and the machine service with a real (SeaBIOS, no NIC) QEMU machine."""
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n")
    await services("state", config)
    await services("machine", config, "--stop-vms-on-exit")
    return nc


def context(nc, privilege: Privilege = Privilege.ADMINISTRATOR, channel: int = LAN, **extra: Any) -> Context:
    return Context(machine="n1", nc=nc, channel=channel, privilege=privilege, extra=extra)


async def run(ctx: Context, netfn: int, cmd: int, data: bytes | list[int] = b"") -> Response:
    return await REGISTRY.dispatch(ctx, Request(netfn, cmd, bytes(data)))


async def ok(ctx: Context, netfn: int, cmd: int, data: bytes | list[int] = b"") -> bytes:
    response = await run(ctx, netfn, cmd, data)
    assert response.completion == 0, f"{netfn:#x}/{cmd:#x} {bytes(data).hex()}: completion {response.completion:#x}"
    return response.data


async def completion(ctx: Context, netfn: int, cmd: int, data: bytes | list[int] = b"") -> int:
    return (await run(ctx, netfn, cmd, data)).completion


# ---------------------------------------------------------------- device and system interface (§20, §22.1-22.8)

async def test_device_identity_and_message_flags(machine):
    ctx = context(machine)
    device = await ok(ctx, APP, 0x01)
    assert len(device) == 11  # through the product id; the auxiliary firmware revision is optional
    assert device[0] == 0x20  # device id
    assert device[2] & 0x80 == 0  # device available (no update in progress)
    assert all(nibble <= 9 for nibble in (device[3] >> 4, device[3] & 0x0F))  # minor revision in BCD
    assert device[4] == 0x02  # IPMI version 2.0 (BCD, least significant digit in bits 7:4)
    assert device[5] == 0x8F  # chassis, FRU inventory, SEL, SDR repository, sensor devices
    assert await ok(ctx, APP, 0x04) == b"\x55\x00"  # self test: no error

    guid = await ok(ctx, APP, 0x08)
    assert len(guid) == 16 and guid == await ok(ctx, APP, 0x08)
    assert await ok(Context(machine="n2", nc=machine), APP, 0x08) not in (guid, bytes(16))  # one per machine
    inventory = await bus.request(machine, "n1", subjects.INVENTORY_GET, None, Inventory)
    assert await ok(ctx, APP, 0x37) == uuid.UUID(inventory.uuid).bytes[::-1]  # least significant byte first

    # global enables: system event logging on by default, then as set
    assert await ok(ctx, APP, 0x2F) == b"\x08"
    assert await ok(ctx, APP, 0x2E, [0x0C]) == b""
    assert await ok(ctx, APP, 0x2F) == b"\x0c"
    assert await ok(context(machine, channel=SYSTEM), APP, 0x2F) == b"\x0c"  # the BMC's, whoever asks
    for data in ([], [0x08, 0x00]):
        assert await completion(ctx, APP, 0x2E, data) == 0xC7
    assert await ok(ctx, APP, 0x2F) == b"\x0c"

    # nothing is ever queued: no flags, empty receive queue and event buffer (0x80: data not available)
    assert await ok(ctx, APP, 0x31) == b"\x00"
    assert await ok(ctx, APP, 0x30, [0x0B]) == b""
    assert await completion(ctx, APP, 0x30) == 0xC7
    assert await completion(ctx, APP, 0x33) == 0x80
    assert await completion(ctx, APP, 0x35) == 0x80

    # all of these are User-level; a Callback session gets none of them
    callback = context(machine, Privilege.CALLBACK)
    for cmd in (0x01, 0x04, 0x08, 0x37, 0x2F, 0x31):
        assert await completion(callback, APP, cmd) == 0xD4, hex(cmd)
    assert await completion(context(machine, Privilege.OPERATOR), APP, 0x2E, [0x08]) == 0xD4


# ---------------------------------------------------------------- channel authentication (§22.13) and ciphers (§22.15)

async def test_channel_authentication_capabilities(state):
    ctx = context(state)
    # IPMI 1.5 form: MD5 and straight password; per-message and user-level authentication on,
    # K_G unset, one non-null user name (the default administrator) and no null user
    assert await ok(ctx, APP, 0x38, [0x01, 0x04]) == bytes([0x01, 0x14, 0x04, 0x00]) + bytes(4)
    # IPMI 2.0 extended form: bit 7 of the auth types, and byte 5: IPMI 1.5 and 2.0 connections
    assert await ok(ctx, APP, 0x38, [0x81, 0x04]) == bytes([0x01, 0x94, 0x04, 0x03]) + bytes(4)
    assert await ok(ctx, APP, 0x38, [0x8E, 0x02]) == bytes([0x01, 0x94, 0x04, 0x03]) + bytes(4)  # this channel
    none = context(state, auth_none=True)
    assert (await ok(none, APP, 0x38, [0x0E, 0x04]))[1] == 0x15
    assert (await ok(none, APP, 0x38, [0x8E, 0x04]))[1] == 0x95
    # session-less: a Callback-level (or no) session may ask
    assert (await ok(context(state, Privilege.CALLBACK), APP, 0x38, [0x8E, 0x01]))[0] == 0x01
    for data in ([0x02, 0x04], [0x8B, 0x04], [0x01, 0x00], [0x81, 0x00], [0x01, 0x06], [0x01, 0x0F]):
        assert await completion(ctx, APP, 0x38, data) == 0xCC, data
    for data in ([0x01], [0x01, 0x04, 0x00]):
        assert await completion(ctx, APP, 0x38, data) == 0xC7, data

    async def login_flags() -> int:
        return (await ok(ctx, APP, 0x38, [0x81, 0x04]))[2]

    # the null user (slot 1), enabled with IPMI messaging on the channel: anonymous login (bit 0) ...
    assert await ok(ctx, APP, 0x47, [0x01, 0x01]) == b""
    assert await login_flags() == 0x04  # enabled, but not allowed IPMI messaging on the channel yet
    assert await ok(ctx, APP, 0x43, [0x80 | 0x10 | LAN, 0x01, 0x04]) == b""
    assert await login_flags() == 0x05
    # ... with a password: a null user name with a non-null password (bit 1)
    assert await ok(ctx, APP, 0x47, [0x01, 0x02, *b"anonymous".ljust(16, b"\0")]) == b""
    assert await login_flags() == 0x06
    assert await ok(ctx, APP, 0x47, [0x01, 0x00]) == b""  # disabled again
    assert await login_flags() == 0x04
    # K_G set to a non-zero value (bit 5), over the bus and by Set Channel Security Keys
    await bus.request(state, "n1", subjects.KG_SET, KgKey(key=b"k" * 20), KgKey)
    assert await login_flags() == 0x24
    assert await ok(ctx, APP, 0x56, [LAN, 0x01, 0x01, *bytes(20)]) == b"\x00"  # all zeros: unset
    assert await login_flags() == 0x04
    # the present (volatile) channel access: per-message (bit 4) and user-level (bit 3) authentication off
    assert await ok(ctx, APP, 0x40, [LAN, 0x80 | 0x10 | 0x08 | 0x02, 0x00]) == b""
    assert await login_flags() == 0x1C
    assert await ok(ctx, APP, 0x40, [LAN, 0x40 | 0x02, 0x00]) == b""  # non-volatile: not what is in effect
    assert await login_flags() == 0x1C


def suite_records(suites: dict[int, tuple[int, int, int]]) -> bytes:
    """Cipher suite records (§22.15.1, table 22-18): standard record 0xC0, id, then the tagged algorithms."""
    return b"".join(bytes([0xC0, suite, auth, 0x40 | integrity, 0x80 | confidentiality])
                    for suite, (auth, integrity, confidentiality) in suites.items())


async def cipher_list(ctx: Context, by_suite: bool = True) -> bytes:
    """The whole list, 16 bytes per index until a shorter answer."""
    data, index = b"", 0
    while True:
        answer = await ok(ctx, APP, 0x54, [0x0E, 0x00, (0x80 if by_suite else 0) | index])
        assert answer[0] == LAN and len(answer) <= 17
        data += answer[1:]
        if len(answer) < 17:
            return data
        index += 1


async def test_channel_cipher_suites(state):
    ctx = context(state)
    records = suite_records(DEFAULT_SUITES)
    assert len(records) == 30
    assert await ok(ctx, APP, 0x54, [0x01, 0x00, 0x80]) == b"\x01" + records[:16]
    assert await ok(ctx, APP, 0x54, [0x01, 0x00, 0x81]) == b"\x01" + records[16:]  # the continuation
    assert await ok(ctx, APP, 0x54, [0x01, 0x00, 0x82]) == b"\x01"  # past the end: no record data
    assert await cipher_list(ctx) == records
    assert await cipher_list(context(state, Privilege.CALLBACK)) == records  # session-less
    assert await cipher_list(context(state, channel=SYSTEM)) == records  # 0x0E from the system interface: LAN

    # suite 0 (no authentication) only when the LAN front-end enables it
    with_zero = await cipher_list(context(state, cipher_suite_0=True))
    assert with_zero == suite_records({0: (0, 0, 0), **DEFAULT_SUITES})
    assert with_zero.startswith(bytes([0xC0, 0x00, 0x00, 0x40, 0x80]))
    assert bytes([0xC0, 0x00]) not in records
    assert await cipher_list(context(state, cipher_suites=[17, 3])) == suite_records({3: (1, 1, 1), 17: (3, 4, 1)})

    # bit 7 clear: each supported algorithm once, with its tag (authentication 00b, integrity 01b,
    # confidentiality 10b): RAKP-HMAC-SHA1/-SHA256, none/HMAC-SHA1-96/HMAC-SHA256-128, none/AES-CBC-128
    algorithms = await cipher_list(ctx, by_suite=False)
    assert sorted(algorithms) == [0x01, 0x03, 0x40, 0x41, 0x44, 0x80, 0x81]
    assert sorted(await cipher_list(context(state, cipher_suites=[3]), by_suite=False)) == [0x01, 0x41, 0x81]

    for data in ([0x02, 0x00, 0x80], [0x0F, 0x00, 0x80], [0x01, 0x40, 0x80]):
        assert await completion(ctx, APP, 0x54, data) == 0xCC, data
    for data in ([0x01, 0x00], [0x01, 0x00, 0x80, 0x00]):
        assert await completion(ctx, APP, 0x54, data) == 0xC7, data


# ---------------------------------------------------------------- channel access and info (§22.22-22.24)

async def test_channel_access_volatile_and_non_volatile(state):
    ctx = context(state)

    async def access(selector: int) -> bytes:
        return await ok(ctx, APP, 0x41, [LAN, selector << 6])

    # defaults: alerting disabled (bit 5), per-message and user-level authentication enabled,
    # always available (2); Administrator limit
    assert await access(1) == await access(2) == bytes([0x22, 0x04])

    # volatile only: pre-boot only, alerting on, per-message authentication off; Operator limit
    assert await ok(ctx, APP, 0x40, [LAN, 0x80 | 0x10 | 0x01, 0x80 | 0x03]) == b""
    assert await access(2) == bytes([0x11, 0x03])
    assert await access(1) == bytes([0x22, 0x04])
    # non-volatile only: disabled alerting and user-level authentication, always available; User limit
    assert await ok(ctx, APP, 0x40, [LAN, 0x40 | 0x20 | 0x08 | 0x02, 0x40 | 0x02]) == b""
    assert await access(1) == bytes([0x2A, 0x02])
    assert await access(2) == bytes([0x11, 0x03])
    # "don't set" selectors leave the other half alone
    assert await ok(ctx, APP, 0x40, [LAN, 0x00, 0x80 | 0x05]) == b""
    assert await access(2) == bytes([0x11, 0x05])
    assert await ok(ctx, APP, 0x40, [LAN, 0x80 | 0x20 | 0x03, 0x00]) == b""
    assert await access(2) == bytes([0x23, 0x05])
    assert await access(1) == bytes([0x2A, 0x02])
    # every privilege limit round-trips, in both
    for limit in (1, 2, 3, 4, 5):
        for selector in (1, 2):
            assert await ok(ctx, APP, 0x40, [0x0E, 0x00, selector << 6 | limit]) == b""
            assert (await access(selector))[1] == limit, (selector, limit)

    # reserved selectors, access modes and privilege levels; other channels; lengths
    for data in ([LAN, 0xC2, 0x00], [LAN, 0x00, 0xC4], [LAN, 0x84, 0x00], [LAN, 0x00, 0x80],
                 [LAN, 0x00, 0x46], [LAN, 0x00, 0x8F], [0x02, 0x82, 0x84], [SYSTEM, 0x82, 0x84]):
        assert await completion(ctx, APP, 0x40, data) == 0xCC, data
    for data in ([LAN, 0x00], [LAN, 0xC0], [0x02, 0x80], [0x00, 0x40]):
        assert await completion(ctx, APP, 0x41, data) == 0xCC, data
    assert await completion(ctx, APP, 0x40, [LAN, 0x82]) == 0xC7
    assert await completion(ctx, APP, 0x40, [LAN, 0x82, 0x84, 0x00]) == 0xC7
    assert await completion(ctx, APP, 0x41, [LAN]) == 0xC7
    assert await access(1) == bytes([0x2A, 0x05]) and await access(2) == bytes([0x23, 0x05])  # untouched

    # Set is Administrator, Get is User
    assert await completion(context(state, Privilege.OPERATOR), APP, 0x40, [LAN, 0x00, 0x84]) == 0xD4
    assert await ok(context(state, Privilege.USER), APP, 0x41, [LAN, 0x80]) == bytes([0x23, 0x05])


async def test_channel_info(state):
    lan, system = context(state), context(state, Privilege.USER, channel=SYSTEM)
    # 802.3 LAN, IPMB-1.0 protocol (used for LAN), multi-session, IPMI IANA; no auxiliary info
    lan_info = bytes([0x01, 0x04, 0x01, 0x80]) + IPMI_IANA + bytes(2)
    # KCS system interface, session-less; no interrupts
    system_info = bytes([0x0F, 0x0C, 0x05, 0x00]) + IPMI_IANA + b"\xff\xff"
    assert await ok(lan, APP, 0x42, [0x01]) == lan_info
    assert await ok(lan, APP, 0x42, [0x0E]) == lan_info
    assert await ok(lan, APP, 0x42, [0x0F]) == system_info
    assert await ok(system, APP, 0x42, [0x0E]) == system_info
    assert await ok(system, APP, 0x42, [0x01]) == lan_info
    assert (await ok(context(state, active_sessions=3), APP, 0x42, [0x01]))[3] == 0x83  # sessions activated
    for channel in (0, *range(2, 12), 0x0C, 0x0D):
        assert await completion(lan, APP, 0x42, [channel]) == 0xCC, channel
    for data in ([], [0x01, 0x00]):
        assert await completion(lan, APP, 0x42, data) == 0xC7
    assert await completion(context(state, Privilege.CALLBACK), APP, 0x42, [0x01]) == 0xD4


# ---------------------------------------------------------------- users (§22.26-22.30, §24.6-24.7)

async def test_user_names(state):
    ctx = context(state)
    admin = await ok(ctx, APP, 0x46, [0x02])
    assert len(admin) == 16 and admin.rstrip(b"\0") and admin.rstrip(b"\0").isascii()
    assert await ok(ctx, APP, 0x46, [0x01]) == bytes(16)  # the null user
    assert await ok(ctx, APP, 0x46, [0x0F]) == bytes(16)  # an empty slot
    assert await ok(ctx, APP, 0x45, [0x03, *b"operator".ljust(16, b"\0")]) == b""
    assert await ok(ctx, APP, 0x46, [0x03]) == b"operator".ljust(16, b"\0")
    assert await ok(ctx, APP, 0x45, [0x04, *b"sixteen-chars-ok"]) == b""  # all 16 bytes, no terminator
    assert await ok(ctx, APP, 0x46, [0x04]) == b"sixteen-chars-ok"
    assert await ok(ctx, APP, 0x45, [0x04, *bytes(16)]) == b""  # cleared
    assert await ok(ctx, APP, 0x46, [0x04]) == bytes(16)

    for data in ([0x01, *b"renamed".ljust(16, b"\0")],  # user 1's name is fixed (null)
                 [0x00, *b"nobody".ljust(16, b"\0")], [0x10, *b"nobody".ljust(16, b"\0")],  # user ids 1-15
                 [0x05, *b"tab\there".ljust(16, b"\0")], [0x05, *b"caf\xe9".ljust(16, b"\0")],  # printable ASCII
                 [0x05, *b"operator".ljust(16, b"\0")]):  # another user's name
        assert await completion(ctx, APP, 0x45, data) == 0xCC, bytes(data)
    for data in ([0x05, *b"x" * 15], [0x05, *b"x" * 17], [0x05]):
        assert await completion(ctx, APP, 0x45, data) == 0xC7, bytes(data)
    for data in ([0x00], [0x10], [0x3F]):
        assert await completion(ctx, APP, 0x46, data) == 0xCC, data
    assert await completion(ctx, APP, 0x46, [0x02, 0x00]) == 0xC7
    assert await ok(ctx, APP, 0x46, [0x05]) == bytes(16)


async def test_user_access_and_enable(state):
    ctx = context(state)

    async def access(slot: int) -> bytes:
        return await ok(ctx, APP, 0x44, [LAN, slot])

    # 15 user ids; the seeded administrator (slot 2) the only one enabled; 1 fixed name (user 1);
    # slot 2: link authentication, IPMI messaging, Administrator
    assert await access(2) == bytes([0x0F, 0x40 | 1, 0x01, 0x20 | 0x10 | 0x04])
    assert await access(3) == bytes([0x0F, 0x80 | 1, 0x01, 0x0F])  # disabled, no access
    assert await ok(context(state, Privilege.OPERATOR), APP, 0x44, [0x0E, 0x02]) == await access(2)

    # Set User Password's enable and disable (§22.30) are what Get User Access shows (§22.27)
    assert await ok(ctx, APP, 0x47, [0x03, 0x01]) == b""
    assert await access(3) == bytes([0x0F, 0x40 | 2, 0x01, 0x0F])
    assert (await access(2))[1] == 0x40 | 2
    assert await ok(ctx, APP, 0x47, [0x03, 0x00, *bytes(16)]) == b""  # password data ignored
    assert await access(3) == bytes([0x0F, 0x80 | 1, 0x01, 0x0F])
    assert await ok(ctx, APP, 0x47, [0x03, 0x01]) == b""

    # without bit 7 only the privilege limit changes; with it the three switches are set as given
    assert await ok(ctx, APP, 0x43, [LAN, 0x03, 0x03]) == b""
    assert (await access(3))[3] == 0x03
    assert await ok(ctx, APP, 0x43, [0x80 | 0x40 | 0x20 | 0x10 | LAN, 0x03, 0x02]) == b""
    assert (await access(3))[3] == 0x72
    assert await ok(ctx, APP, 0x43, [0x40 | LAN, 0x03, 0x04]) == b""  # bit 7 clear: switches kept
    assert (await access(3))[3] == 0x74
    assert await ok(ctx, APP, 0x43, [0x80 | 0x10 | 0x0E, 0x03, 0x0F, 0x00]) == b""  # session limit 0: none
    assert (await access(3))[3] == 0x1F
    for limit in (1, 2, 3, 4, 5, 0x0F):
        assert await ok(ctx, APP, 0x43, [LAN, 0x03, limit]) == b""
        assert (await access(3))[3] & 0x0F == limit

    for data in ([LAN, 0x03, 0x00], [LAN, 0x03, 0x06], [LAN, 0x03, 0x0E], [LAN, 0x00, 0x04], [LAN, 0x10, 0x04],
                 [0x02, 0x03, 0x04], [SYSTEM, 0x03, 0x04], [LAN, 0x03, 0x04, 0x01]):  # session limits unsupported
        assert await completion(ctx, APP, 0x43, data) == 0xCC, data
    for data in ([LAN, 0x03], [LAN, 0x03, 0x04, 0x00, 0x00]):
        assert await completion(ctx, APP, 0x43, data) == 0xC7, data
    for data in ([LAN, 0x00], [LAN, 0x10], [0x02, 0x02]):
        assert await completion(ctx, APP, 0x44, data) == 0xCC, data
    assert await completion(ctx, APP, 0x44, [LAN]) == 0xC7
    assert await completion(context(state, Privilege.USER), APP, 0x44, [LAN, 0x02]) == 0xD4
    assert await completion(context(state, Privilege.OPERATOR), APP, 0x43, [LAN, 0x03, 0x04]) == 0xD4
    assert (await access(3))[3] == 0x1F


async def test_user_passwords(state):
    ctx = context(state)

    async def password(slot: int, operation: int, value: bytes, twenty: bool = False) -> int:
        return await completion(ctx, APP, 0x47, [(0x80 if twenty else 0) | slot, operation, *value])

    assert await password(3, 0x02, b"pass-16".ljust(16, b"\0")) == 0xCC  # shorter than MinPasswordLength 8
    short = b"passwd-16".ljust(16, b"\0")
    assert await password(3, 0x02, short) == 0x00
    assert await password(3, 0x03, short) == 0x00
    assert await password(3, 0x03, b"passwd-17".ljust(16, b"\0")) == 0x80  # does not match
    assert await password(3, 0x03, b"passwd-1".ljust(16, b"\0")) == 0x80
    full = b"sixteen-byte-key"
    assert await password(3, 0x02, full) == 0x00  # all 16 bytes, no terminator
    assert await password(3, 0x03, full) == 0x00
    assert await password(3, 0x03, short) == 0x80  # the old one no longer

    long = b"a-twenty-byte-secret"
    assert len(long) == 20
    assert await password(4, 0x02, long, twenty=True) == 0x00
    assert await password(4, 0x03, long, twenty=True) == 0x00
    assert await password(4, 0x03, long[:16]) == 0x81  # set as 20 bytes, tested as 16: wrong size
    assert await password(4, 0x03, b"a-twenty-byte-secreX", twenty=True) == 0x80
    assert await password(5, 0x03, short) == 0x80  # no password at all

    # the password data is fixed-length: 16 bytes, or 20 with bit 7 of byte 1
    for slot_byte, value in ((0x03, short[:15]), (0x03, short + b"\0"), (0x03, b""), (0x83, short),
                             (0x83, long + b"\0"), (0x83, long[:19])):
        for operation in (0x02, 0x03):
            assert await completion(ctx, APP, 0x47, [slot_byte, operation, *value]) == 0xC7, (slot_byte, value)
    assert await completion(ctx, APP, 0x47, [0x03]) == 0xC7
    assert await completion(ctx, APP, 0x47, [0x03, 0x01, *bytes(21)]) == 0xC7
    assert await password(3, 0x03, full) == 0x00  # none of that changed it
    for slot in (0x00, 0x10):
        assert await password(slot, 0x02, short) == 0xCC
        assert await password(slot, 0x01, b"") == 0xCC
    assert await password(3, 0x02, b"caf\xe9".ljust(16, b"\0")) == 0xCC  # passwords are ASCII here
    assert await completion(context(state, Privilege.OPERATOR), APP, 0x47, [0x03, 0x03, *full]) == 0xD4


async def test_user_payload_access(state):
    ctx = context(state)

    async def payloads(slot: int) -> bytes:
        return await ok(ctx, APP, 0x4D, [LAN, slot])

    assert await payloads(2) == bytes([0x02, 0x00, 0x00, 0x00])  # the administrator may activate SOL
    assert await payloads(3) == bytes(4)
    # disable (01b) SOL for user 2, enable (00b) it for user 3 with OEM payload 0; bit 0 is reserved
    assert await ok(ctx, APP, 0x4C, [LAN, 0x40 | 0x02, 0x02, 0x00, 0x00, 0x00]) == b""
    assert await payloads(2) == bytes(4)
    assert await ok(ctx, APP, 0x4C, [0x0E, 0x03, 0x03, 0x00, 0x01, 0x00]) == b""
    assert await payloads(3) == bytes([0x02, 0x00, 0x01, 0x00])
    assert await ok(ctx, APP, 0x4C, [LAN, 0x40 | 0x03, 0x00, 0x00, 0x01, 0x00]) == b""
    assert await payloads(3) == bytes([0x02, 0x00, 0x00, 0x00])
    assert await ok(ctx, APP, 0x4C, [LAN, 0x02, 0x02, 0x00, 0x00, 0x00]) == b""
    assert await payloads(2) == bytes([0x02, 0x00, 0x00, 0x00])
    # the switches Set User Access keeps are not touched
    assert (await ok(ctx, APP, 0x44, [LAN, 0x02]))[3] == 0x34

    for data in ([LAN, 0x80 | 0x02, 0x02, 0, 0, 0], [LAN, 0xC0 | 0x02, 0x02, 0, 0, 0], [LAN, 0x00, 0x02, 0, 0, 0],
                 [0x02, 0x02, 0x02, 0, 0, 0]):
        assert await completion(ctx, APP, 0x4C, data) == 0xCC, data
    for data in ([LAN, 0x02, 0x02, 0, 0], [LAN, 0x02, 0x02, 0, 0, 0, 0]):
        assert await completion(ctx, APP, 0x4C, data) == 0xC7, data
    for data in ([LAN, 0x00], [LAN, 0x10], [0x03, 0x02]):
        assert await completion(ctx, APP, 0x4D, data) == 0xCC, data
    assert await completion(ctx, APP, 0x4D, [LAN]) == 0xC7
    assert await completion(context(state, Privilege.OPERATOR), APP, 0x4C, [LAN, 0x02, 0x02, 0, 0, 0]) == 0xD4
    assert await ok(context(state, Privilege.OPERATOR), APP, 0x4D, [LAN, 0x02]) == bytes([0x02, 0, 0, 0])


# ---------------------------------------------------------------- keys (§22.25)

async def test_channel_security_keys(state):
    ctx = context(state)
    # read: lock status (00h: not lockable), then the key; K_G zeros while unset, K_R never shown
    assert await ok(ctx, APP, 0x56, [LAN, 0x00, 0x01]) == bytes(21)
    assert await ok(ctx, APP, 0x56, [LAN, 0x00, 0x00]) == bytes(21)
    key = bytes(range(1, 21))
    assert await ok(ctx, APP, 0x56, [0x0E, 0x01, 0x01, *key]) == b"\x00"
    assert await ok(ctx, APP, 0x56, [LAN, 0x00, 0x01]) == b"\x00" + key
    assert (await bus.request(state, "n1", subjects.KG_GET, None, KgKey)).key == key
    assert await ok(ctx, APP, 0x56, [LAN, 0x00, 0x00]) == bytes(21)

    assert await completion(ctx, APP, 0x56, [LAN, 0x01, 0x00, *key]) == 0x84  # K_R: the user's password is used
    assert await completion(ctx, APP, 0x56, [LAN, 0x01, 0x01, *key[:19]]) == 0x81  # insufficient key bytes
    assert await completion(ctx, APP, 0x56, [LAN, 0x01, 0x01]) == 0x81
    assert await completion(ctx, APP, 0x56, [LAN, 0x01, 0x01, *key, 0x00]) == 0x82  # too many key bytes
    for data in ([LAN, 0x00, 0x02], [LAN, 0x03, 0x01], [0x02, 0x00, 0x01], [SYSTEM, 0x00, 0x01]):
        assert await completion(ctx, APP, 0x56, data) == 0xCC, data
    for data in ([LAN, 0x00], [LAN, 0x00, 0x01, 0x00]):
        assert await completion(ctx, APP, 0x56, data) == 0xC7, data
    assert await ok(ctx, APP, 0x56, [LAN, 0x00, 0x01]) == b"\x00" + key  # unchanged by the refusals

    assert await ok(ctx, APP, 0x56, [LAN, 0x01, 0x01, *bytes(20)]) == b"\x00"  # zeros: back to unset
    assert (await bus.request(state, "n1", subjects.KG_GET, None, KgKey)).key is None
    assert await ok(ctx, APP, 0x56, [LAN, 0x00, 0x01]) == bytes(21)
    assert await completion(context(state, Privilege.OPERATOR), APP, 0x56, [LAN, 0x00, 0x01]) == 0xD4


# ---------------------------------------------------------------- privileges through dispatch (§6.8, table G)

async def test_privileges_are_enforced_by_dispatch(state):
    user, operator = context(state, Privilege.USER), context(state, Privilege.OPERATOR)
    assert await completion(user, APP, 0x45, [0x05, *b"eve".ljust(16, b"\0")]) == 0xD4
    assert await completion(user, CHASSIS, 0x02, [0x01]) == 0xD4
    assert await completion(user, CHASSIS, 0x04, []) == 0xD4
    assert await completion(user, CHASSIS, 0x08, [0x01, 0x00]) == 0xD4
    assert await completion(user, CHASSIS, 0x09, [0x01, 0x00, 0x00]) == 0xD4
    assert await completion(operator, APP, 0x47, [0x02, 0x02, *bytes(16)]) == 0xD4
    assert await completion(operator, APP, 0x45, [0x05, *b"eve".ljust(16, b"\0")]) == 0xD4
    assert await completion(operator, CHASSIS, 0x06, [0x03]) == 0  # an Operator command
    assert await ok(operator, CHASSIS, 0x09, [0x01, 0x00, 0x00]) == bytes([0x01, 0x01, 0x00])
    assert await ok(user, CHASSIS, 0x00) == bytes([0x04, 0x20, 0x20, 0x20, 0x20])
    # the privilege check passes, and the missing machine service ends the command instead
    assert await completion(operator, CHASSIS, 0x02, [0x01]) == 0xD3
    # the system interface is not privilege-checked
    system = context(state, Privilege.CALLBACK, channel=SYSTEM)
    assert await ok(system, APP, 0x45, [0x05, *b"eve".ljust(16, b"\0")]) == b""
    assert await ok(system, APP, 0x46, [0x05]) == b"eve".ljust(16, b"\0")
    # unknown commands
    assert await completion(context(state), APP, 0x7F) == 0xC1
    assert await completion(context(state), CHASSIS, 0x0F) == 0xC1


# ---------------------------------------------------------------- chassis (§28.1-28.11)

async def test_chassis_power_status_identify_and_restart_cause(machine):
    ctx, operator = context(machine), context(machine, Privilege.OPERATOR)
    # a diagnostic interrupt; FRU, SDR, SEL and system management at the BMC's address
    assert await ok(ctx, CHASSIS, 0x00) == bytes([0x04, 0x20, 0x20, 0x20, 0x20])

    async def status() -> bytes:
        answer = await ok(context(machine, Privilege.USER), CHASSIS, 0x01)
        assert len(answer) == 3 and answer[2] & 0x40  # identify state supported
        return answer

    off = await status()
    assert off[0] & 0x01 == 0 and off[0] >> 5 & 0x03 == 0 and off[1] == 0x00 and off[2] == 0x40
    assert await ok(ctx, CHASSIS, 0x07) == bytes([0x00, 0x00])  # restart cause unknown

    # power restore policy: bits 6:5 of byte 1; the answer is the supported set (all three)
    assert await ok(operator, CHASSIS, 0x06, [0x02]) == b"\x07"
    assert (await status())[0] >> 5 & 0x03 == 0x02
    assert await ok(operator, CHASSIS, 0x06, [0x03]) == b"\x07"  # no change: just the supported set
    assert (await status())[0] >> 5 & 0x03 == 0x02
    assert await ok(operator, CHASSIS, 0x06, [0x01]) == b"\x07"
    assert (await status())[0] & 0x60 == 0x20
    for data in ([0x04], [0x07]):
        assert await completion(operator, CHASSIS, 0x06, data) == 0xCC
    for data in ([], [0x01, 0x00]):
        assert await completion(operator, CHASSIS, 0x06, data) == 0xC7
    assert await completion(context(machine, Privilege.USER), CHASSIS, 0x06, [0x00]) == 0xD4
    assert await ok(operator, CHASSIS, 0x06, [0x00]) == b"\x07"

    # cycle, hard reset and diagnostic interrupt need the machine on: not supported in the present state
    for control in (0x02, 0x03, 0x04):
        assert await completion(operator, CHASSIS, 0x02, [control]) == 0xD5, control
    for data in ([0x06], [0x0F]):
        assert await completion(operator, CHASSIS, 0x02, data) == 0xCC
    for data in ([], [0x01, 0x00]):
        assert await completion(operator, CHASSIS, 0x02, data) == 0xC7
    assert await ok(ctx, CHASSIS, 0x07) == bytes([0x00, 0x00])  # none of those restarted anything

    # power up by an Operator, over the LAN channel
    assert await ok(operator, CHASSIS, 0x02, [0x01]) == b""
    on = await status()
    assert on[0] & 0x01 and on[1] & 0x10  # on, and the last power-on came from an IPMI command
    assert await ok(ctx, CHASSIS, 0x07) == bytes([0x01, LAN])  # chassis control command, channel 1
    assert await ok(context(machine, channel=SYSTEM), CHASSIS, 0x02, [0x03]) == b""  # a reset from the host
    assert await ok(ctx, CHASSIS, 0x07) == bytes([0x01, SYSTEM])
    assert (await status())[0] & 0x01

    # identify: timed (default 15 s), indefinite with the force bit (byte 2 overrides byte 1), off with 0
    async def identify() -> int:
        return (await status())[2] >> 4 & 0x03

    assert await identify() == 0b00
    assert await ok(operator, CHASSIS, 0x04) == b""
    assert await identify() == 0b01
    assert await ok(operator, CHASSIS, 0x04, [0x00]) == b""
    assert await identify() == 0b00
    assert await ok(operator, CHASSIS, 0x04, [0x0A, 0x01]) == b""
    assert await identify() == 0b10
    assert (await status())[2] == 0x40 | 0x20
    assert await ok(operator, CHASSIS, 0x04, [0x00, 0x00]) == b""
    assert await identify() == 0b00
    assert await ok(operator, CHASSIS, 0x04, [0x00, 0x01]) == b""
    assert await identify() == 0b10
    assert await ok(operator, CHASSIS, 0x04, [0x05]) == b""
    assert await identify() == 0b01
    assert await ok(operator, CHASSIS, 0x04, [0x00]) == b""
    assert await identify() == 0b00
    assert await completion(operator, CHASSIS, 0x04, [0x05, 0x00, 0x00]) == 0xC7

    # power down: off again; the restart cause stays that of the last restart
    assert await ok(operator, CHASSIS, 0x02, [0x00]) == b""
    assert (await status())[0] & 0x01 == 0
    assert await ok(ctx, CHASSIS, 0x07) == bytes([0x01, SYSTEM])


# ---------------------------------------------------------------- system boot options (§28.12, §28.13)

async def get_boot(ctx: Context, parameter: int, set_selector: int = 0) -> bytes:
    """A parameter's data, checking the parameter version (1) and the parameter byte (valid)."""
    answer = await ok(ctx, CHASSIS, 0x09, [parameter, set_selector, 0x00])
    assert answer[:2] == bytes([0x01, parameter]), answer
    return answer[2:]


async def set_boot(ctx: Context, parameter: int, data: bytes | list[int]) -> int:
    return await completion(ctx, CHASSIS, 0x08, bytes([parameter]) + bytes(data))


async def test_boot_option_parameters(state):
    ctx = context(state, Privilege.OPERATOR)
    defaults = {0: bytes(1), 1: bytes(1), 2: bytes(1), 3: bytes(1), 4: bytes(2), 6: bytes(9)}
    for parameter, value in defaults.items():
        assert await get_boot(ctx, parameter) == value, parameter
    assert await get_boot(ctx, 7, 3) == b"\x03" + bytes(16)

    writes = {0: b"\x01", 1: b"\x81", 2: b"\x03", 3: b"\x1f",
              6: bytes([0x01, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88])}
    for parameter, value in writes.items():
        assert await set_boot(ctx, parameter, value) == 0, parameter
    for parameter, value in writes.items():
        assert await get_boot(ctx, parameter) == value, parameter
    assert await set_boot(ctx, 0, b"\x00") == 0  # set complete
    assert await get_boot(ctx, 0) == b"\x00"
    assert await set_boot(ctx, 0, b"\x02") == 0  # commit write: writes apply at once, so the set is complete
    assert await get_boot(ctx, 0) == b"\x00"
    assert await set_boot(ctx, 0, b"\x03") == 0xCC  # reserved

    # boot info acknowledge: data 1 is a write mask for data 2, and reads back as 00h
    assert await set_boot(ctx, 4, [0xFF, 0x1F]) == 0
    assert await get_boot(ctx, 4) == bytes([0x00, 0x1F])
    assert await set_boot(ctx, 4, [0x01, 0x00]) == 0  # BIOS/POST has handled the boot info
    assert await get_boot(ctx, 4) == bytes([0x00, 0x1E])
    assert await set_boot(ctx, 4, [0x00, 0x00]) == 0  # nothing writable: no change
    assert await get_boot(ctx, 4) == bytes([0x00, 0x1E])
    assert await set_boot(ctx, 4, [0x18, 0x08]) == 0  # bit 4 cleared, bit 3 set, the rest kept
    assert await get_boot(ctx, 4) == bytes([0x00, 0x0E])

    # the mailbox: block 0 (IANA first), a partial block, an unwritten one; 5 blocks
    block0 = IPMI_IANA + bytes(range(13))
    assert await set_boot(ctx, 7, b"\x00" + block0) == 0
    assert await set_boot(ctx, 7, b"\x04" + b"tail") == 0
    assert await get_boot(ctx, 7, 0) == b"\x00" + block0
    assert await get_boot(ctx, 7, 4) == b"\x04" + b"tail"
    assert await get_boot(ctx, 7, 2) == b"\x02" + bytes(16)
    assert await set_boot(ctx, 7, b"\x05" + bytes(16)) == 0xCC
    assert await completion(ctx, CHASSIS, 0x09, [0x07, 0x05, 0x00]) == 0xCC

    # fixed lengths; the mailbox: a set selector and 1-16 bytes
    for parameter, value in ((0, b""), (1, b"\x00\x00"), (3, b""), (4, b"\x01"), (4, b"\x01\x01\x01"),
                             (5, bytes(4)), (5, bytes(6)), (6, bytes(8)), (6, bytes(10)), (7, b"\x01"),
                             (7, b"\x01" + bytes(17))):
        assert await set_boot(ctx, parameter, value) == 0xC7, (parameter, value)
    assert await completion(ctx, CHASSIS, 0x08) == 0xC7
    for data in ([0x01, 0x00], [0x01, 0x00, 0x00, 0x00]):
        assert await completion(ctx, CHASSIS, 0x09, data) == 0xC7, data
    for parameter, value in writes.items():  # none of the refusals changed anything
        if parameter:
            assert await get_boot(ctx, parameter) == value, parameter

    # parameters 8-127 (including the OEM range 96-127) are not supported
    for parameter in range(8, 0x80):
        assert await completion(ctx, CHASSIS, 0x09, [parameter, 0x00, 0x00]) == 0x80, parameter
        assert await set_boot(ctx, parameter, b"\x00") == 0x80, parameter

    # parameter 5 needs the machine: without its service, "destination unavailable"
    assert await set_boot(ctx, 5, [0x80, 0x04, 0, 0, 0]) == 0xD3
    assert await completion(ctx, CHASSIS, 0x09, [0x05, 0x00, 0x00]) == 0xD3


async def test_boot_flags_follow_the_machine(machine):
    ctx = context(machine, Privilege.OPERATOR)

    async def override() -> BootOverride:
        return await bus.request(machine, "n1", subjects.BOOT_GET, None, BootOverride)

    inventory = await bus.request(machine, "n1", subjects.INVENTORY_GET, None, Inventory)
    assert (inventory.firmware, inventory.firmwares) == ("Legacy", ["Legacy", "UEFI"])  # SeaBIOS; OVMF installed
    assert await get_boot(ctx, 5) == bytes(5)  # no override

    # valid, persistent, EFI, PXE (and screen blank, console redirection off, device instance 1):
    # a continuous PXE override, booting in UEFI mode; every bit reads back as written
    flags = bytes([0x80 | 0x40 | 0x20, 0x01 << 2 | 0x02, 0x01, 0x00, 0x01])
    assert await set_boot(ctx, 5, flags) == 0
    assert (await override()) == BootOverride(target="Pxe", enabled="Continuous", mode="UEFI")
    assert await get_boot(ctx, 5) == flags

    # valid, not persistent: once; the device selectors that share a target
    for selector, target in ((0x2, "Hdd"), (0x3, "Hdd"), (0x5, "Cd"), (0x6, "BiosSetup"), (0x8, "Cd"),
                             (0x9, "Cd"), (0xB, "Hdd")):
        flags = bytes([0x80, selector << 2, 0, 0, 0])
        assert await set_boot(ctx, 5, flags) == 0, selector
        assert (await override()) == BootOverride(target=target, enabled="Once", mode="Legacy"), selector
        assert await get_boot(ctx, 5) == flags

    # no override device, or the valid bit clear: the override is off
    assert await set_boot(ctx, 5, [0x00, 0x01 << 2, 0, 0, 0]) == 0
    assert (await override()).enabled == "Disabled"
    assert await get_boot(ctx, 5) == bytes([0x00, 0x01 << 2, 0, 0, 0])
    assert await set_boot(ctx, 5, [0xA0, 0x00, 0, 0, 0]) == 0  # valid, EFI, no override: reads back as written
    assert (await override()).enabled == "Disabled"
    assert await get_boot(ctx, 5) == bytes([0xA0, 0x00, 0, 0, 0])

    # device selectors this machine cannot boot: diagnostic partition, floppy, reserved
    assert await set_boot(ctx, 5, [0xC0, 0x02 << 2, 0, 0, 0]) == 0
    for selector in (0x4, 0x7, 0xA, 0xC, 0xD, 0xE, 0xF):
        assert await set_boot(ctx, 5, [0xC0, selector << 2, 0, 0, 0]) == 0xCC, selector
    assert (await override()) == BootOverride(target="Hdd", enabled="Continuous", mode="Legacy")
    assert await get_boot(ctx, 5) == bytes([0xC0, 0x02 << 2, 0, 0, 0])

    # an override set over the bus (as Redfish does) reads back as flags built from it
    await bus.request(machine, "n1", subjects.BOOT_SET, BootOverrideUpdate(target="Cd", enabled="Continuous"),
                      BootOverride)
    assert await get_boot(ctx, 5) == bytes([0xC0, 0x05 << 2, 0, 0, 0])
    await bus.request(machine, "n1", subjects.BOOT_SET, BootOverrideUpdate(target="BiosSetup", enabled="Once"),
                      BootOverride)
    assert await get_boot(ctx, 5) == bytes([0x80, 0x06 << 2, 0, 0, 0])

    # a one-time override (EFI asked, CMOS clear, verbosity quiet, device instance 3) is used by
    # the next boot: the valid bit is then clear and every other bit as written
    flags = bytes([0x80 | 0x20, 0x80 | 0x02 << 2, 0x20, 0x00, 0x03])
    assert await set_boot(ctx, 5, flags) == 0
    assert (await override()) == BootOverride(target="Hdd", enabled="Once", mode="UEFI")
    assert await ok(ctx, CHASSIS, 0x02, [0x01]) == b""
    await wait_for(lambda: _override_used(machine), timeout=30, message="the one-time override used")
    assert await get_boot(ctx, 5) == bytes([0x20]) + flags[1:]
    assert await ok(ctx, CHASSIS, 0x02, [0x00]) == b""


async def _override_used(nc) -> bool:
    return (await bus.request(nc, "n1", subjects.BOOT_GET, None, BootOverride)).enabled == "Disabled"
