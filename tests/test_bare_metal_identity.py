"""``bare_metal_identity``: a managed machine that systemd-detect-virt (and so MAAS) takes for bare metal.

The fast tests check the QEMU options the launcher adds and that QEMU takes them; the guest test
boots the tiny Linux guest twice, with and without the option, and reads from inside what
systemd-detect-virt reads on x86 (src/basic/virt.c): the DMI strings in /sys/class/dmi/id, the
SMBIOS type 0 "virtual machine" bit, the CPUID hypervisor flag (/proc/cpuinfo), /sys/hypervisor
and /proc/xen. The busybox guest has no systemd, so ``detect_virt`` below makes the same decisions.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import bmc_request, serial_log, toml_list, wait_for, write_config
from qemu_bmc_shared import subjects
from qemu_bmc_shared.config import VM_DMI_MARKERS, Identity, VmConfig
from qemu_bmc_shared.launcher import SMBIOS_TYPE0_FILE, RuntimeFiles, identity_args, managed_argv
from qemu_bmc_shared.messages import Inventory, PowerRequest, PowerStatus

UUID = "6f1c2a3e-8b4d-4e5f-9a0b-1c2d3e4f5a6b"
DMI_FILES = ("sys_vendor", "product_name", "product_version", "product_serial", "product_uuid", "product_sku",
             "product_family", "board_vendor", "board_name", "board_serial", "chassis_vendor", "chassis_serial",
             "bios_vendor", "bios_version", "bios_date")
# what systemd-detect-virt reads, in its order (product_name first, to tell KVM from QEMU)
DETECT_VIRT_DMI_FILES = ("product_name", "sys_vendor", "board_vendor", "bios_vendor", "product_version")


def vm_config(tmp_path: Path, argv: list[str], identity: Identity | None, uuid: str | None = UUID) -> VmConfig:
    return VmConfig(name="n1", mode="managed", runtime_dir=tmp_path / "vm" / "n1", argv=argv, uuid=uuid,
                    identity=identity)


def dmi_structures(table: bytes) -> list[tuple[int, bytes, list[bytes]]]:
    """(type, formatted area, strings) of each structure of an SMBIOS structure table."""
    structures, offset = [], 0
    while offset + 4 <= len(table):
        kind, length = table[offset], table[offset + 1]
        end = table.index(b"\0\0", offset + length)
        strings = [s for s in table[offset + length:end].split(b"\0") if s]
        structures.append((kind, table[offset:offset + length], strings))
        offset = end + 2
        if kind == 127:
            break
    return structures


def vm_bit(type0: bytes) -> bool:
    """BIOS characteristics extension byte 2, bit 4: "system is a virtual machine" (what systemd reads
    at offset 19 of /sys/firmware/dmi/entries/0-0/raw, when the structure is that long)."""
    return type0[1] >= 20 and bool(type0[0x13] & 0x10)


def test_no_identity_options_without_the_option(tmp_path: Path):
    vm = vm_config(tmp_path, ["qemu-system-x86_64", "-m", "64"], None)
    assert identity_args(vm) == []
    files = RuntimeFiles(vm.runtime_dir)
    files.prepare()
    argv = managed_argv(vm, files)
    assert "-smbios" not in argv and "-global" not in argv
    assert not (vm.runtime_dir / SMBIOS_TYPE0_FILE).exists()


def test_identity_options(tmp_path: Path):
    identity = Identity(vendor="Acme, Inc.", product="Metal 9000", sku="SKU-1", bios_version="2.19.1",
                        bios_date="12/31/2023", board_product="Board,X", cpu_model="Acme CPU, 64 cores")
    vm = vm_config(tmp_path, ["qemu-system-x86_64", "-cpu", "max", "-m", "64"], identity)
    files = RuntimeFiles(vm.runtime_dir)
    files.prepare()
    argv = managed_argv(vm, files)
    type0 = vm.runtime_dir / SMBIOS_TYPE0_FILE
    added = identity_args(vm)
    assert added == [
        "-smbios", f"file={type0}",
        "-smbios", f"type=1,manufacturer=Acme,, Inc.,product=Metal 9000,version=1.0,serial={UUID},sku=SKU-1",
        "-smbios", f"type=2,manufacturer=Acme,, Inc.,product=Board,,X,version=1.0,serial={UUID}",
        "-smbios", f"type=3,manufacturer=Acme,, Inc.,version=1.0,serial={UUID}",
        "-smbios", "type=4,manufacturer=Acme,, Inc.,version=",
        "-smbios", "type=17,manufacturer=Acme,, Inc.",
        "-global", "x86_64-cpu.hypervisor=off",
        "-global", "x86_64-cpu.model-id=Acme CPU, 64 cores",
    ]
    # inserted once, before the operator's arguments, whose -cpu stays the only one
    start = argv.index("-smbios")
    assert argv[start:start + len(added)] == added and argv[-4:] == vm.argv[1:]
    assert argv.count("-cpu") == 1 and argv.count("-uuid") == 1

    (kind, formatted, strings), = dmi_structures(type0.read_bytes() + b"\x7f\x04\0\0\0\0")[:1]
    assert kind == 0 and len(formatted) == 0x18 and not vm_bit(formatted)
    assert strings == [b"Acme, Inc.", b"2.19.1", b"12/31/2023"]
    assert formatted[4:6] == b"\x01\x02" and formatted[8] == 3  # the string numbers
    assert struct.unpack_from("<BB", formatted, 0x14) == (2, 19)  # BIOS release, from bios_version


def test_serial_is_the_machine_uuid(tmp_path: Path):
    # the operator's -uuid, else the configured one, else the one generated and kept
    args = identity_args(vm_config(tmp_path, ["qemu-system-x86_64", "-uuid", UUID.upper()], Identity(), None))
    assert f"type=1,manufacturer=Generic,product=Server,version=1.0,serial={UUID}" in args
    generated_vm = vm_config(tmp_path / "g", ["qemu-system-i386"], Identity(serial=None), None)
    files = RuntimeFiles(generated_vm.runtime_dir)
    files.prepare()
    argv = managed_argv(generated_vm, files)
    generated = files.uuid.read_text().strip()
    assert argv[argv.index("-uuid") + 1] == generated
    assert f"type=3,manufacturer=Generic,version=1.0,serial={generated}" in argv
    assert "i386-cpu.hypervisor=off" in argv
    explicit = identity_args(vm_config(tmp_path, ["qemu-system-x86_64"], Identity(serial="SN1")))
    assert "type=1,manufacturer=Generic,product=Server,version=1.0,serial=SN1" in explicit


def test_qemu_takes_the_options_and_hides_the_hypervisor_bit_of_the_operators_cpu(tmp_path: Path):
    """No guest: QEMU accepts the options, and the CPU it made from the operator's ``-cpu max`` has
    the hypervisor feature off and the configured model name."""
    vm = vm_config(tmp_path, ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
                              "-display", "none", "-nodefaults"], Identity(cpu_model="Acme CPU, 64 cores"))
    vm.runtime_dir.mkdir(parents=True)
    commands = [{"execute": "qmp_capabilities"}]
    commands += [{"execute": "qom-get", "arguments": {"path": "/machine/unattached/device[0]", "property": name}}
                 for name in ("hypervisor", "model-id")]
    commands.append({"execute": "quit"})
    result = subprocess.run([*vm.argv[:1], *identity_args(vm), *vm.argv[1:], "-S", "-qmp", "stdio"],
                            input="".join(json.dumps(c) + "\n" for c in commands), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    returns = [reply["return"] for reply in replies if "return" in reply]
    assert returns[1:3] == [False, "Acme CPU, 64 cores"], replies
    assert "warning" not in result.stderr.lower(), result.stderr


# -- from inside a real guest --------------------------------------------------------------------

GUEST_SCRIPT = r"""
echo 1 > /proc/sys/kernel/printk  # no kernel message in the middle of the report's long lines
for name in {files}; do
  echo "GUEST-DMI $name=$(cat /sys/class/dmi/id/$name 2>/dev/null)"
done
echo "GUEST-FLAGS $(grep -m1 '^flags' /proc/cpuinfo)"
echo "GUEST-MODEL $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2-)"
echo "GUEST-SMBIOS $(od -An -v -tx1 /sys/firmware/dmi/tables/DMI | tr -d ' \n')"
for path in /sys/hypervisor/type /proc/xen /sys/firmware/dmi/entries/0-0/raw; do
  [ -e $path ] && echo "GUEST-EXISTS $path"
done
true
"""


def guest_report(log: str) -> dict[str, object]:
    """What the guest script printed: the DMI files, the CPU flags and model, the SMBIOS table."""
    def one(tag: str) -> str:
        match = re.search(rf"^{tag} ?(.*?)\r?$", log, re.MULTILINE)
        assert match, f"no {tag} in the guest's output:\n{log[-3000:]}"
        return match.group(1)

    dmi = dict(re.findall(r"^GUEST-DMI (\w+)=(.*?)\r?$", log, re.MULTILINE))
    assert set(dmi) == set(DMI_FILES), log[-3000:]
    return {"dmi": dmi, "flags": one("GUEST-FLAGS").split(":", 1)[1].split(), "model": one("GUEST-MODEL").strip(),
            "smbios": dmi_structures(bytes.fromhex(one("GUEST-SMBIOS"))),
            "exists": re.findall(r"^GUEST-EXISTS (\S+?)\r?$", log, re.MULTILINE)}


def detect_virt(report: dict) -> str:
    """systemd-detect-virt's VM decision on x86 from what the guest saw: CPUID (the hypervisor flag;
    its vendor leaf is only read when the flag is set), the DMI vendor strings, the SMBIOS VM bit,
    /proc/xen and /sys/hypervisor/type (UML, device tree and z/VM do not apply to x86 guests)."""
    if "hypervisor" in report["flags"]:
        return "vm (CPUID hypervisor bit)"
    for name in DETECT_VIRT_DMI_FILES:
        marker = next((m for m in VM_DMI_MARKERS if report["dmi"][name].startswith(m)), None)
        if marker:
            return f"vm ({name} starts with {marker})"
    if any(kind == 0 and vm_bit(formatted) for kind, formatted, _ in report["smbios"]):
        return "vm-other (SMBIOS type 0 VM bit)"
    if report["exists"] and set(report["exists"]) & {"/proc/xen", "/sys/hypervisor/type"}:
        return "vm (xen or /sys/hypervisor)"
    return "none"


async def power_on(nc, machine: str) -> PowerStatus:
    return await bmc_request(nc, machine, subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=60)


@pytest.fixture
def guest_cmd(linux_guest, short_dir: Path) -> list[str]:
    files = " ".join(DMI_FILES)
    return linux_guest.qemu_args(linux_guest.initrd(GUEST_SCRIPT.format(files=files), short_dir / "guest"))


async def test_the_guest_sees_bare_metal(nc, services, short_dir: Path, guest_cmd: list[str]):
    config = write_config(short_dir, f"""
[vm.plain]
cmd = {toml_list(guest_cmd)}
uuid = "{UUID}"

[vm.metal]
cmd = {toml_list(guest_cmd)}
uuid = "{UUID}"
bare_metal_identity = true
[vm.metal.identity]
vendor = "Acme, Inc."
product = "Metal 9000, rev 2"
bios_vendor = "Acme BIOS"
bios_version = "3.1.4"
cpu_model = "Acme Metal CPU @ 3.00GHz"
""")
    await services("machine", config, "--stop-vms-on-exit")
    for machine in ("plain", "metal"):
        assert (await power_on(nc, machine)).state == "On"
    await asyncio.gather(*(
        wait_for(lambda machine=machine: "GUEST-DONE" in serial_log(short_dir, machine), timeout=300,
                 interval=0.5, message=f"{machine}: GUEST-DONE")
        for machine in ("plain", "metal")))
    plain, metal = (serial_log(short_dir, machine) for machine in ("plain", "metal"))
    assert "GUEST-DONE rc=0" in plain and "GUEST-DONE rc=0" in metal, metal[-3000:]
    plain_report, metal_report = guest_report(plain), guest_report(metal)

    # without the option: QEMU's markers, as systemd-detect-virt sees them
    assert plain_report["dmi"]["sys_vendor"] == "QEMU" and plain_report["dmi"]["bios_vendor"] == "SeaBIOS"
    assert "hypervisor" in plain_report["flags"] and "QEMU" in plain_report["model"]
    assert detect_virt(plain_report) == "vm (CPUID hypervisor bit)"
    # and without the CPUID bit, the DMI strings would still give it away
    assert detect_virt({**plain_report, "flags": []}) == "vm (sys_vendor starts with QEMU)"

    # with it: the configured identity, and nothing systemd-detect-virt takes for a virtual machine
    dmi = metal_report["dmi"]
    assert (dmi["sys_vendor"], dmi["product_name"], dmi["product_version"]) == ("Acme, Inc.", "Metal 9000, rev 2",
                                                                               "1.0")
    assert (dmi["board_vendor"], dmi["board_name"], dmi["chassis_vendor"]) == ("Acme, Inc.", "Metal 9000, rev 2",
                                                                               "Acme, Inc.")
    assert (dmi["bios_vendor"], dmi["bios_version"], dmi["bios_date"]) == ("Acme BIOS", "3.1.4", "01/01/2024")
    assert dmi["product_serial"] == dmi["board_serial"] == dmi["chassis_serial"] == dmi["product_uuid"] == UUID
    for name, value in dmi.items():
        assert not re.search(r"qemu|kvm|bochs|seabios|pc-q35", value, re.IGNORECASE), (name, value)
    assert "hypervisor" not in metal_report["flags"] and metal_report["flags"]
    assert metal_report["model"] == "Acme Metal CPU @ 3.00GHz"
    type0 = [formatted for kind, formatted, _ in metal_report["smbios"] if kind == 0]
    assert len(type0) == 1 and not vm_bit(type0[0])
    for kind, _, strings in metal_report["smbios"]:
        assert not any(re.search(rb"QEMU|KVM|Bochs|SeaBIOS|pc-q35", s) for s in strings), (kind, strings)
    assert detect_virt(metal_report) == "none"
    # what the BMC reports (Redfish ComputerSystem, IPMI FRU) is what the guest sees
    inventory = await bmc_request(nc, "metal", subjects.INVENTORY_GET, None, Inventory)
    assert (inventory.manufacturer, inventory.model, inventory.bare_metal) == ("Acme, Inc.", "Metal 9000, rev 2", True)
