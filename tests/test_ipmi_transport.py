"""IPMI transport commands (LAN and SOL configuration parameters) through the registry, against a
real nats-server and a real state service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import write_config
from qemu_bmc_shared import bus, ipmi, subjects
from qemu_bmc_shared.config import IpmiConfig
from qemu_bmc_shared.ipmi import Context, NetFn, Privilege, Request, Response
from qemu_bmc_shared.ipmi.transport import front_end
from qemu_bmc_shared.messages import AccountPolicy, AccountPolicyUpdate

SET_LAN, GET_LAN, SET_SOL, GET_SOL = 0x01, 0x02, 0x21, 0x22
REGISTRY = ipmi.load()

#: Every supported LAN parameter and its data length (IPMI v2.0 table 23-4).
LAN_SIZES = {0: 1, 1: 1, 2: 5, 3: 4, 4: 1, 5: 6, 6: 4, 7: 3, 8: 2, 9: 2, 10: 1, 11: 1, 12: 4, 13: 6, 14: 4, 15: 6,
             16: 18, 20: 2, 21: 1, 22: 1, 23: 7, 24: 9, 50: 1, 51: 1, 55: 3}
SOL_SIZES = {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 1, 6: 1, 7: 1, 8: 2}


@pytest.fixture
async def nc_with_state(nc, services, short_dir: Path):
    config = write_config(short_dir, '[vm.n1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:6230"\n')
    await services("state", config)
    return nc


def context(nc, privilege: Privilege = Privilege.ADMINISTRATOR, channel: int = 1, **extra: Any) -> Context:
    return Context(machine="n1", nc=nc, channel=channel, privilege=privilege, extra=extra)


async def run(ctx: Context, cmd: int, data: bytes) -> Response:
    return await REGISTRY.dispatch(ctx, Request(NetFn.TRANSPORT, cmd, data))


async def get(ctx: Context, param: int, cmd: int = GET_LAN, channel: int = 1) -> Response:
    return await run(ctx, cmd, bytes([channel, param, 0, 0]))


async def put(ctx: Context, param: int, value: bytes, cmd: int = SET_LAN, channel: int = 1) -> Response:
    return await run(ctx, cmd, bytes([channel, param]) + value)


async def value_of(ctx: Context, param: int, cmd: int = GET_LAN) -> bytes:
    response = await get(ctx, param, cmd)
    assert response.completion == 0 and response.data[0] == 0x11, (param, response)
    return response.data[1:]


async def test_every_lan_parameter_reads_with_its_size(nc_with_state):
    ctx = context(nc_with_state)
    for param, size in LAN_SIZES.items():
        assert len(await value_of(ctx, param)) == size, param
    expected = {1: b"\x14", 2: b"\x14" * 5, 3: bytes([127, 0, 0, 1]), 4: b"\x01", 6: bytes([255, 255, 255, 0]),
                7: b"\x40\x40\x10", 8: (623).to_bytes(2, "little"), 9: (664).to_bytes(2, "little"),
                16: b"public" + bytes(12), 22: b"\x06", 23: bytes([0, 1, 2, 3, 15, 16, 17]),
                24: bytes([0, 0x40, 0x44, 0, 0, 0, 0, 0, 0x40]), 50: b"\x00", 51: b"\x00", 55: bytes(3)}
    for param, value in expected.items():
        assert await value_of(ctx, param) == value, param
    mac = await value_of(ctx, 5)
    assert mac[0] == 0x02  # the seeded, locally administered MAC

    # revision only, and "this channel" from the LAN channel and from the system interface
    assert await run(ctx, GET_LAN, bytes([0x81, 3, 0, 0])) == Response(0, b"\x11")
    assert (await get(ctx, 3, channel=0x0E)).data[1:] == bytes([127, 0, 0, 1])
    assert (await get(context(nc_with_state, channel=0x0F), 3, channel=0x0E)).data[1:] == bytes([127, 0, 0, 1])

    # what `ipmitool lan print` and FreeIPMI bmc-config read: supported, or 0x80 (which both tolerate)
    for param in (0, 1, 2, 4, 3, 6, 5, 16, 7, 10, 11, 12, 13, 14, 15, 17, 20, 21, 22, 23, 24, 25, 26, 50, 51, 55,
                  56, 59, 64, 65):
        assert (await get(ctx, param)).completion in (0x00, 0x80), param


async def test_lan_set_get_round_trip(nc_with_state):
    ctx = context(nc_with_state)
    writes = {3: bytes([10, 0, 0, 5]), 6: bytes([255, 255, 0, 0]), 12: bytes([10, 0, 0, 1]), 4: b"\x02",
              13: bytes.fromhex("525400aabbcc"), 14: bytes([10, 0, 0, 2]), 2: bytes([0, 0x10, 0x14, 0x14, 0]),
              10: b"\x02", 11: b"\x04", 20: bytes([0x64, 0x80]), 21: b"\x05", 7: b"\x20\x40\x10",
              16: b"private".ljust(18, b"\0"), 24: bytes([0, 0x34, 0x44, 0x24, 0, 0, 0, 0, 0]), 51: b"\x00"}
    for param, value in writes.items():
        assert await put(ctx, param, value) == Response(0), param
    for param, value in writes.items():
        assert await value_of(ctx, param) == value, param
    assert await put(ctx, 3, bytes([10, 0, 0, 9]), channel=0x0E) == Response(0)
    assert await value_of(ctx, 3) == bytes([10, 0, 0, 9])


async def test_lan_errors(nc_with_state):
    ctx = context(nc_with_state)
    for param in (1, 8, 9, 22, 23, 50, 55):  # read-only
        assert (await put(ctx, param, bytes(LAN_SIZES[param]))).completion == 0x82, param
    for param in (17, 19, 56, 0xC0, 0xFF):  # not supported
        assert (await get(ctx, param)).completion == 0x80, param
        assert (await put(ctx, param, b"\x00")).completion == 0x80, param
    # the bad password threshold is the state service's account policy (5 failures, reset after 60 s,
    # locked out for 60 s by default; 10 s units), the same for every front-end: read-only here
    assert await value_of(ctx, 26) == bytes([0, 5, 6, 0, 6, 0])
    assert (await put(ctx, 26, bytes(6))).completion == 0x82
    policy = AccountPolicyUpdate(lockout_threshold=3, lockout_reset_after=30, lockout_duration=65)
    await bus.request(nc_with_state, "n1", subjects.ACCOUNT_POLICY_SET, policy, AccountPolicy)
    assert await value_of(ctx, 26) == bytes([0, 3, 3, 0, 7, 0])
    for request in (bytes([1, 3, 10, 0, 0]), bytes([1, 3, 10, 0, 0, 1, 2]), bytes([1, 4]), b"\x01"):
        assert (await run(ctx, SET_LAN, request)).completion == 0xC7, request
    for request in (bytes([1, 3, 0]), bytes([1, 3, 0, 0, 0])):
        assert (await run(ctx, GET_LAN, request)).completion == 0xC7, request
    bad = [(4, b"\x05"), (5, bytes.fromhex("010203040506")), (5, b"\xff" * 6), (13, bytes.fromhex("0180c2000000")),
           (6, bytes([255, 0, 255, 0])), (6, bytes([255, 255, 255, 1])), (3, bytes([224, 0, 0, 1])),
           (3, b"\xff" * 4), (12, bytes([239, 1, 1, 1])), (20, bytes([0, 0x80])), (20, bytes([1, 0x10])),
           (21, b"\x08"), (51, b"\x01"), (51, b"\x02"), (24, bytes([0, 0x46, 0, 0, 0, 0, 0, 0, 0])),
           (2, bytes([0x08, 0, 0, 0, 0])), (10, b"\x04"), (0, b"\x03")]
    for param, value in bad:
        assert (await put(ctx, param, value)).completion == 0xCC, (param, value)
    assert await value_of(ctx, 4) == b"\x01"  # nothing of the above was stored
    for channel in (0, 2, 3, 0x0F):
        assert (await get(ctx, 3, channel=channel)).completion == 0xCC, channel
        assert (await put(ctx, 3, bytes([10, 0, 0, 5]), channel=channel)).completion == 0xCC, channel


async def test_set_in_progress(nc_with_state):
    ctx = context(nc_with_state)
    assert await value_of(ctx, 0) == b"\x00"
    assert await put(ctx, 0, b"\x01") == Response(0)
    assert await value_of(ctx, 0) == b"\x01"
    assert (await put(ctx, 0, b"\x01")).completion == 0x81  # already in progress
    assert await put(ctx, 3, bytes([10, 1, 1, 1])) == Response(0)
    assert await put(ctx, 0, b"\x02") == Response(0)  # commit write: done at once
    assert await value_of(ctx, 0) == b"\x00"
    assert await put(ctx, 0, b"\x00") == Response(0)
    assert await value_of(ctx, 3) == bytes([10, 1, 1, 1])


async def test_values_from_the_lan_front_end(nc_with_state):
    ctx = context(nc_with_state, cipher_suite_0=True, auth_none=True, lan_port=6230)
    assert await value_of(ctx, 1) == b"\x15"
    assert await value_of(ctx, 8) == (6230).to_bytes(2, "little")
    assert await value_of(ctx, 8, GET_SOL) == (6230).to_bytes(2, "little")
    assert await value_of(ctx, 22) == b"\x07"
    assert await value_of(ctx, 23) == bytes([0, 0, 1, 2, 3, 15, 16, 17])
    assert await value_of(ctx, 24) == bytes([0, 0x44, 0x44, 0, 0, 0, 0, 0, 0x40])  # nibble n: suite id n
    # what the LAN front-end reports by default ([ipmi]: MD5 only, suites 3 and 17), and as configured
    default = context(nc_with_state, **front_end(IpmiConfig()))
    assert await value_of(default, 1) == b"\x04" and await value_of(default, 2) == b"\x04" * 5
    assert await value_of(default, 23) == bytes([0, 3, 17])
    assert await value_of(default, 24) == bytes([0, 0, 0x40, 0, 0, 0, 0, 0, 0])  # nibble 3: Administrator
    opened = context(nc_with_state, **front_end(IpmiConfig(auth_types=("MD5", "straight", "none"),
                                                           cipher_suites=(1, 3, 15, 17))))
    assert await value_of(opened, 1) == b"\x15"
    assert await value_of(opened, 23) == bytes([0, 1, 3, 15, 17])
    offered = context(nc_with_state, cipher_suites=[17, 3])
    assert await value_of(offered, 22) == b"\x02"
    assert await value_of(offered, 23) == bytes([0, 3, 17])
    assert await value_of(offered, 24) == bytes([0, 0, 0x40, 0, 0, 0, 0, 0, 0])

    # the address the LAN front-end really listens on, until a client sets one (0.0.0.0: none set)
    listening = context(nc_with_state, lan_address="192.0.2.7")
    assert await put(listening, 3, bytes(4)) == Response(0)
    assert await value_of(listening, 3) == bytes([192, 0, 2, 7])
    assert await put(listening, 3, bytes([10, 1, 2, 3])) == Response(0)
    assert await value_of(listening, 3) == bytes([10, 1, 2, 3])
    assert await value_of(context(nc_with_state), 3) == bytes([10, 1, 2, 3])
    assert await value_of(context(nc_with_state, lan_address="0.0.0.0"), 3) == bytes([10, 1, 2, 3])


async def test_sol_parameters(nc_with_state):
    ctx = context(nc_with_state)
    for param, size in SOL_SIZES.items():
        assert len(await value_of(ctx, param, GET_SOL)) == size, param
    assert await value_of(ctx, 1, GET_SOL) == b"\x01"
    assert await value_of(ctx, 5, GET_SOL) == b"\x0a"
    assert await value_of(ctx, 7, GET_SOL) == b"\x01"
    assert await value_of(ctx, 8, GET_SOL) == (623).to_bytes(2, "little")
    assert await run(ctx, GET_SOL, bytes([0x8E, 1, 0, 0])) == Response(0, b"\x11")

    writes = {1: b"\x00", 2: b"\x83", 3: b"\x14\x20", 4: b"\x03\x64", 5: b"\x06", 6: b"\x09"}
    for param, value in writes.items():
        assert await put(ctx, param, value, SET_SOL) == Response(0), param
    for param, value in writes.items():
        assert await value_of(ctx, param, GET_SOL) == value, param

    for param in (7, 8):
        assert (await put(ctx, param, bytes(SOL_SIZES[param]), SET_SOL)).completion == 0x82, param
    for param, value in ((1, b"\x02"), (2, b"\x01"), (2, b"\x06"), (3, b"\x00\x10"), (4, b"\x08\x00"),
                         (5, b"\x05"), (6, b"\x0b"), (0, b"\x03")):
        assert (await put(ctx, param, value, SET_SOL)).completion == 0xCC, (param, value)
    assert (await put(ctx, 5, b"\x06\x00", SET_SOL)).completion == 0xC7
    assert (await get(ctx, 9, GET_SOL)).completion == 0x80
    assert (await put(ctx, 9, b"\x00", SET_SOL)).completion == 0x80
    assert (await get(ctx, 1, GET_SOL, channel=2)).completion == 0xCC
    assert await value_of(ctx, 5, GET_SOL) == b"\x06"


async def test_privileges(nc_with_state):
    operator = context(nc_with_state, Privilege.OPERATOR)
    assert (await get(operator, 3)).completion == 0
    assert (await put(operator, 3, bytes([10, 0, 0, 5]))).completion == 0xD4
    user = context(nc_with_state, Privilege.USER)
    assert (await get(user, 3)).completion == 0xD4
    assert (await get(user, 1, GET_SOL)).completion == 0
    assert (await put(user, 1, b"\x00", SET_SOL)).completion == 0xD4
    assert (await put(operator, 1, b"\x00", SET_SOL)).completion == 0xD4
    # the system interface is not privilege-checked
    system = context(nc_with_state, Privilege.USER, channel=0x0F)
    assert await put(system, 4, b"\x01", channel=0x0E) == Response(0)


async def test_without_the_state_service(nc):
    """Computed parameters still answer; stored ones end with the bus failure's completion code."""
    ctx = context(nc)
    assert await value_of(ctx, 22) == b"\x06"
    assert (await get(ctx, 3)).completion == 0xC0
    assert (await put(ctx, 3, bytes([10, 0, 0, 5]))).completion == 0xC0
