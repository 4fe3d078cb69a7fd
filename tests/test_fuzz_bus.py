"""Fuzzing the bus parsers: arbitrary bytes and JSON at every endpoint of both services.

Every reply must be a well-formed reply or ErrorReply, no request may go unanswered, the
services must stay up, and a valid request must succeed afterwards. Bounded in examples.
"""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from conftest import write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import ErrorReply, PowerStatus, User, UserRef

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
field_names = st.sampled_from(["action", "target", "enabled", "mode", "image", "slot", "name", "password",
                               "channel", "volatile", "param", "data", "key", "privilege", "fresh", "payloads"])
plausible = st.dictionaries(field_names, json_values, max_size=4).map(lambda value: json.dumps(value).encode())
payloads = st.binary(max_size=200) | plausible | json_values.map(lambda value: json.dumps(value).encode())
operations = st.sampled_from(
    [subjects.for_machine("f1", operation) for operation in (*subjects.MACHINE_ENDPOINTS, *subjects.STATE_ENDPOINTS)])


@pytest.fixture
async def fuzz_target(nc, services, short_dir):
    # The VM's "QEMU" is /bin/false: a power-on the fuzzer happens to form fails fast and cleanly.
    config = write_config(short_dir, '[vm.f1]\nbin = "/bin/false"\ncmd = ["-m", "64"]\n')
    machine = await services("machine", config)
    state = await services("state", config)
    return machine, state


async def test_fuzzed_requests_get_replies_and_services_survive(nc, fuzz_target):
    machine, state = fuzz_target
    loop = asyncio.get_running_loop()
    answered: list[tuple[str, bytes]] = []

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(subject=operations, payload=payloads)
    def fuzz(subject: str, payload: bytes) -> None:
        reply = asyncio.run_coroutine_threadsafe(nc.request(subject, payload, timeout=10), loop).result(30)
        if reply.headers and "Nats-Service-Error-Code" in reply.headers:
            error = msgspec.json.decode(reply.data, type=ErrorReply)
            assert error.error in bus.ERROR_CODES and error.error != "internal", (subject, payload, error)
        else:
            assert isinstance(msgspec.json.decode(reply.data), dict)
        answered.append((subject, payload))

    await loop.run_in_executor(None, fuzz)
    assert len(answered) >= 400
    assert machine.process.returncode is None and state.process.returncode is None
    assert (await bus.request(nc, "f1", subjects.POWER_GET, None, PowerStatus)).machine == "f1"
    assert (await bus.request(nc, "f1", subjects.USERS_GET, UserRef(slot=2), User)).slot == 2
