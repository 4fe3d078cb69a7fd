"""A machine's VNC listener follows its IPMI over LAN endpoint between the IPMI over LAN replicas:
the replica of the machine's shard serves it, another takes it over when that one stops, and the
listener is announced on the bus (``vnc.<machine>``, or ``unserved.vnc.<machine>`` when it cannot
be bound) for `qemu-bmc services` and `qemu-bmc up`'s banner."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import serial_log, write_config
from guest_images import KEY_GUEST_READY, boot_sector_vm, key_echo_disk
from nats.aio.client import Client
from ports import free_tcp_port, free_udp_ports
from qemu_bmc.up import describe, try_lines
from qemu_bmc_ipmi_lan.service import shard_of
from qemu_bmc_shared.config import load
from qemu_bmc_shared.discovery import IPMI_LAN_SERVICE, listeners, metadata, service_infos
from test_vnc import PASSWORD, banner_rows_vary, vncdo
from waiting import wait_for

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")


def services_cli(nats_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qemu_bmc", "services", "--nats", nats_url, *args],
                          capture_output=True, text=True, timeout=60)


async def vnc_served_by(nc: Client) -> dict[str, str]:
    """``vnc.<machine>`` → the shard of the IPMI over LAN replica that announces it."""
    return {key: metadata(info)["shard"] for info in await service_infos(nc, IPMI_LAN_SERVICE)
            for key in listeners(info) if key.startswith("vnc.")}


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
async def test_another_replica_takes_the_listener_over(nc: Client, services: Any, short_dir: Path, tmp_path: Path,
                                                       stop_signal: int) -> None:
    ipmi_port, vnc_port = free_udp_ports(), free_tcp_port()
    config = write_config(short_dir, f"""
[vm.m1]
{boot_sector_vm(key_echo_disk(short_dir))}ipmi = "127.0.0.1:{ipmi_port}"
vnc = "127.0.0.1:{vnc_port}"
vnc_password = "{PASSWORD}"
""")
    owner, other = f"{shard_of('m1', 2)}/2", f"{3 - shard_of('m1', 2)}/2"
    await services("machine", config)
    replicas = {shard: await services("ipmi-lan", config, "--shard", shard) for shard in ("1/2", "2/2")}
    await wait_for(lambda: KEY_GUEST_READY in serial_log(short_dir, "m1"), timeout=60, message="the guest up")
    await wait_for(lambda: _equal(vnc_served_by(nc), {"vnc.m1": owner}), timeout=30,
                   message="the listener served by the replica of m1's shard")
    png = tmp_path / "before.png"
    status, output = await vncdo(vnc_port, PASSWORD, "capture", str(png))
    assert status == 0, output
    assert banner_rows_vary(png)

    await replicas[owner].stop(stop_signal)
    await wait_for(lambda: _equal(vnc_served_by(nc), {"vnc.m1": other}), timeout=30,
                   message="the listener taken over by the other replica")
    png = tmp_path / "after.png"
    status, output = await vncdo(vnc_port, PASSWORD, "key", "y", "capture", str(png))
    assert status == 0, output
    assert banner_rows_vary(png)
    await wait_for(lambda: serial_log(short_dir, "m1").endswith("y"), timeout=30, message="the key in the guest")

    listed = json.loads(services_cli(nc.connected_url.geturl(), "--json").stdout)
    lan = [info for info in listed if info["name"] == IPMI_LAN_SERVICE]
    assert [info["metadata"]["shard"] for info in lan] == [other]
    assert listeners(lan[0]) == {"ipmi.m1": f"127.0.0.1:{ipmi_port}", "vnc.m1": f"127.0.0.1:{vnc_port}"}
    text = services_cli(nc.connected_url.geturl()).stdout
    assert f"  vnc.m1: 127.0.0.1:{vnc_port}" in text and "NOT SERVED" not in text, text


async def test_a_listener_that_cannot_be_bound_is_an_error(nc: Client, services: Any, short_dir: Path) -> None:
    """Another program holds the VNC address: the replica logs it at ERROR and announces it as
    unserved, naming the holder; `qemu-bmc services` and `up`'s banner say so; once freed it is served."""
    vnc_port = free_tcp_port()
    holder = socket.create_server(("127.0.0.1", vnc_port))
    config = write_config(short_dir, f"""
[vm.m1]
cmd = ["-m", "64"]
vnc = "127.0.0.1:{vnc_port}"
vnc_password = "{PASSWORD}"
""")
    try:
        await services("ipmi-lan", config)

        async def unserved() -> dict[str, str]:
            return {key: value for info in await service_infos(nc, IPMI_LAN_SERVICE)
                    for key, value in metadata(info).items() if key.startswith("unserved.")}

        problem = f"127.0.0.1:{vnc_port}: address in use (held by pid {os.getpid()})"
        await wait_for(lambda: _equal(unserved(), {"unserved.vnc.m1": problem}), timeout=30,
                       message="the listener announced unserved")
        log = (short_dir / "ipmi-lan.log").read_text()
        assert re.search(rf"ERROR .*m1: VNC listener {re.escape(problem)}", log), log
        text = services_cli(nc.connected_url.geturl()).stdout
        assert f"NOT SERVED vnc.m1: {problem}" in text, text
        infos = await service_infos(nc, IPMI_LAN_SERVICE)
        banner = describe(load(config), "nats://127.0.0.1:4222", short_dir, {IPMI_LAN_SERVICE}, infos)
        assert f"    ERROR: VNC listener {problem}" in banner, banner

        holder.close()
        await wait_for(lambda: _equal(unserved(), {}), timeout=30, message="the listener served once freed")
        infos = await service_infos(nc, IPMI_LAN_SERVICE)
        assert {key: value for info in infos for key, value in listeners(info).items()} == {
            "vnc.m1": f"127.0.0.1:{vnc_port}"}
        banner = describe(load(config), "nats://127.0.0.1:4222", short_dir, {IPMI_LAN_SERVICE}, infos)
        assert f"    VNC listener: tcp 127.0.0.1:{vnc_port}" in banner and "ERROR" not in banner, banner
        assert f"  vncviewer 127.0.0.1::{vnc_port}" in try_lines(load(config))
    finally:
        holder.close()


async def _equal(found: Any, expected: Any) -> bool:
    return await found == expected
