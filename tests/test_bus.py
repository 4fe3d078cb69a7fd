"""The services as the NATS tooling sees them: $SRV discovery, error replies, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import msgspec
import pytest
from conftest import write_config
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import PowerStatus


@pytest.fixture
async def both(services, short_dir: Path):
    config = write_config(short_dir, '[vm.m1]\ncmd = ["-machine", "q35", "-accel", "tcg", "-m", "64", '
                                     '"-display", "none"]\n')
    await services("state", config)
    await services("machine", config)


async def test_services_register_with_the_nats_service_api(nc, both):
    for verb in ("PING", "INFO", "STATS"):
        for name in ("qemu-bmc-machine", "qemu-bmc-state"):
            reply = json.loads((await nc.request(f"$SRV.{verb}.{name}", b"", timeout=2)).data)
            assert reply["name"] == name and reply["version"] == "0.1.0"
            assert reply["metadata"]["machines"] == "m1"
    info = json.loads((await nc.request("$SRV.INFO.qemu-bmc-machine", b"", timeout=2)).data)
    assert {endpoint["subject"] for endpoint in info["endpoints"]} == {
        subjects.for_machine("m1", operation) for operation in subjects.MACHINE_ENDPOINTS}
    info = json.loads((await nc.request("$SRV.INFO.qemu-bmc-state", b"", timeout=2)).data)
    assert {endpoint["subject"] for endpoint in info["endpoints"]} == {
        subjects.any_machine(operation) for operation in subjects.STATE_ENDPOINTS}


async def test_bad_requests_to_the_machine_service(nc, both):
    cases = [
        (subjects.POWER_SET, b"{oops", "bad_request"),
        (subjects.POWER_SET, b'{"action": "explode"}', "bad_request"),
        (subjects.POWER_SET, b"{}", "bad_request"),
        (subjects.BOOT_SET, b'{"target": "Floppy"}', "bad_request"),
        (subjects.BOOT_SET, b'{"target": "UefiBootNext", "enabled": "Once", "boot_next": "Boot0F0F"}',
         "bad_request"),  # no such boot option
        (subjects.MEDIA_INSERT, b'{"image": ""}', "bad_request"),
        (subjects.MEDIA_INSERT, b'{"image": "/nonexistent.iso"}', "bad_request"),
        (subjects.POWER_GET, b'{"unexpected": 1}', "bad_request"),
    ]
    for operation, payload, error in cases:
        reply = await nc.request(subjects.for_machine("m1", operation), payload, timeout=30)
        body = msgspec.json.decode(reply.data)
        assert body["error"] == error, (operation, payload, body)
        assert reply.headers["Nats-Service-Error-Code"] == str(bus.ERROR_CODES[error])
        assert reply.headers["Nats-Service-Error"] == body["message"]
    # an unknown machine: a structured error from NATS' "no responders" (not a "timeout" after waiting)
    with pytest.raises(BusError) as refused:
        await bus.request(nc, "ghost", subjects.POWER_GET, None, PowerStatus, timeout=30)
    assert refused.value.error == "unknown_machine"
    # and the service keeps serving
    status = await bus.request(nc, "m1", subjects.POWER_GET, None, PowerStatus)
    assert status.state == "Off"
    stats = json.loads((await nc.request("$SRV.STATS.qemu-bmc-machine", b"", timeout=2)).data)
    assert sum(endpoint["num_requests"] for endpoint in stats["endpoints"]) >= len(cases) + 1


async def test_a_bucket_watch_gives_every_stored_key_before_saying_so(nc):
    """Thirty watches at once on a real bucket of twenty keys: each gives all twenty, then None,
    then a change made afterwards (nats-py alone said None early in about one watch in twenty),
    and the stored-keys listing names the same keys, deleted ones until purged."""
    kv = await bus.key_value(nc, "watch_test", "test bucket")
    for number in range(20):
        await kv.put(f"k.{number}", b"v")
    await kv.put("other", b"v")

    async def first_keys_then_change(number: int) -> tuple[set[str], str]:
        keys: set[str] = set()
        loaded = False
        async with contextlib.aclosing(bus.watch(kv, "k.>")) as entries:
            async for entry in entries:
                if entry is None:
                    loaded = True
                    await kv.put(f"k.new{number}", b"v")
                elif not loaded:
                    if not entry.key.startswith("k.new"):  # the others' changes may come first
                        keys.add(entry.key)
                elif entry.key == f"k.new{number}" and entry.operation is None:
                    return keys, entry.key
        raise AssertionError("the watch ended")

    for _ in range(15):
        for keys, change in await asyncio.gather(*(first_keys_then_change(n) for n in range(30))):
            assert keys == {f"k.{number}" for number in range(20)} and change.startswith("k.new")
        for number in range(30):
            await kv.purge(f"k.new{number}")
    await kv.delete("k.0")
    assert sorted(await bus.stored_keys(nc, "watch_test", "k.>")) == sorted(
        [f"k.{number}" for number in range(20)] + [f"k.new{number}" for number in range(30)])
    assert await bus.stored_keys(nc, "watch_test", "nothing.>") == []


async def test_a_bucket_watch_says_all_in_with_other_keys_in_the_bucket(nc):
    """Other keys than the watched ones in the bucket (after them, or none watched at all): the
    watch still says that all are in (it once waited for a stream sequence no watched key had)."""
    kv = await bus.key_value(nc, "watch_other_keys", "test bucket")
    await kv.put("sub.a", b"v")
    await kv.delete("sub.a")
    for number in range(3):
        await kv.put(f"x.{number}", b"v")

    async def stored(keys: str) -> int:
        count = 0
        async with contextlib.aclosing(bus.watch(kv, keys)) as entries:
            async for entry in entries:
                if entry is None:
                    return count
                count += 1
        raise AssertionError("the watch ended")

    assert await asyncio.wait_for(stored("sub.>"), 60) == 1  # the delete marker
    assert await asyncio.wait_for(stored("x.>"), 60) == 3
    assert await asyncio.wait_for(stored("none.>"), 60) == 0
