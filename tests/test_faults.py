"""Faults around `qemu-bmc up` and the CLI: a launcher killed with SIGKILL, a second launcher, a
service that keeps crashing, addresses another program holds, a bus that is not there."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from clients import ipmitool
from conftest import toml_list, wait_for, write_config
from guest_images import GuestImages
from ports import free_tcp_port, free_udp_ports
from processes import processes_with
from qemu_bmc.natsserver import binary
from test_up import QEMU_BMC, cli, start_up

USER, PASSWORD = "admin", "password"


def up_log_lines(log: Path, pattern: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if re.search(pattern, line)]


def tracebacks(directory: Path) -> list[str]:
    """The log files under ``directory`` with a Python traceback in them."""
    return [str(path) for path in directory.rglob("*.log") if "Traceback" in path.read_text(errors="replace")]


def attach_config(directory: Path, ipmi_port: int | None, redfish_port: int) -> Path:
    """A machine the machine service attaches to (no QEMU runs: its QMP socket is not there)."""
    ipmi = f'ipmi = "127.0.0.1:{ipmi_port}"\n' if ipmi_port else ""
    return write_config(directory, f'[redfish]\nlisten = "127.0.0.1:{redfish_port}"\ntls = false\n'
                                   f'[vm.n1]\nqmp = "{directory / "absent.sock"}"\n{ipmi}')


async def test_cli_without_bus_says_so_in_one_line_and_exits_2(short_dir: Path):
    config = attach_config(short_dir, None, free_tcp_port())
    closed = f"nats://secret-token@127.0.0.1:{free_tcp_port()}"
    expected = (f"qemu-bmc: cannot reach NATS at nats://127.0.0.1:{closed.rsplit(':', 1)[1]}: connection refused; "
                f"is qemu-bmc up running? (qemu-bmc up -c {config})")
    for command in (["power", "status", "n1"], ["services"], ["boot", "n1"], ["media", "status", "n1"]):
        result = subprocess.run([*QEMU_BMC, *command, "-c", str(config), "--nats", closed, "--timeout", "2"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result
        assert result.stderr.splitlines() == [expected]
        assert "secret-token" not in result.stdout + result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_cli_ends_on_ctrl_c_and_sigterm_while_waiting_for_the_bus(short_dir: Path, sig: int):
    """A server that takes the connection and never speaks NATS: the CLI waits for it (its
    timeout is long), and a signal ends it at once, without a traceback."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = attach_config(short_dir, None, free_tcp_port())
    process = await asyncio.create_subprocess_exec(
        *QEMU_BMC, "power", "status", "n1", "-c", str(config), "--nats", f"nats://127.0.0.1:{port}",
        "--timeout", "600", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(connected.wait(), 60)
        process.send_signal(sig)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
        server.close()
    assert process.returncode == 130
    assert b"Traceback" not in stderr


async def test_taken_addresses_are_errors_in_banner_log_and_services(short_dir: Path):
    ipmi_port, redfish_port = free_udp_ports(), free_tcp_port()
    ipmi_holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ipmi_holder.bind(("127.0.0.1", ipmi_port))
    redfish_holder = socket.create_server(("127.0.0.1", redfish_port))
    config = attach_config(short_dir, ipmi_port, redfish_port)
    c = ["-c", str(config)]
    log = short_dir / "up.log"
    output = log.open("wb")
    up = await asyncio.create_subprocess_exec(*QEMU_BMC, "up", *c, stdout=output, stderr=output,
                                              start_new_session=True)  # its own process group, as a shell makes
    logs = short_dir / "rt" / "logs"
    try:
        await wait_for(lambda: "Ctrl-C stops everything" in log.read_text(), timeout=90, message="the banner")
        me = os.getpid()
        banner = log.read_text()
        assert f"ERROR: IPMI over LAN 127.0.0.1:{ipmi_port}: address in use (held by pid {me})" in banner
        assert f"ERROR: Redfish 127.0.0.1:{redfish_port}: address in use (held by pid {me})" in banner
        assert re.search(rf"ERROR .*127\.0\.0\.1:{ipmi_port}: address in use", (logs / "ipmi-lan.log").read_text())
        assert re.search(rf"ERROR .*127\.0\.0\.1:{redfish_port}: address in use", (logs / "redfish.log").read_text())

        def unserved() -> dict[str, str]:
            infos = json.loads(cli("services", "--json", *c).stdout or "[]")
            return {key: value for info in infos for key, value in info.get("metadata", {}).items()
                    if key.startswith("unserved.")}

        assert unserved() == {
            "unserved.ipmi.n1": f"127.0.0.1:{ipmi_port}: address in use (held by pid {me})",
            "unserved.redfish": f"127.0.0.1:{redfish_port}: address in use (held by pid {me})"}
        text = cli("services", *c).stdout
        assert f"NOT SERVED ipmi.n1: 127.0.0.1:{ipmi_port}: address in use" in text

        # freed, the addresses are served: no longer listed, and the endpoints answer
        ipmi_holder.close()
        redfish_holder.close()
        await wait_for(lambda: not unserved(), timeout=30, message="both addresses served")
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{redfish_port}/redfish/v1/")).status_code == 200
        assert (await ipmitool(ipmi_port, "mc", "info", user=USER, password=PASSWORD))[0] == 0
    finally:
        ipmi_holder.close()
        redfish_holder.close()
        # stopped as a terminal's Ctrl-C or `kill -TERM -PGID` does: the whole process group
        os.killpg(up.pid, signal.SIGTERM)
        code = await asyncio.wait_for(up.wait(), 90)
    assert code == 0, log.read_text()
    stopped = up_log_lines(log, r"stopped ")
    assert [line.split("stopped ", 1)[1] for line in stopped] == ["redfish, ipmi-lan", "machine", "state",
                                                                  "nats-server"], log.read_text()
    assert tracebacks(short_dir) == []
    assert processes_with(str(config)) == [] and processes_with(str(short_dir / "rt" / "nats")) == []


async def test_killed_launcher_leaves_no_orphan_and_the_next_adopts_the_vm(short_dir: Path, images: GuestImages):
    ipmi_port, redfish_port = free_udp_ports(), free_tcp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{redfish_port}"\ntls = false\n'
                                     f'[vm.n1]\nipmi = "127.0.0.1:{ipmi_port}"\n'
                                     f'cmd = {toml_list(images.qemu_args(nic=False))}\n')
    c = ["-c", str(config)]
    runtime = short_dir / "rt"
    first = await start_up(*c, env={}, log=short_dir / "up1.log")
    second = None
    try:
        on = json.loads(cli("power", "on", "n1", "--json", *c).stdout)
        assert on["state"] == "On" and on["pid"]
        qemu = on["pid"]

        # a second launcher on the same runtime directory is refused, naming the first
        refused = cli("up", *c)
        assert refused.returncode != 0
        assert refused.stderr.splitlines() == [f"qemu-bmc: qemu-bmc up already runs on {runtime} (pid {first.pid})"]

        services = processes_with("qemu_bmc_", str(config))
        nats_servers = processes_with(str(runtime / "nats"))
        assert len(services) == 4 and len(nats_servers) == 1
        first.kill()
        await first.wait()
        await wait_for(lambda: not processes_with("qemu_bmc_", str(config))
                       and not processes_with(str(runtime / "nats")),
                       timeout=30, message="the launcher's children gone with it")
        assert qemu in processes_with(str(runtime / "vm" / "n1" / "qmp.sock")), "the VM kept running"

        second = await start_up(*c, env={}, log=short_dir / "up2.log")
        assert len(processes_with(str(runtime / "nats"))) == 1
        assert processes_with(str(runtime / "vm" / "n1" / "qmp.sock")) == [qemu]
        status = await wait_for(lambda: json.loads(cli("power", "status", "n1", "--json", *c).stdout or "{}"),
                                timeout=30, message="power status")
        assert status["state"] == "On" and status["pid"] == qemu
        async with httpx.AsyncClient(auth=(USER, PASSWORD)) as client:
            async def system() -> dict | None:
                reply = await client.get(f"http://127.0.0.1:{redfish_port}/redfish/v1/Systems/n1")
                return reply.json() if reply.status_code == 200 else None

            assert (await wait_for(system, timeout=30, message="Redfish serving the system"))["PowerState"] == "On"
        code, text = await ipmitool(ipmi_port, "chassis", "power", "status", user=USER, password=PASSWORD)
        assert code == 0 and "Chassis Power is on" in text
        assert processes_with(str(runtime / "vm" / "n1" / "qmp.sock")) == [qemu], "no second QEMU"
    finally:
        for launcher in (first, second):
            if launcher is not None and launcher.returncode is None:
                launcher.send_signal(signal.SIGINT)
                await asyncio.wait_for(launcher.wait(), 90)
        for pid in processes_with(str(runtime)):  # whatever a failure left behind
            os.kill(pid, signal.SIGKILL)
    assert second is not None and second.returncode == 0
    assert tracebacks(runtime / "logs") == [], [Path(log).read_text()[-3000:] for log in tracebacks(runtime / "logs")]


def stat_start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def ran_for(pid: int) -> float:
    """Seconds the process has been running (from /proc: its start time in clock ticks since boot)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - stat_start_ticks(pid) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(400)
async def test_restart_back_off_starts_again_after_a_minute_of_running(short_dir: Path):
    config = attach_config(short_dir, None, free_tcp_port())
    log = short_dir / "up.log"
    up = await start_up("-c", str(config), env={}, log=log)

    def state_pid() -> int | None:
        pids = processes_with("qemu_bmc_state", str(config))
        return pids[0] if len(pids) == 1 else None

    try:
        for kill in range(1, 8):
            pid = await wait_for(state_pid, timeout=60, message="the state service running")
            if kill == 7:  # it has run for a minute since the sixth restart
                await wait_for(lambda pid=pid: ran_for(pid) > 61, timeout=120, interval=0.5,
                               message="a minute of running")
            os.kill(pid, signal.SIGKILL)
            await wait_for(lambda kill=kill: len(up_log_lines(log, r"state exited")) == kill, timeout=30,
                           message=f"the launcher seeing exit {kill}")
            await wait_for(lambda pid=pid: state_pid() not in (None, pid), timeout=60, message="restarted")
    finally:
        up.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(up.wait(), 90)
    delays = [float(re.search(r"restarting in ([\d.]+) s", line)[1])  # type: ignore[index]
              for line in up_log_lines(log, r"state exited")]
    assert delays == [0.5, 1, 2, 5, 10, 10, 0.5]
    assert code == 0


async def test_a_dead_launcher_s_nats_server_is_stopped_before_a_new_one_starts(short_dir: Path):
    """A nats-server left on the runtime directory's store (by a launcher from before children
    died with it) is stopped: two servers on one JetStream store would split the bus."""
    config = attach_config(short_dir, None, free_tcp_port())
    runtime = short_dir / "rt"
    store = runtime / "nats" / "jetstream"
    store.mkdir(parents=True)
    stray = subprocess.Popen([binary(), "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(store)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        await wait_for(lambda: stray.pid in processes_with(str(store)), timeout=10, message="the stray server")
        up = await start_up("-c", str(config), env={}, log=short_dir / "up.log")
        try:
            assert stray.poll() is not None
            assert len(processes_with(str(store))) == 1
            assert "from an earlier qemu-bmc up still runs" in (short_dir / "up.log").read_text()
        finally:
            up.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(up.wait(), 90) == 0
    finally:
        if stray.poll() is None:
            stray.kill()
        stray.wait()

