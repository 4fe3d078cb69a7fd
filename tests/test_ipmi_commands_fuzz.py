"""Fuzzing every registered IPMI command through the registry: random request data, privilege,
channel and LAN front-end options, against a real nats-server and a real state service and with no
machine service (so every machine call fails on the bus).

The properties hold whatever the fuzzer did before: dispatch never raises, it never answers 0xFF
(a handler crashed; the machine's absence must map to a completion code), a session below the
command's privilege always gets 0xD4, and the state service still answers afterwards. Bounded in
examples (a few seconds).
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from pathlib import Path

import pytest
from conftest import no_exception_logged, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_bmc_shared import bus, ipmi, subjects
from qemu_bmc_shared.ipmi import Command, Context, Privilege, Request, Response, app, chassis
from qemu_bmc_shared.messages import User, UserRef

REGISTRY = ipmi.load()
COMMANDS = [REGISTRY.commands[key] for key in sorted(REGISTRY.commands)]
LAN, SYSTEM = 1, 0x0F

#: Bytes that mean something in many requests: channels (this channel, the system interface,
#: IPMI 2.0 bit 7), user ids, privilege levels, selectors, parameter numbers, the edges.
interesting = st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x0E, 0x0F, 0x10, 0x14, 0x17, 0x18, 0x3F,
                               0x40, 0x41, 0x42, 0x80, 0x81, 0x82, 0x8E, 0xC0, 0xFE, 0xFF])
random_data = st.binary(max_size=32) | st.lists(interesting | st.integers(0, 255), max_size=24).map(bytes)

#: Well-formed requests of each command (IPMI v2.0 request layouts), mutated by the fuzzer so
#: that most examples get past the length checks and into the handlers.
SEEDS: dict[tuple[int, int], list[bytes]] = {
    (0x00, 0x02): [b"\x01", b"\x03"],
    (0x00, 0x04): [b"", b"\x0a", b"\x00\x01"],
    (0x00, 0x06): [b"\x02", b"\x03"],
    (0x00, 0x08): [b"\x00\x01", b"\x03\x1f", b"\x04\xff\x1f", b"\x05\xe0\x04\x00\x00\x00", b"\x06" + bytes(9),
                   b"\x07\x00" + bytes(16), b"\x07\x04tail"],
    (0x00, 0x09): [b"\x05\x00\x00", b"\x04\x00\x00", b"\x07\x02\x00"],
    (0x04, 0x20): [b"", b"\x01"],
    (0x04, 0x21): [struct.pack("<HHBB", 0, 1, 0, 0xFF), struct.pack("<HHBB", 0, 2, 5, 16)],
    (0x04, 0x2D): [b"\x01", b"\x02"],
    (0x04, 0x2F): [b"\x03"],
    (0x06, 0x2E): [b"\x08"],
    (0x06, 0x30): [b"\x0b"],
    (0x06, 0x38): [b"\x8e\x04", b"\x01\x02"],
    (0x06, 0x40): [b"\x01\x82\x84", b"\x01\x40\x43"],
    (0x06, 0x41): [b"\x01\x80", b"\x0e\x40"],
    (0x06, 0x42): [b"\x0e", b"\x0f"],
    (0x06, 0x43): [b"\x91\x03\x04", b"\x01\x03\x04\x00"],
    (0x06, 0x44): [b"\x01\x02"],
    (0x06, 0x45): [b"\x03" + b"fuzz".ljust(16, b"\0")],
    (0x06, 0x46): [b"\x02"],
    (0x06, 0x47): [b"\x03\x02" + b"secret".ljust(16, b"\0"), b"\x83\x03" + b"secret".ljust(20, b"\0"), b"\x03\x01"],
    (0x06, 0x4C): [b"\x01\x03\x02\x00\x01\x00"],
    (0x06, 0x4D): [b"\x01\x02"],
    (0x06, 0x54): [b"\x0e\x00\x80", b"\x01\x00\x01"],
    (0x06, 0x56): [b"\x01\x00\x01", b"\x01\x01\x01" + bytes(range(1, 21))],
    (0x0A, 0x10): [b"\x00"],
    (0x0A, 0x11): [b"\x00\x00\x00\x10"],
    (0x0A, 0x12): [b"\x00\x00\x00\x55"],
    (0x0A, 0x23): [struct.pack("<HHBB", 0, 0, 0, 0xFF), struct.pack("<HHBB", 0, 0xFFFF, 0, 0xFF)],
    (0x0A, 0x43): [struct.pack("<HHBB", 0, 0, 0, 0xFF), struct.pack("<HHBB", 0, 0xFFFF, 0, 0xFF)],
    (0x0A, 0x44): [b"\x00\x00\x02" + bytes(4) + bytes([0x41, 0x00, 0x04, 0x05, 0x07, 0x6F, 0x00, 0xFF, 0xFF]),
                   b"\x00\x00\xe5" + bytes(13)],
    (0x0A, 0x47): [b"\x00\x00CLR\xaa", b"\x00\x00CLR\x00"],
    (0x0A, 0x49): [bytes(4)],
    (0x0C, 0x01): [b"\x01\x00\x01", b"\x01\x03\x0a\x00\x00\x05", b"\x01\x18" + bytes(9), b"\x01\x10" + bytes(18)],
    (0x0C, 0x02): [b"\x01\x03\x00\x00", b"\x01\x18\x00\x00", b"\x81\x03\x00\x00"],
    (0x0C, 0x21): [b"\x01\x01\x00", b"\x01\x03\x14\x20", b"\x01\x00\x01"],
    (0x0C, 0x22): [b"\x01\x01\x00\x00", b"\x8e\x08\x00\x00"],
}


def mutate(seed: bytes, changes: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
    data = bytearray(seed)
    for position, value in changes:
        if data:
            data[position % len(data)] = value
    return bytes(data[:len(data) - cut] if cut < len(data) else b"") + tail


def requests(command: Command) -> st.SearchStrategy[tuple[Command, bytes]]:
    seeds = SEEDS.get((command.netfn, command.cmd))
    data = random_data
    if seeds:
        changes = st.lists(st.tuples(st.integers(0, 31), interesting | st.integers(0, 255)), min_size=1, max_size=3)
        same_length = st.builds(mutate, st.sampled_from(seeds), changes, st.just(0), st.just(b""))
        resized = st.builds(mutate, st.sampled_from(seeds), changes, st.integers(0, 2), st.binary(max_size=2))
        data = st.one_of(st.sampled_from(seeds), *[same_length] * 6, resized, random_data)
    return st.tuples(st.just(command), data)


#: What the LAN front-end may put in the context.
extras = st.sampled_from([
    {},
    {"auth_none": True, "cipher_suite_0": True},
    {"cipher_suites": [17, 3]},
    {"login_lockout": (3, 30.0, 65.0), "lan_port": 6230, "lan_address": "192.0.2.7", "active_sessions": 2},
])


@pytest.fixture
async def state(nc, services, short_dir: Path):
    config = write_config(short_dir, '[vm.f1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:6231"\n')
    yield await services("state", config)
    # what the fuzzer left in the BMC's runtime state (global enables, identify, restart cause)
    app._global_enables.pop("f1", None)
    chassis._runtime.pop("f1", None)


async def dispatch(nc, command: Command, data: bytes, privilege: Privilege, channel: int,
                   extra: dict[str, object]) -> Response:
    context = Context(machine="f1", nc=nc, channel=channel, privilege=privilege, extra=dict(extra))
    response = await REGISTRY.dispatch(context, Request(command.netfn, command.cmd, data))
    what = f"{command.name} ({command.netfn:#04x}/{command.cmd:#04x}) {data.hex()} {privilege.name} channel {channel}"
    assert isinstance(response, Response) and isinstance(response.data, bytes), what
    assert 0 <= response.completion <= 0xFF, what
    assert response.completion != 0xFF, f"{what}: the handler crashed"
    assert response.completion != 0xC1, what  # every command here is registered
    if channel != SYSTEM and privilege < command.privilege:
        assert response.completion == 0xD4, what
    return response


async def test_every_command_survives_random_requests(nc, state, short_dir: Path):
    loop = asyncio.get_running_loop()
    completions: Counter[tuple[str, int]] = Counter()

    # every command at least once with no data and with short data, before the random ones
    for command in COMMANDS:
        for data in (b"", b"\x01", b"\x0e\x00\x00"):
            response = await dispatch(nc, command, data, Privilege.ADMINISTRATOR, LAN, {})
            completions[command.name, response.completion] += 1

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(request=st.sampled_from(COMMANDS).flatmap(requests),
           privilege=st.sampled_from(list(Privilege)) | st.just(Privilege.ADMINISTRATOR),
           channel=st.sampled_from([LAN, SYSTEM]), extra=extras)
    def fuzz(request: tuple[Command, bytes], privilege: Privilege, channel: int, extra: dict[str, object]) -> None:
        command, data = request
        response = asyncio.run_coroutine_threadsafe(dispatch(nc, command, data, privilege, channel, extra),
                                                    loop).result(30)
        completions[command.name, response.completion] += 1

    with no_exception_logged(short_dir / "state.log"):  # nor did the state service trip over anything
        await loop.run_in_executor(None, fuzz)
    assert sum(completions.values()) >= 1500 + 3 * len(COMMANDS)
    assert {name for name, _ in completions} == {command.name for command in COMMANDS}
    # the machine's absence came out as a completion code (destination unavailable), not a crash
    assert any(code == 0xD3 for _, code in completions)

    assert state.process.returncode is None
    assert (await bus.request(nc, "f1", subjects.USERS_GET, UserRef(slot=2), User)).slot == 2
    response = await dispatch(nc, REGISTRY.find(0x06, 0x46), b"\x02", Privilege.ADMINISTRATOR, LAN, {})
    assert response.completion == 0 and len(response.data) == 16
