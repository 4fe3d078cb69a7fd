"""How the Redfish service learns the machines: from what the machine services on the bus announce
(nats.micro INFO), with a real nats-server; the machine services here are bare nats.micro
services announcing names, so that one can be made to fall silent at a chosen moment."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.micro import ServiceConfig, add_service
from qemu_bmc_shared.discovery import MACHINE_SERVICE, Machines


async def announce(nc: Client, *names: str):
    return await add_service(nc, ServiceConfig(name=MACHINE_SERVICE, version="0.0.1",
                                               metadata={"machines": ",".join(names)}))


async def settled(machines: Machines, rounds: int = 3) -> list[str]:
    """The list after a few refreshes (each ``list`` call starts one when the last is old)."""
    for _ in range(rounds):
        await machines.list()
        if machines.refreshing is not None:
            await machines.refreshing
        await asyncio.sleep(machines.max_age)
    names = await machines.list()
    if machines.refreshing is not None:
        await machines.refreshing
    return names


async def test_machines_of_every_service_and_a_silent_one_kept_for_a_while(nc: Client):
    machines = Machines(nc, max_age=0.1, forget_after=1.5)
    first = await announce(nc, "a1", "a2")
    second = await announce(nc, "b1")
    assert await settled(machines) == ["a1", "a2", "b1"]

    await second.stop()  # a host that stops answering: kept for forget_after, then gone
    assert await settled(machines) == ["a1", "a2", "b1"]
    await asyncio.sleep(1.5)
    assert await settled(machines) == ["a1", "a2"]

    third = await announce(nc, "c1")  # a machine service started elsewhere: listed at once
    assert await settled(machines) == ["a1", "a2", "c1"]
    await first.stop()
    await third.stop()
