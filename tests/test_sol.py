"""Serial over LAN (IPMI v2.0 §24, §26) with real clients, ipmitool and FreeIPMI's ipmiconsole,
each on a pseudo-terminal, against the tiny Linux guest with a shell on its serial port."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import termios
from pathlib import Path

import clients
from clients import run
from conftest import free_tcp_port, free_udp_ports, toml_list, wait_for, write_config
from linux_guest import LinuxGuest
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import ConsoleHistory, PowerRequest, PowerStatus
from test_vmwire_guest import PASSWORD, USER

SHELL_READY = "SOL-GUEST-SHELL"
SHELL = f"""\
echo {SHELL_READY}
exec setsid sh -c 'exec sh -i <>/dev/ttyS0 >&0 2>&1'
"""


def _controlling_tty() -> None:
    """In the child, after setsid: its pseudo-terminal (stdin) becomes its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A program on a pseudo-terminal: what it writes accumulates in ``output``."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.process: asyncio.subprocess.Process | None = None
        self.master = -1

    async def start(self, *argv: str) -> Terminal:
        self.master, slave = os.openpty()
        self.process = await asyncio.create_subprocess_exec(*argv, stdin=slave, stdout=slave, stderr=slave,
                                                            start_new_session=True, preexec_fn=_controlling_tty)
        os.close(slave)
        asyncio.get_running_loop().add_reader(self.master, self._read)
        return self

    def _read(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.output += data

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    async def expect(self, text: str, timeout: float = 30.0, after: int = 0) -> int:
        """Wait for ``text`` in the output past ``after``; where it ends."""
        await wait_for(lambda: text.encode() in self.output[after:], timeout=timeout, interval=0.05,
                       message=f"{text!r} in {self.text[-2000:]!r} (exit {self.process and self.process.returncode})")
        return self.output.index(text.encode(), after) + len(text)

    async def type(self, text: str) -> None:
        for character in text.encode():  # as typed: one key at a time
            os.write(self.master, bytes([character]))
            await asyncio.sleep(0.01)

    async def exited(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.master)
        with contextlib.suppress(OSError):
            os.close(self.master)


ipmitool_argv = functools.partial(clients.ipmitool_argv, user=USER, password=PASSWORD)


async def console_text(nc) -> str:
    try:
        history = await bus.request(nc, "n1", subjects.CONSOLE_GET, None, ConsoleHistory, timeout=2)
    except BusError:
        return ""
    return history.data.decode(errors="replace")


async def boot_shell(nc, services, directory: Path, guest: LinuxGuest) -> int:
    """The guest running, with its shell on the serial port; the IPMI over LAN port."""
    lan, wire = free_udp_ports(), free_tcp_port()
    argv = guest.qemu_args(guest.initrd(SHELL, directory))
    config = write_config(directory, f'[vm.n1]\ncmd = {toml_list(argv)}\nipmi = "127.0.0.1:{lan}"\n'
                                     f'vmwire = "127.0.0.1:{wire}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("vmwire", config)
    await services("machine", config, "--stop-vms-on-exit")
    await services("ipmi-lan", config)
    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)

    async def ready() -> bool:
        return SHELL_READY in await console_text(nc)

    await wait_for(ready, timeout=120, interval=0.5, message="the guest's shell on its serial port")
    return lan


async def shell_round_trip(terminal: Terminal, after: int = 0) -> int:
    await terminal.type("echo SOL-OK-$((6*7))\r")
    return await terminal.expect("SOL-OK-42", after=after)


async def magic_sysrq(terminal: Terminal, escape: str, after: int) -> int:
    """The client's "send break" escape, then "h": the guest's kernel takes a break followed by a
    key on its serial console as a magic SysRq request and prints its help."""
    await terminal.type(f"\r{escape}B")
    await asyncio.sleep(0.5)
    await terminal.type("h")
    return await terminal.expect("sysrq: HELP", after=after)


async def test_ipmitool_sol(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    lan = await boot_shell(nc, services, short_dir, linux_guest)
    code, out = await run(*ipmitool_argv(lan, "sol", "info", "1"))
    assert code == 0 and "Enabled                         : true" in out, out
    code, out = await run(*ipmitool_argv(lan, "raw", "0x06", "0x4e", "0x01"))
    assert code == 0 and out.split()[:3] == ["03", "00", "3f"], out

    terminal = await Terminal().start(*ipmitool_argv(lan, "sol", "activate"))
    try:
        await terminal.expect("SOL Session operational")
        await magic_sysrq(terminal, "~", await shell_round_trip(terminal))
        code, out = await run(*ipmitool_argv(lan, "raw", "0x06", "0x4a", "0x01"))
        assert code == 0 and out.split()[:2] == ["01", "01"], out  # one instance, active
        code, out = await run(*ipmitool_argv(lan, "sol", "activate"))
        assert code != 0 and "already active" in out, out  # one SOL per machine
        await terminal.type("\r~.")
        assert await terminal.exited() == 0, terminal.text
    finally:
        await terminal.close()

    code, out = await run(*ipmitool_argv(lan, "raw", "0x06", "0x4a", "0x01"))
    assert code == 0 and out.split()[:2] == ["01", "00"], out

    # deactivated from another session (ipmitool keeps its session, and ignores the BMC's
    # "deactivating" packet): the instance is free again
    terminal = await Terminal().start(*ipmitool_argv(lan, "sol", "activate"))
    try:
        await terminal.expect("SOL Session operational")
        code, out = await run(*ipmitool_argv(lan, "sol", "deactivate"))
        assert code == 0, out
        code, out = await run(*ipmitool_argv(lan, "raw", "0x06", "0x4a", "0x01"))
        assert code == 0 and out.split()[:2] == ["01", "00"], out
    finally:
        await terminal.close()
    code, out = await run(*ipmitool_argv(lan, "sol", "deactivate"))
    assert code != 0, out  # nothing left to deactivate

    # a user without SOL payload access is refused, until it gets it
    for args in (("user", "set", "name", "3", "nosol"), ("user", "set", "password", "3", "NoSol-Pass1"),
                 ("channel", "setaccess", "1", "3", "link=on", "ipmi=on", "privilege=4"), ("user", "enable", "3")):
        code, out = await run(*ipmitool_argv(lan, *args))
        assert code == 0, (args, out)
    code, out = await run(*ipmitool_argv(lan, "sol", "activate", user="nosol", password="NoSol-Pass1"))
    assert code != 0 and "SOL Session operational" not in out, out
    code, out = await run(*ipmitool_argv(lan, "sol", "payload", "enable", "1", "3"))
    assert code == 0, out
    terminal = await Terminal().start(*ipmitool_argv(lan, "sol", "activate", user="nosol", password="NoSol-Pass1"))
    try:
        await terminal.expect("SOL Session operational")
        await shell_round_trip(terminal)
        await terminal.type("\r~.")
        assert await terminal.exited() == 0, terminal.text
    finally:
        await terminal.close()


async def test_ipmiconsole_and_power_cycle(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    lan = await boot_shell(nc, services, short_dir, linux_guest)
    terminal = await Terminal().start("ipmiconsole", "-h", f"127.0.0.1:{lan}", "-u", USER, "-p", PASSWORD)
    try:
        await terminal.expect("SOL established")
        end = await magic_sysrq(terminal, "&", await shell_round_trip(terminal))
        code, out = await run(*ipmitool_argv(lan, "sol", "activate"))
        assert code != 0 and "already active" in out, out

        # the machine is power-cycled under the session: it lives on and shows the new boot
        await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="cycle"), PowerStatus, timeout=30)
        end = await terminal.expect(SHELL_READY, timeout=120, after=end)
        await asyncio.sleep(1)
        await shell_round_trip(terminal, after=end)

        await terminal.type("\r&.")
        await terminal.exited()
    finally:
        await terminal.close()
    code, out = await run(*ipmitool_argv(lan, "raw", "0x06", "0x4a", "0x01"))
    assert code == 0 and out.split()[:2] == ["01", "00"], out

