"""The tiny Linux test guest (linux_guest.py) against QEMU's own simulated BMC (ipmi-bmc-sim), without
qemu-bmc: it boots under TCG, finds the KCS interface, runs ipmitool and FreeIPMI in-band through
/dev/ipmi0 and powers off; and its build is cached."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from linux_guest import DONE, MISSING, READY, LinuxGuest

# QEMU's simulated BMC answers Get Device ID and the chassis commands but not Get Channel Info, which
# bmc-config (ipmi-config's core category) asks first: its debug output still shows the in-band exchange.
SCRIPT = """\
set -e
ipmitool mc info
ipmi-chassis-config --checkout -S Chassis_Front_Panel_Buttons
bmc-config --checkout -S Lan_Channel --debug >/tmp/bmc-config.out 2>&1 || echo "bmc-config rc=$?"
grep -m 1 -A 3 "Get Channel Info Command Response" /tmp/bmc-config.out
"""


def boot(guest: LinuxGuest, script: str, directory: Path, timeout: float = 300, bmc: bool = True) -> str:
    """Boot the guest (with QEMU's simulated BMC) until it powers off; its serial output. ``timeout`` is
    only a deadline for a guest that hangs (how long a boot takes is bench/'s business)."""
    serial = directory / "serial.log"
    argv = ["qemu-system-x86_64", *guest.qemu_args(guest.initrd(script, directory)), "-no-reboot",
            "-serial", f"file:{serial}"]
    if bmc:
        argv += ["-device", "ipmi-bmc-sim,id=bmc0", "-device", "isa-ipmi-kcs,bmc=bmc0"]
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"QEMU still running after {timeout} s; serial:\n{serial.read_text(errors='replace')}")
    output = serial.read_text(errors="replace") if serial.exists() else ""
    assert result.returncode == 0, f"QEMU exited {result.returncode}: {result.stderr}\n{output}"
    return output


def test_guest_runs_ipmitool_and_freeipmi_in_band(linux_guest: LinuxGuest, short_dir: Path) -> None:
    output = boot(linux_guest, SCRIPT, short_dir)
    assert READY in output, output
    assert "IPMI Version              : 2.0" in output, output  # ipmitool mc info
    assert "Section Chassis_Front_Panel_Buttons" in output, output  # FreeIPMI ipmi-config, checked out
    assert "Enable_Reset_Button" in output, output
    assert "Get Channel Info Command Response" in output, output  # bmc-config's request went through /dev/ipmi0
    assert f"{DONE} rc=0" in output, output
    assert "Kernel panic" not in output, output


def test_without_a_bmc_the_guest_says_so_and_still_runs_the_script(linux_guest: LinuxGuest,
                                                                     short_dir: Path) -> None:
    output = boot(linux_guest, "echo from-the-script; exit 3\n", short_dir, bmc=False)
    assert MISSING in output and READY not in output, output
    assert "from-the-script" in output, output
    assert f"{DONE} rc=3" in output, output
    # ipmi_si found no interface, so the init script skipped its wait for /dev/ipmi0
    assert "GUEST: insmod ipmi_si failed" in output, output


def test_build_is_cached(linux_guest: LinuxGuest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second build runs no apt-get or dpkg-deb and leaves the cached kernel and initramfs as they were."""
    assert linux_guest.kernel is not None and linux_guest.base is not None
    built = [(path.stat().st_ino, path.stat().st_mtime_ns) for path in (linux_guest.kernel, linux_guest.base)]
    commands: list[list[str]] = []
    run, popen = subprocess.run, subprocess.Popen

    def recording_run(argv: Any, *args: Any, **kwargs: Any) -> Any:
        commands.append(list(argv))
        return run(argv, *args, **kwargs)

    def recording_popen(argv: Any, *args: Any, **kwargs: Any) -> Any:
        commands.append(list(argv))
        return popen(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    again = LinuxGuest(linux_guest.cache).build()
    monkeypatch.undo()
    assert not again.downloaded
    assert not [argv for argv in commands if argv[0] in ("apt-get", "dpkg-deb")], commands
    assert again.kernel == linux_guest.kernel and again.base == linux_guest.base
    assert [(path.stat().st_ino, path.stat().st_mtime_ns) for path in (again.kernel, again.base)] == built


def test_initrd_appends_the_script_to_the_cached_base(linux_guest: LinuxGuest, short_dir: Path) -> None:
    assert linux_guest.base is not None
    base = linux_guest.base.read_bytes()
    initrd = linux_guest.initrd("echo hello\n", short_dir).read_bytes()
    assert initrd.startswith(base)
    assert b"guest.sh\0" in initrd[len(base):] and b"echo hello\n" in initrd[len(base):]
    assert linux_guest.base.read_bytes() == base
    args = linux_guest.qemu_args(short_dir / "initrd.img", memory=512, cmdline="extra=1")
    assert args[args.index("-m") + 1] == "512" and args[args.index("-accel") + 1] == "tcg"
    assert "console=ttyS0" in args[args.index("-append") + 1] and "extra=1" in args[args.index("-append") + 1]
    assert not any(arg in ("-serial", "-chardev") for arg in args)
