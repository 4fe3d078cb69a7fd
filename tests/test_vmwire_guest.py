"""In-band IPMI proven by a real guest: a Linux kernel with the IPMI KCS driver, ipmitool and
FreeIPMI, under QEMU's ipmi-bmc-extern device wired to the VM-wire service, running what MAAS's
commissioning runs; then the user it made logs in over LAN, also after every service and the
NATS server restarted."""

from __future__ import annotations

import re
import secrets
import string
from pathlib import Path

import clients
import httpx
from conftest import free_tcp_port, free_udp_port, serial_log, toml_list, wait_for, write_config
from linux_guest import DONE, READY, LinuxGuest
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PowerRequest, PowerStatus

USER, PASSWORD = "admin", "s3cret-Pass"
MAAS_KEYS = ("User3:Username=maas", "User3:Password={password}", "User3:Enable_User=Yes",
             "User3:Lan_Privilege_Limit=Administrator", "User3:Lan_Enable_IPMI_Msgs=Yes",
             "Lan_Channel:Volatile_Access_Mode=Always_Available",
             "Lan_Channel:Non_Volatile_Access_Mode=Always_Available", "Lan_Conf:IP_Address_Source=Static")

COMMISSIONING = """\
echo "== mc info"; ipmitool mc info
echo "== lan print"; ipmitool lan print 1
echo "== user list"; ipmitool user list 1
bmc-config --checkout > /tmp/before.txt 2>&1; echo "first checkout rc=$? sections=$(grep -c '^Section' /tmp/before.txt)"
bmc-config --commit {pairs}; echo "commit rc=$?"
echo "== checkout after"
bmc-config --checkout -S User3; bmc-config --checkout -S Lan_Channel; bmc-config --checkout -S Lan_Conf
"""


async def start_machine(services, directory: Path, guest: LinuxGuest, script: str,
                        redfish: int | None = None) -> tuple[dict, int]:
    lan, wire = free_udp_port(), free_tcp_port()
    argv = guest.qemu_args(guest.initrd(script, directory))
    config = write_config(directory, (f'[redfish]\nlisten = "127.0.0.1:{redfish}"\n' if redfish else "")
                          + f'[vm.n1]\ncmd = {toml_list(argv)}\nipmi = "127.0.0.1:{lan}"\n'
                          f'vmwire = "127.0.0.1:{wire}"\n')
    started = {"state": await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD}),
               "vmwire": await services("vmwire", config)}
    started["machine"] = await services("machine", config, "--stop-vms-on-exit")
    started["ipmi-lan"] = await services("ipmi-lan", config)
    if redfish:
        started["redfish"] = await services("redfish", config)
    return started, lan


async def ipmitool(port: int, user: str, password: str, *args: str) -> tuple[int, str]:
    return await clients.ipmitool(port, *args, user=user, password=password)


def value(output: str, key: str) -> str | None:
    found = re.search(rf"^\s*{key}\s+(\S.*?)\s*$", output, re.MULTILINE)
    return found.group(1) if found else None


async def test_maas_commissioning_in_band(nc, nats_server, services, short_dir: Path, linux_guest: LinuxGuest):
    password = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(12))
    pairs = " ".join(f"--key-pair={pair.format(password=password)}" for pair in MAAS_KEYS)
    redfish = free_tcp_port()
    started, lan = await start_machine(services, short_dir, linux_guest, COMMISSIONING.format(pairs=pairs),
                                       redfish=redfish)
    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
    await wait_for(lambda: DONE in serial_log(short_dir, "n1"), timeout=240, interval=0.5,
                   message="the guest's commissioning script")
    out = serial_log(short_dir, "n1")
    assert READY in out and f"{DONE} rc=0" in out, out
    assert "IPMI Version              : 2.0" in out, out
    assert "IP Address              : 127.0.0.1" in out, out  # the LAN endpoint's address, reachable
    assert re.search(r"MAC Address\s+: 02:", out), out
    assert re.search(rf"^2\s+{USER}\s", out, re.MULTILINE), out  # ipmitool user list
    assert re.search(r"first checkout rc=[01] sections=(\d\d)", out), out
    assert "commit rc=0" in out, out
    after = out.split("== checkout after", 1)[1]
    for key, expected in (("Username", "maas"), ("Enable_User", "Yes"), ("Lan_Privilege_Limit", "Administrator"),
                          ("Lan_Enable_IPMI_Msgs", "Yes"), ("Volatile_Access_Mode", "Always_Available"),
                          ("Non_Volatile_Access_Mode", "Always_Available"), ("IP_Address_Source", "Static")):
        assert value(after, key) == expected, (key, after)

    # MAAS now drives the machine out-of-band with the user it made
    await wait_for(lambda: _state(nc, "Off"), timeout=30, message="the guest powered off")
    code, output = await ipmitool(lan, "maas", password, "power", "status")
    assert code == 0 and "Chassis Power is off" in output, output
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{redfish}", auth=("maas", password),
                                 verify=False) as client:  # and over Redfish, as an Administrator
        response = await client.get("/redfish/v1/Systems/n1")
        assert response.status_code == 200 and response.json()["PowerState"] == "Off", response.text
        account = (await client.get("/redfish/v1/AccountService/Accounts/maas")).json()
        assert account["RoleId"] == "Administrator", account

    # nothing is lost: every service and the NATS server restart, and maas still logs in
    for service in reversed(started.values()):
        await service.stop()
    await nats_server.stop()
    await nats_server.start()
    for name in ("state", "vmwire", "machine", "ipmi-lan", "redfish"):
        await started[name].start(nc, f"qemu-bmc-{name}")
    code, output = await ipmitool(lan, "maas", password, "power", "status")
    assert code == 0 and "Chassis Power is off" in output, output
    assert (await ipmitool(lan, "maas", "wrong-" + password, "power", "status"))[0] != 0


async def _state(nc, state: str) -> bool:
    return (await bus.request(nc, "n1", subjects.POWER_GET, None, PowerStatus)).state == state


# Each boot reads and bumps a counter the BMC keeps (boot option parameter 1, a byte nobody else
# uses here), then controls the chassis from inside: reset, then power cycle, then NMI and power off.
CHASSIS_CONTROL = """\
count=$(ipmitool raw 0x00 0x09 0x01 0x00 0x00 | awk '{print $3}')
echo "BOOT-COUNT $count"
case "$count" in
00) ipmitool raw 0x00 0x08 0x01 0x01; echo CONTROL-RESET; ipmitool chassis power reset ;;
01) ipmitool raw 0x00 0x08 0x01 0x02; echo CONTROL-CYCLE; ipmitool chassis power cycle ;;
*) echo CONTROL-DIAG; ipmitool chassis power diag; sleep 2; echo CONTROL-OFF; ipmitool chassis power off ;;
esac
sleep 30
"""


async def test_chassis_control_from_inside(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    await start_machine(services, short_dir, linux_guest, CHASSIS_CONTROL)
    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
    await wait_for(lambda: "CONTROL-OFF" in serial_log(short_dir, "n1"), timeout=240, interval=0.5,
                   message="three boots controlled from inside")
    await wait_for(lambda: _state(nc, "Off"), timeout=30, message="the machine off")
    out = serial_log(short_dir, "n1")
    assert [line.split()[1] for line in out.splitlines() if line.startswith("BOOT-COUNT")] == ["00", "01", "02"], out
    assert "NMI" in out.split("CONTROL-DIAG", 1)[1], out  # the guest kernel saw the diagnostic interrupt
    assert "GUEST-DONE" not in out  # every boot ended by the BMC, not by the script
