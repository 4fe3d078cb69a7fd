"""qqmgr configs unchanged: the sample config of docs/qqmgr.md started with the real ``qemu-bmc vm``
commands against real QEMU (found as ``./qqmgr.toml``), its images made with the real qemu-img, its
HMP monitor asked over its socket; and the config rules (templates, command line splitting, the
lookup order) with the errors that name the file and the key."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, free_tcp_port, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc.vm import Disk, VmError, picked_disks, vm_disks
from qemu_bmc_shared.config import ConfigError, find_config, load
from qemu_bmc_shared.launcher import LaunchError, RuntimeFiles, managed_argv

QEMU_BMC = [sys.executable, "-m", "qemu_bmc"]
BARE = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults"]
QQMGR_FIELDS = {"name", "pid", "pid_file", "ssh", "serial_file", "qmp_file", "monitor_file"}


def docs_sample() -> str:
    """The first ```toml block of docs/qqmgr.md."""
    found = re.search(r"^```toml\n(.*?)^```", (REPO / "docs" / "qqmgr.md").read_text(), re.DOTALL | re.MULTILINE)
    assert found, "docs/qqmgr.md has no ```toml block"
    return found.group(1)


def replaced_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not once in the sample"
    return text.replace(old, new)


async def qemu_bmc(cwd: Path, *args: str) -> tuple[int, str, str]:
    """``qemu-bmc vm ARGS`` in ``cwd`` with no -c and no QEMU_BMC_CONFIG: the config is looked up."""
    environment = {key: value for key, value in os.environ.items() if key != "QEMU_BMC_CONFIG"}
    process = await asyncio.create_subprocess_exec(*QEMU_BMC, "vm", *args, cwd=cwd, env=environment,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   stdin=subprocess.DEVNULL)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode or 0, out.decode(), err.decode()


async def vm_json(cwd: Path, *args: str) -> Any:
    code, out, err = await qemu_bmc(cwd, *args, "--json")
    assert code == 0, (args, out, err)
    return json.loads(out)


async def hmp(socket_path: str, command: str, answer: bytes) -> bytes:
    """Ask QEMU's human monitor on its unix socket; what it printed up to ``answer``."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        await asyncio.wait_for(reader.readuntil(b"(qemu) "), 30)  # the banner and the first prompt
        writer.write(command.encode() + b"\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(answer), 30)
    finally:
        writer.close()


async def test_the_docs_sample_starts_and_answers_as_qqmgr(short_dir: Path, images: GuestImages):
    images_dir, port = short_dir / "images", free_tcp_port()
    sample = replaced_once(docs_sample(), 'images = "/var/lib/vms"', f'images = "{images_dir}"')
    (short_dir / "qqmgr.toml").write_text(replaced_once(sample, "port = 2222", f"port = {port}"))
    overlay = images_dir / "tiny.qcow2"
    try:
        info = await vm_json(short_dir, "disk", "tiny", "info")  # the image the drive names, not made yet
        assert info["disks"] == [{"drive": "boot", "file": str(overlay), "format": "qcow2", "exists": False,
                                  "image": None}]
        created = await vm_json(short_dir, "disk", "tiny", "create", "--backing", str(images.disk))
        assert created["file"] == str(overlay) and created["image"]["format"] == "qcow2"
        assert created["image"]["backing-filename"] == str(images.disk)
        assert created["image"]["virtual-size"] == images.disk.stat().st_size  # the backing file's size
        made = overlay.read_bytes()
        code, _, err = await qemu_bmc(short_dir, "disk", "tiny", "create", "1G")
        assert code == 1 and f"{overlay} (drive boot) exists already" in err, err
        assert overlay.read_bytes() == made

        started = (await vm_json(short_dir, "start", "tiny"))[0]
        assert started["started_by"] == "vm manager" and started["state"] == "running"
        status = await vm_json(short_dir, "status", "tiny")
        runtime = short_dir / ".qemu-bmc" / "vm" / "tiny"  # beside the config found: ./qqmgr.toml
        assert QQMGR_FIELDS <= set(status)
        assert {key: status[key] for key in QQMGR_FIELDS} == {
            "name": "tiny", "pid": started["pid"], "pid_file": str(runtime / "qemu.pid"), "ssh": {"port": port},
            "serial_file": str(runtime / "serial.log"), "qmp_file": str(runtime / "qmp.sock"),
            "monitor_file": str(runtime / "monitor.sock")}
        assert Path(status["pid_file"]).read_text().strip() == str(status["pid"])
        assert Path(status["qmp_file"]).is_socket() and Path(status["monitor_file"]).is_socket()
        assert status["runtime"]["pid_file"] == status["pid_file"]  # qemu-bmc's own keys are still there

        cmdline = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64", "-smp", "1",
                   "-name", "tiny guest", "-display", "none", "-nodefaults",
                   "-drive", f"file={overlay},if=virtio,format=qcow2,id=boot", "-snapshot",
                   "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
                   "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:01"]
        assert status["cmdline"] == cmdline
        running = Path(f"/proc/{status['pid']}/cmdline").read_bytes().split(b"\0")[:-1]
        assert running[-len(cmdline) + 1:] == [arg.encode() for arg in cmdline[1:]]  # as QEMU got them
        monitor_option = running.index(b"-monitor") + 1
        assert running[monitor_option] == f"unix:{runtime / 'monitor.sock'},server=on,wait=off".encode()
        code, out, _ = await qemu_bmc(short_dir, "status", "tiny")
        assert code == 0 and f"  cmdline: {shlex.join(cmdline)}\n" in out and "-name 'tiny guest'" in out, out

        serial = Path(status["serial_file"])
        await wait_for(lambda: "MARKER-HDD" in serial.read_text(errors="replace"), timeout=60,
                       message="the guest booted from the overlay vm disk made")
        assert b"VM status: running" in await hmp(status["monitor_file"], "info status", b"VM status: running")

        stopped = (await vm_json(short_dir, "stop", "tiny", "--timeout", "30"))[0]
        assert stopped["how"] == "graceful" and stopped["pid"] is None and "POWER-BUTTON" in serial.read_text()
        after = await vm_json(short_dir, "status", "tiny")
        assert after["pid"] is None and after["ssh"] == {"port": port} and after["monitor_file"] == str(
            runtime / "monitor.sock")
        assert overlay.read_bytes() == made  # -snapshot: the guest's writes went elsewhere
    finally:
        await qemu_bmc(short_dir, "stop", "tiny", "--timeout", "0")


async def test_ssh_put_get_need_the_vm_ssh_port(short_dir: Path):
    config = write_config(short_dir, f"[vm.nossh]\ncmd = {toml_list(BARE)}\n")
    for args in (("ssh", "nossh", "true"), ("put", "nossh", "a", "b"), ("get", "nossh", "a", "b")):
        code, _, err = await qemu_bmc(short_dir, *args[:1], "-c", str(config), *args[1:])
        assert code == 1 and f"{config}: vm.nossh.ssh.port: missing" in err and "[vm.nossh.ssh] port" in err, err


# ---------------------------------------------------------------------- the config rules


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qqmgr.toml"
    path.write_text(text)
    return path


def test_templates_nested_tables_vm_vars_and_values_with_templates(tmp_path: Path):
    config = load(config_file(tmp_path, """
[qemu]
img = "/opt/qemu/bin/qemu-img"
[vars]
home = "/srv/vms"
mem = 128
kvm = false
disk = "{{.home}}/{{.name}}-{{.vm.role}}.qcow2"
[vars.net]
bridge = "br0"
[vars.net.tap.extra]
queues = 4
[vm.a]
cmd = ["-m {{.vm.mem}} -smp {{.vm.cpus}}", "-drive file={{.vm.boot_img}}", "-drive file={{.disk}}",
       "-netdev bridge,br={{.net.bridge}},queues={{.net.tap.extra.queues}},id=n0 -name kvm={{.kvm}}",
       "-m", "{{.mem}}", "{{.ratio}}", "-nic user,hostfwd=tcp::{{.vm.ssh.port}}-:{{.vm.ssh.vm_port}}"]
[vm.a.vars]
mem = 4096
cpus = 2
ratio = 1.5
role = "db"
boot_img = "{{.home}}/boot/{{.name}}.img"
[vm.a.ssh]
port = 2201
[vm.b]
cmd = ["-drive file={{.disk}}", "-m {{.mem}}"]
[vm.b.vars]
role = "web"
"""))
    assert config.qemu_img == "/opt/qemu/bin/qemu-img"
    assert config.vms["a"].argv[1:] == [
        "-m", "4096", "-smp", "2", "-drive", "file=/srv/vms/boot/a.img", "-drive", "file=/srv/vms/a-db.qcow2",
        "-netdev", "bridge,br=br0,queues=4,id=n0", "-name", "kvm=false",
        "-m", "4096",  # {{.key}}: the VM's var over the global one (qemu-bmc's older spelling)
        "1.5", "-nic", "user,hostfwd=tcp::2201-:22"]
    # a global variable is substituted for each VM: {{.name}} and {{.vm.role}} are that VM's
    assert config.vms["b"].argv[1:] == ["-drive", "file=/srv/vms/b-web.qcow2", "-m", "128"]
    assert load(config_file(tmp_path, "[vm.a]\ncmd = []\n")).qemu_img == "qemu-img"


@pytest.mark.parametrize(("element", "arguments"), [
    ("-cpu host -smp 2 -m 4096", ["-cpu", "host", "-smp", "2", "-m", "4096"]),
    ("-append 'console=ttyS0 quiet'", ["-append", "console=ttyS0 quiet"]),
    ('-append "console=ttyS0 root={{.root}}"', ["-append", "console=ttyS0 root=/dev/vda 1"]),
    ("-drive 'file={{.dir}}/a.qcow2',if=virtio", ["-drive", "file=/my vms/a.qcow2,if=virtio"]),
    ("-drive file={{.dir}}/a.qcow2", ["-drive", "file=/my", "vms/a.qcow2"]),  # unquoted: split (documented)
    ("-name a\\ b -S", ["-name", "a b", "-S"]),
    ("-name x#y", ["-name", "x#y"]),
    ("console=ttyS0 quiet", ["console=ttyS0 quiet"]),  # not an option: one argument, as written
    ("{{.options}}", ["-smp", "4", "-name", "two words"]),  # a variable holding options is split too
    ("", [""]),
])
def test_cmd_elements_are_split_as_a_shell_would_after_substitution(tmp_path: Path, element: str,
                                                                   arguments: list[str]):
    path = config_file(tmp_path, "[vars]\nroot = '/dev/vda 1'\ndir = '/my vms'\n"
                                 "options = \"-smp 4 -name 'two words'\"\n"
                                 f"[vm.a]\ncmd = ['-m', {json.dumps(element)}, '-S']\n")
    assert load(path).vms["a"].argv[1:] == ["-m", *arguments, "-S"]


@pytest.mark.parametrize(("text", "where", "problem"), [
    ("[vm.a]\ncmd = [\"-append 'console=ttyS0\"]\n", "vm.a.cmd[0]", "cannot split"),
    ("[vm.a]\ncmd = ['-m 64', '-drive file={{.vm.disk}}']\n", "vm.a.cmd[1]", "unknown template variable {{.vm.disk}}"),
    ("[vm.a]\ncmd = ['{{.vm.ssh.port}}']\n", "vm.a.cmd[0]", "unknown template variable {{.vm.ssh.port}}"),
    ("[vm.a]\ncmd = ['{{.net}}']\n[vars.net]\nbr = 'x'\n", "vm.a.cmd[0]", "unknown template variable {{.net}}"),
    ("[vm.a]\ncmd = ['{{.vm.boot}}']\n[vm.a.vars]\nboot = '{{.hom}}/b.img'\n", "vm.a.vars.boot",
     "unknown template variable {{.hom}}"),
    ("[vars]\na = '{{.b}}'\nb = '{{.c}}'\nc = '{{.a}}'\n[vm.x]\ncmd = ['{{.a}}']\n", "vars.a",
     "template loop: {{.a}} -> {{.b}} -> {{.c}} -> {{.a}}"),
    ("[vars]\na = 'x{{.a}}'\n[vm.x]\ncmd = ['-m', '{{.a}}']\n", "vars.a", "template loop: {{.a}} -> {{.a}}"),
    ("[vars]\n" + "".join(f"v{n} = '{{{{.v{n + 1}}}}}'\n" for n in range(20)) + "v20 = 'end'\n"
     "[vm.x]\ncmd = ['{{.v0}}']\n", "vars.v16", "nested more than 16 deep"),
    ("[vm.a]\ncmd = ['{{ if .x }}-m{{ end }}']\n", "vm.a.cmd[0]", "not a template qemu-bmc substitutes"),
    ("[vm.a]\ncmd = ['{{.a-b}}']\n", "vm.a.cmd[0]", "not a template qemu-bmc substitutes"),
    ("[vars]\nlist = ['a']\n", "vars.list", "must be a string, a number, true/false or a table"),
    ("[vars.vm]\nx = 1\n", "vars.vm", "reserved"),
    ("[vm.a]\ncmd = []\n[vm.a.vars.ssh]\nport = 1\n", "vm.a.vars.ssh", "reserved"),
    ("[vm.a]\ncmd = ['-m 64 -smbios type=1,serial=x']\nbare_metal_identity = true\n", "vm.a.cmd[0]",
     "-smbios conflicts"),
    ("[vm.a]\ncmd = ['-m 64', '-smp 1 -cpu max,hypervisor=on']\nbare_metal_identity = true\n", "vm.a.cmd[1]",
     "hypervisor bit"),
    ("[qemu]\nimage = 'qemu-img'\n", "qemu.image", "unknown key"),
])
def test_template_and_splitting_errors_name_the_file_and_the_key(tmp_path: Path, text: str, where: str,
                                                                 problem: str):
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {where}: ") and problem in message, message


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """-c, ./qemu-bmc.toml, ./qqmgr.toml, ~/.config/qemu-bmc/config.toml, ~/.config/qqmgr/conf.toml."""
    work, home = tmp_path / "work", tmp_path / "config-home"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    candidates = [work / "qemu-bmc.toml", work / "qqmgr.toml", home / "qemu-bmc" / "config.toml",
                  home / "qqmgr" / "conf.toml"]
    assert find_config(None) is None
    for candidate in reversed(candidates):
        candidate.parent.mkdir(parents=True, exist_ok=True)
        candidate.write_text("")
        assert find_config(None) == candidate
    assert find_config("other.toml") == Path("other.toml")


def test_the_launcher_adds_the_hmp_monitor(tmp_path: Path):
    vm = load(config_file(tmp_path, f"runtime_dir = 'rt'\n[vm.a]\ncmd = {toml_list(BARE)}\n")).vms["a"]
    files = RuntimeFiles(vm.runtime_dir)
    files.prepare()
    argv = managed_argv(vm, files)
    assert argv[argv.index("-monitor") + 1] == f"unix:{vm.runtime_dir / 'monitor.sock'},server=on,wait=off"
    # the monitor's socket path is the longest: a runtime directory where only the others fit is refused
    too_long_for_the_monitor = tmp_path / ("d" * (107 - len("/ipmi.sock") - len(str(tmp_path)) - 1))
    assert len(str(too_long_for_the_monitor / "ipmi.sock")) == 107
    with pytest.raises(LaunchError, match="too long for a unix socket path"):
        RuntimeFiles(too_long_for_the_monitor).prepare()


def test_the_disks_a_command_line_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    path = config_file(tmp_path, """
[vm.a]
cmd = ["-drive if=pflash,format=raw,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
       "-drive file=/v/a,,b.qcow2,if=virtio,id=root", "-drive file=rel.img,format=raw",
       "-drive file=/v/c.iso,media=cdrom", "-drive file=nbd:localhost:10809", "-drive if=none,id=empty",
       "-hdb /v/d.img", "-cdrom /v/e.iso"]
[vm.b]
cmd = ["-m 64"]
[vm.c]
qmp = "/q"
""")
    vms = load(path).vms
    assert vm_disks(vms["a"]) == [Disk("root", Path("/v/a,b.qcow2"), None), Disk("drive2", tmp_path / "rel.img", "raw"),
                                  Disk("hdb", Path("/v/d.img"), None)]
    assert picked_disks(vms["a"], "hdb", one=True) == [Disk("hdb", Path("/v/d.img"), None)]
    for vm, drive, problem in ((vms["a"], None, "names 3 images (root, drive2, hdb): pick one with --drive ID"),
                               (vms["a"], "nope", "no drive 'nope' (drives: root, drive2, hdb)"),
                               (vms["b"], None, "names no disk image"), (vms["c"], None, "attach mode")):
        with pytest.raises(VmError, match=re.escape(problem)):
            picked_disks(vm, drive, one=True)
