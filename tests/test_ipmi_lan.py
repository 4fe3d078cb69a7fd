"""IPMI over LAN with real clients (ipmitool, FreeIPMI, pyghmi) against real QEMU machines."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import clients
import pytest
from conftest import free_udp_port, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc_ipmi_lan import framing
from qemu_bmc_ipmi_lan.client import IpmiClientError, RmcpPlusClient
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import (
    BootOverride,
    ChannelAccess,
    ChannelAccessUpdate,
    Inventory,
    PasswordSet,
    PowerStatus,
    User,
    UserAccessUpdate,
    UserUpdate,
)

USER, PASSWORD = "admin", "s3cret-Pass"


class Bmc:
    def __init__(self, nc, directory: Path, port: int) -> None:
        self.nc, self.directory, self.port = nc, directory, port

    async def ipmitool(self, *args: str, interface: tuple[str, ...] = ("-I", "lanplus", "-C", "3"),
                       user: str = USER, password: str = PASSWORD) -> tuple[int, str]:
        return await clients.ipmitool(self.port, *args, user=user, password=password, interface=interface,
                                      timeout=2, retries=2)

    async def freeipmi(self, tool: str, *args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            tool, "-h", f"127.0.0.1:{self.port}", "-u", USER, "-p", PASSWORD, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        return process.returncode or 0, output.decode(errors="replace")

    async def power_state(self) -> str:
        return (await bus.request(self.nc, "n1", subjects.POWER_GET, None, PowerStatus)).state

    def serial(self) -> str:
        return serial_log(self.directory, "n1")


async def start_bmc(nc, services, directory: Path, images: GuestImages, nic: bool = False, uefi: bool = False) -> Bmc:
    port = free_udp_port()
    config = write_config(directory, '[ipmi]\nauth_types = ["MD5", "straight"]\ncipher_suites = [1, 2, 3, 15, 16, 17]\n'
                                     '[state]\nlockout_threshold = 3\nlockout_duration = 5\n'
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=nic, uefi=uefi))}\n'
                                     f'ipmi = "127.0.0.1:{port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("ipmi-lan", config)
    return Bmc(nc, directory, port)


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages) -> Bmc:
    return await start_bmc(nc, services, short_dir, images)


INTERFACES = {"lanplus-C3": ("-I", "lanplus", "-C", "3"), "lanplus-C17": ("-I", "lanplus", "-C", "17"),
              "lan-MD5": ("-I", "lan", "-A", "MD5"), "lan-PASSWORD": ("-I", "lan", "-A", "PASSWORD")}


@pytest.mark.parametrize("lanplus", INTERFACES.values(), ids=INTERFACES.keys())
async def test_ipmitool_power_control(bmc: Bmc, lanplus: tuple[str, ...]):
    code, out = await bmc.ipmitool("mc", "info", interface=lanplus)
    assert code == 0 and "IPMI Version              : 2.0" in out, out
    code, out = await bmc.ipmitool("power", "status", interface=lanplus)
    assert code == 0 and "Chassis Power is off" in out, out
    code, out = await bmc.ipmitool("power", "on", interface=lanplus)
    assert code == 0, out
    await wait_for(lambda: "MARKER-HDD" in bmc.serial(), message="the guest booting")
    assert "Chassis Power is on" in (await bmc.ipmitool("power", "status", interface=lanplus))[1]
    assert (await bmc.ipmitool("power", "reset", interface=lanplus))[0] == 0
    await wait_for(lambda: bmc.serial().count("MARKER-HDD") == 2, message="reset")
    assert (await bmc.ipmitool("power", "diag", interface=lanplus))[0] == 0
    await wait_for(lambda: "NMI" in bmc.serial(), message="NMI")
    assert (await bmc.ipmitool("power", "cycle", interface=lanplus))[0] == 0
    await wait_for(lambda: bmc.serial().count("MARKER-HDD") == 3, message="cycle")
    assert (await bmc.ipmitool("power", "soft", interface=lanplus))[0] == 0
    await wait_for(lambda: "POWER-BUTTON" in bmc.serial(), message="soft off reaching the guest")
    await wait_for(lambda: _is(bmc, "Off"), message="Off after the guest shut down")
    code, out = await bmc.ipmitool("chassis", "status", interface=lanplus)
    assert code == 0 and "System Power         : off" in out, out
    assert (await bmc.ipmitool("power", "on", interface=lanplus))[0] == 0
    assert (await bmc.ipmitool("power", "off", interface=lanplus))[0] == 0
    assert await bmc.power_state() == "Off"


async def _is(bmc: Bmc, state: str) -> bool:
    return await bmc.power_state() == state


@pytest.mark.parametrize("auth", ["MD5", "PASSWORD"])
async def test_ipmi_1_5_wrong_password(bmc: Bmc, auth: str):
    lan = ("-I", "lan", "-A", auth)
    assert (await bmc.ipmitool("power", "status", interface=lan, password="wrong"))[0] != 0
    assert (await bmc.ipmitool("power", "status", interface=lan))[0] == 0


async def test_freeipmi_as_maas_runs_it(bmc: Bmc):
    for workaround in ((), ("-W", "opensesspriv")):
        common = ("-D", "LAN_2_0", "-I", "3", "-l", "OPERATOR", *workaround)
        code, out = await bmc.freeipmi("ipmipower", *common, "--stat")
        assert code == 0 and "off" in out, out
        code, out = await bmc.freeipmi("ipmipower", *common, "--cycle", "--on-if-off")
        assert code == 0 and "ok" in out, out
        await wait_for(lambda: _is(bmc, "On"), message="on after --cycle --on-if-off")
        code, out = await bmc.freeipmi("ipmipower", *common, "--cycle", "--on-if-off")  # running: a real cycle
        assert code == 0 and "ok" in out, out
        code, out = await bmc.freeipmi("ipmipower", *common, "--off")
        assert code == 0, out
        assert await bmc.power_state() == "Off"
    common = ("-D", "LAN_2_0", "-I", "3", "-l", "OPERATOR", "-W", "opensesspriv")
    boots = bmc.serial().count("MARKER-HDD")  # the earlier boots' markers are in the log too
    code, out = await bmc.freeipmi("ipmipower", *common, "--on")
    assert code == 0 and "ok" in out, out
    await wait_for(lambda: bmc.serial().count("MARKER-HDD") > boots, message="the guest booting")
    code, out = await bmc.freeipmi("ipmipower", *common, "--soft")
    assert code == 0 and "ok" in out, out
    await wait_for(lambda: _is(bmc, "Off"), message="Off after the guest shut down")
    code, out = await bmc.freeipmi("ipmipower", "-D", "LAN_2_0", "-I", "17", "-l", "OPERATOR", "--on")
    assert code == 0 and "ok" in out, out
    assert await bmc.power_state() == "On"
    code, out = await bmc.freeipmi("ipmipower", "-D", "LAN", "-a", "MD5", "-l", "OPERATOR", "--stat")
    assert code == 0 and "on" in out, out


async def test_a_retried_request_joins_the_one_under_way(bmc: Bmc):
    """ipmipower resends a request unanswered after its retransmission time-out (here 50 ms,
    far shorter than a power cycle) with new sequence numbers: the retries wait for the cycle
    under way instead of starting another one (which found the machine off half-way and answered
    0xD5), and the console gets its "ok"."""
    assert (await bmc.freeipmi("ipmipower", "-D", "LAN_2_0", "-I", "3", "--on"))[0] == 0
    await wait_for(lambda: "MARKER-HDD" in bmc.serial(), message="the guest booting")
    code, out = await bmc.freeipmi("ipmipower", "-D", "LAN_2_0", "-I", "3", "--cycle", "--debug",
                                   "--retransmission-timeout", "50")
    lines = out.splitlines()
    assert code == 0 and any(line.endswith(": ok") for line in lines), out[-4000:]
    assert any("Sending retry" in line for line in lines) and not any("comp_code failed" in line for line in lines)
    await wait_for(lambda: bmc.serial().count("MARKER-HDD") >= 2, message="the guest booting again")
    assert await bmc.power_state() == "On"

async def test_pyghmi_command(bmc: Bmc):
    from pyghmi.ipmi import command

    def drive() -> tuple[dict, dict, dict, dict]:
        session = command.Command(bmc="127.0.0.1", userid=USER, password=PASSWORD, port=bmc.port)
        before = session.get_power()
        session.set_power("on", wait=True)
        after = session.get_power()
        session.set_bootdev("network", persist=True, uefiboot=True)
        return before, after, session.get_bootdev(), session.raw_command(netfn=6, command=1)

    before, after, bootdev, device_id = await asyncio.to_thread(drive)
    assert before["powerstate"] == "off" and after["powerstate"] == "on" and device_id["code"] == 0
    assert bootdev["bootdev"] == "network" and bootdev["persistent"] and bootdev["uefimode"], bootdev
    override = await bus.request(bmc.nc, "n1", subjects.BOOT_GET, None, BootOverride)
    assert (override.target, override.enabled) == ("Pxe", "Continuous")


@pytest.mark.parametrize("interface", INTERFACES.values(), ids=INTERFACES.keys())
async def test_ipmitool_management_commands(bmc: Bmc, interface: tuple[str, ...]):
    async def ok(*args: str, **kwargs: str) -> str:
        code, out = await bmc.ipmitool(*args, interface=interface, **kwargs)
        assert code == 0, f"ipmitool {' '.join(args)}: {out}"
        return out

    assert "IPMI Version              : 2.0" in await ok("mc", "info")
    assert "System Power         : off" in await ok("chassis", "status")

    await ok("chassis", "bootdev", "pxe", "options=efiboot,persistent")
    out = await ok("chassis", "bootparam", "get", "5")
    assert "Options apply to all future boots" in out and "BIOS EFI boot" in out and "Force PXE" in out, out
    override = await bus.request(bmc.nc, "n1", subjects.BOOT_GET, None, BootOverride)
    assert (override.target, override.enabled) == ("Pxe", "Continuous")
    await ok("raw", "0x00", "0x08", "0x03", "0x08")
    await ok("raw", "0x00", "0x08", "0x05", "0xe0", "0x08", "0x00", "0x00", "0x00")  # Ironic: disk, persistent, EFI
    assert (await ok("raw", "0x00", "0x09", "0x05", "0x00", "0x00")).split() == "01 05 e0 08 00 00 00".split()
    assert (await ok("raw", "0x00", "0x09", "0x03", "0x00", "0x00")).split() == "01 03 08".split()
    override = await bus.request(bmc.nc, "n1", subjects.BOOT_GET, None, BootOverride)
    assert (override.target, override.enabled) == ("Hdd", "Continuous")

    # a user made over IPMI logs in at once
    await ok("user", "set", "name", "5", "maas")
    # IPMI 1.5 has only 16-byte passwords; RMCP+ has both forms
    password, form = ("Maas-pass-16byte", "16") if "lan" in interface else ("Maas-pass-20-bytes-x", "20")
    await ok("user", "set", "password", "5", password, form)
    await ok("user", "priv", "5", "4", "1")
    await ok("user", "enable", "5")
    await ok("channel", "setaccess", "1", "5", "callin=on", "ipmi=on", "link=on", "privilege=4")
    assert (await bmc.ipmitool("user", "test", "5", form, "wrong-password", interface=interface))[0] != 0
    await ok("user", "test", "5", form, password)
    out = await ok("user", "list", "1")
    assert any(line.split()[:2] == ["5", "maas"] and "ADMINISTRATOR" in line for line in out.splitlines()), out
    assert "Device ID" in await ok("mc", "info", user="maas", password=password)

    out = await ok("lan", "print", "1")
    assert "IP Address              : 127.0.0.1" in out and "MAC Address             : 02:" in out, out
    out = await ok("channel", "getciphers", "ipmi", "1")
    suites = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
    assert suites == ["1", "2", "3", "15", "16", "17"], out
    inventory = await bus.request(bmc.nc, "n1", subjects.INVENTORY_GET, None, Inventory)
    out = await ok("fru")
    assert "QEMU" in out and inventory.uuid in out, out
    assert "System Power" in await ok("sdr")
    await ok("power", "on")
    await wait_for(lambda: _is(bmc, "On"), message="power on")

    async def power_on_logged() -> bool:  # as the power unit leaving "power off"
        return any("Power Unit" in line and "Deasserted" in line for line in (await ok("sel", "list")).splitlines())

    await wait_for(power_on_logged, message="power on in the SEL")


async def test_ironic_boot_device_really_boots(nc, services, short_dir: Path, images: GuestImages):
    """Ironic's raw Set System Boot Options for a UEFI node (PXE, persistent, EFI bit) then power
    on: the machine really boots from the network in UEFI mode, on the next boot too."""
    bmc = await start_bmc(nc, services, short_dir, images, nic=True, uefi=True)
    assert (await bmc.ipmitool("raw", "0x00", "0x08", "0x05", "0xe0", "0x04", "0x00", "0x00", "0x00"))[0] == 0
    assert (await bmc.ipmitool("power", "on"))[0] == 0
    await wait_for(lambda: "MARKER-PXE" in bmc.serial(), timeout=90, message="a network boot")
    assert (await bmc.ipmitool("power", "reset"))[0] == 0
    await wait_for(lambda: bmc.serial().count("MARKER-PXE") == 2, timeout=90, message="a second network boot")
    assert "MARKER-HDD" not in bmc.serial()
    _, out = await bmc.ipmitool("raw", "0x00", "0x09", "0x05", "0x00", "0x00")
    assert out.split() == "01 05 e0 04 00 00 00".split(), out


async def test_freeipmi_configuration_tools(bmc: Bmc):
    """What MAAS runs: ipmi-chassis-config commits boot flags and reads them back intact;
    bmc-config checks out the whole configuration; ipmi-chassis reads the status."""
    common = ("-D", "LAN_2_0", "-I", "3", "-l", "ADMIN")
    code, out = await bmc.freeipmi("ipmi-chassis-config", *common, "--commit",
                                   "-e", "Chassis_Boot_Flags:Boot_Flags_Persistent=No",
                                   "-e", "Chassis_Boot_Flags:BIOS_Boot_Type=EFI",
                                   "-e", "Chassis_Boot_Flags:Boot_Device=PXE")
    assert code == 0, out
    code, out = await bmc.freeipmi("ipmi-chassis-config", *common, "--checkout", "-S", "Chassis_Boot_Flags")
    assert code == 0, out
    for key, value in (("Boot_Flags_Persistent", "No"), ("BIOS_Boot_Type", "EFI"), ("Boot_Device", "PXE")):
        assert re.search(rf"^\s*{key}\s+{value}\s*$", out, re.MULTILINE), out
    override = await bus.request(bmc.nc, "n1", subjects.BOOT_GET, None, BootOverride)
    assert (override.target, override.enabled) == ("Pxe", "Once")

    # bmc-config exits 1 when any key is not supported; here only what this BMC does not have: a
    # serial channel, cipher suites it does not offer, IPv6 (it advertises IPv4 only)
    code, out = await bmc.freeipmi("bmc-config", *common, "--checkout", "--verbose", "--verbose")
    assert code in (0, 1) and "ERROR" not in out, out
    unavailable = re.findall(r"## Unable to checkout (\S+)", out)
    expected = re.compile(r"User\d+:Serial_.*|Serial_(Channel|Conf):.*|Lan6_Conf:IPv6_Static_Router_.*"
                          r"|Rmcpplus_Conf_Privilege:Maximum_Privilege_Cipher_Suite_Id_([04-9]|1[0-4])")
    assert unavailable and [key for key in unavailable if not expected.fullmatch(key)] == [], unavailable
    for key, value in (("Username", USER), ("IP_Address", r"127\.0\.0\.1"), ("Lan_Privilege_Limit", "Administrator"),
                       ("Volatile_Access_Mode", "Always_Available"), ("Bad_Password_Threshold", "3"),
                       ("Maximum_Privilege_Cipher_Suite_Id_3", "Administrator"), ("Enable_SOL", "Yes")):
        assert re.search(rf"^\s*{key}\s+{value}\s*$", out, re.MULTILINE), (key, out)
    for cipher in ("3", "17"):
        code, out = await bmc.freeipmi("ipmi-chassis", "-D", "LAN_2_0", "-I", cipher, "--get-chassis-status")
        assert code == 0 and re.search(r"System Power\s+: off", out), out


async def test_refusals_and_the_next_good_client(bmc: Bmc):
    assert (await bmc.ipmitool("power", "status", password="wrong"))[0] != 0
    assert (await bmc.ipmitool("power", "status", user="nobody"))[0] != 0
    assert (await bmc.ipmitool("power", "status", interface=("-I", "lanplus", "-C", "0")))[0] != 0
    code, out = await bmc.ipmitool("power", "status")
    assert code == 0 and "off" in out, out

    # a User-privilege user can read the power state but not change it
    await bus.request(bmc.nc, "n1", subjects.USERS_SET, UserUpdate(slot=4, name="viewer", enabled=True), User)
    await bus.request(bmc.nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=4, password="view-only-1"), User)
    await bus.request(bmc.nc, "n1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=4, channel=1, privilege=2, ipmi_messaging=True), User)
    viewer = {"user": "viewer", "password": "view-only-1"}
    code, out = await bmc.ipmitool("-L", "USER", "power", "status", **viewer)
    assert code == 0 and "off" in out, out
    code, out = await bmc.ipmitool("-L", "USER", "power", "on", **viewer)
    assert code != 0 and "insufficient privilege" in out.lower(), out
    code, out = await bmc.ipmitool("-L", "USER", "power", "off", **viewer)
    assert code != 0 and "insufficient privilege" in out.lower(), out
    assert (await bmc.ipmitool("-L", "ADMINISTRATOR", "power", "on", **viewer))[0] != 0
    assert await bmc.power_state() == "Off"

    # lockout: after 3 failures the right password is refused for a while (5 s here), then accepted.
    # ipmitool gives up after RAKP 2 when the password is wrong: the BMC counts a handshake given
    # up for a second as a failure.
    for _ in range(3):
        await bmc.ipmitool("-L", "USER", "power", "status", **{**viewer, "password": "bad"})
    await asyncio.sleep(1.5)
    assert (await bmc.ipmitool("-L", "USER", "power", "status", **viewer))[0] != 0
    await asyncio.sleep(5)
    assert (await bmc.ipmitool("-L", "USER", "power", "status", **viewer))[0] == 0


async def test_tampered_and_replayed_packets_are_dropped(bmc: Bmc):
    """What real clients never send, from the service's own small RMCP+ client (cipher suite 3)."""
    async with RmcpPlusClient("127.0.0.1", bmc.port, USER, PASSWORD, timeout=1.0) as client:
        await client.open()
        good = client.request_packet(0x00, 0x01)  # Get Chassis Status
        assert client.response_of(await client.exchange(good))[0] == 0
        assert await client.exchange(good) is None  # the same packet again: a replay
        tampered = bytearray(client.request_packet(0x00, 0x01))
        tampered[-1] ^= 0x01  # flip a bit of the integrity code
        assert await client.exchange(bytes(tampered)) is None
        payload_flip = bytearray(client.request_packet(0x00, 0x01))
        payload_flip[20] ^= 0x80  # flip a bit of the encrypted payload
        assert await client.exchange(bytes(payload_flip)) is None
        assert (await client.request(0x00, 0x01))[0] == 0  # still served
        await client.close()


async def test_state_changes_apply_at_once(bmc: Bmc):
    """The LAN service keeps what logins read from the state service only until the state service
    announces a change: a new password, a disabled user, a lower channel limit apply to the next login."""
    assert (await bmc.ipmitool("power", "status"))[0] == 0
    await bus.request(bmc.nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=2, password="n3w-Pass"), User)
    assert (await bmc.ipmitool("power", "status", password="n3w-Pass"))[0] == 0
    assert (await bmc.ipmitool("power", "status"))[0] != 0
    await bus.request(bmc.nc, "n1", subjects.CHANNEL_SET, ChannelAccessUpdate(channel=1, privilege_limit=2),
                      ChannelAccess)
    code, out = await bmc.ipmitool("power", "status", password="n3w-Pass")  # asks for Administrator
    assert code != 0, out
    assert (await bmc.ipmitool("-L", "USER", "power", "status", password="n3w-Pass"))[0] == 0
    await bus.request(bmc.nc, "n1", subjects.USERS_SET, UserUpdate(slot=2, enabled=False), User)
    assert (await bmc.ipmitool("-L", "USER", "power", "status", password="n3w-Pass"))[0] != 0


async def test_two_key_login(bmc: Bmc):
    """With K_G set (here over IPMI, as bmc-config does), session keys come from K_G: a console
    without it cannot talk to the BMC after RAKP; with it (ipmitool -y), it can."""
    key = bytes(range(1, 21))
    raw = ["raw", "0x06", "0x56", "0x01", "0x01", "0x01", *(f"{byte:#04x}" for byte in key)]
    assert (await bmc.ipmitool(*raw))[0] == 0
    code, out = await bmc.ipmitool("-y", key.hex(), "power", "status")
    assert code == 0 and "off" in out, out
    assert (await bmc.ipmitool("power", "status"))[0] != 0


async def test_session_table_limits_and_lookups(nc, services, short_dir: Path):
    """Name-only and role lookup in RAKP 1; Open Session with privilege 0; a full session table
    answers "insufficient resources" (RMCP+ status 0x01); an idle session expires."""
    port = free_udp_port()
    config = write_config(short_dir, f'[ipmi]\nmax_sessions = 2\nsession_timeout = 2\n'
                                     f'[vm.n1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:{port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("ipmi-lan", config)
    async with (RmcpPlusClient("127.0.0.1", port, USER, PASSWORD, role=0x14, timeout=1.0) as by_name,
                RmcpPlusClient("127.0.0.1", port, USER, PASSWORD, role=0x04, cipher_suite=17,
                               timeout=1.0) as by_role):
        await by_name.open()
        await by_role.open()
        assert (await by_name.request(0x06, 0x01))[0] == 0 and (await by_role.request(0x06, 0x01))[0] == 0
        async with RmcpPlusClient("127.0.0.1", port, USER, PASSWORD, timeout=1.0) as third:
            with pytest.raises(IpmiClientError, match="status 0x1"):
                await third.open()
        await asyncio.sleep(2.5)  # both idle past the session timeout: gone, and their slots free
        assert await by_name.exchange(by_name.request_packet(0x06, 0x01)) is None
    async with RmcpPlusClient("127.0.0.1", port, USER, PASSWORD, timeout=1.0) as client:
        opened = await client._payload(framing.PAYLOAD_OPEN_SESSION_REQUEST, bytes([7, 0, 0, 0, 1, 2, 3, 4])
                                       + b"".join(bytes([kind, 0, 0, 8, 1, 0, 0, 0]) for kind in range(3)))
        assert opened[2] == 4  # requested 0: the highest the channel allows, Administrator
