"""The serial console on the bus: the machine service keeps a real guest's serial port, publishes
its output, types input into it and keeps recent output, across a power cycle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from conftest import toml_list, wait_for, write_config
from linux_guest import LinuxGuest
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import (
    ConsoleHistory,
    ConsoleInput,
    ConsoleOutput,
    ConsoleWritten,
    PowerRequest,
    PowerStatus,
)

#: An interactive busybox shell on the serial port.
SHELL = "exec setsid sh -c 'exec sh -i <>/dev/ttyS0 >&0 2>&1'\n"


async def test_console_output_input_and_power_cycle(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    argv = linux_guest.qemu_args(linux_guest.initrd(SHELL, short_dir), cmdline="loglevel=6")
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(argv)}\n")
    await services("machine", config, "--stop-vms-on-exit")
    received = bytearray()
    ends: list[int] = []

    async def output(message) -> None:  # type: ignore[no-untyped-def]
        chunk = msgspec.json.decode(message.data, type=ConsoleOutput)
        received.extend(chunk.data)
        ends.append(chunk.end)

    subscription = await nc.subscribe(subjects.for_machine("n1", subjects.CONSOLE_OUT), cb=output)
    history = await bus.request(nc, "n1", subjects.CONSOLE_GET, None, ConsoleHistory)
    assert history.data == b"" and history.end == 0
    off = await bus.request(nc, "n1", subjects.CONSOLE_IN, ConsoleInput(data=b"x"), ConsoleWritten)
    assert off.written == 0  # no machine to type on

    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
    await wait_for(lambda: b"GUEST-IPMI" in received, timeout=60, message="the guest booting on the console")
    assert b"Linux version" in received  # from the first kernel message on: nothing lost before cont

    async def typed(command: bytes, answer: bytes) -> None:
        written = await bus.request(nc, "n1", subjects.CONSOLE_IN, ConsoleInput(data=command), ConsoleWritten)
        assert written.written == len(command)
        await wait_for(lambda: answer in received, timeout=20, message=f"{answer!r} on the console")

    await asyncio.sleep(1)  # the shell is up
    await typed(b"echo CONSOLE-OK-$((6*7))\n", b"CONSOLE-OK-42")
    history = await bus.request(nc, "n1", subjects.CONSOLE_GET, None, ConsoleHistory)
    assert b"CONSOLE-OK-42" in history.data and history.end == ends[-1] == len(received)

    # a power cycle underneath: the console follows the new QEMU, from its first message
    before = len(received)
    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="cycle"), PowerStatus, timeout=30)
    await wait_for(lambda: b"Linux version" in received[before:], timeout=60, message="the new boot's kernel")
    await wait_for(lambda: b"GUEST-IPMI" in received[before:], timeout=60, message="the new boot's init")
    await asyncio.sleep(1)
    await typed(b"echo AGAIN-$((7*6))\n", b"AGAIN-42")
    assert ends == sorted(ends)
    await subscription.unsubscribe()


async def test_attach_mode_console_socket(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    """Attach mode: the operator's QEMU has its serial port on a chardev socket named by ``serial``;
    the console follows it, and finds it again when that QEMU is replaced."""
    qmp, serial = short_dir / "a-qmp.sock", short_dir / "a-serial.sock"
    argv = linux_guest.qemu_args(linux_guest.initrd(SHELL, short_dir))

    async def start_qemu() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", *argv, "-qmp", f"unix:{qmp},server=on,wait=off",
            "-chardev", f"socket,id=com1,path={serial},server=on,wait=off", "-serial", "chardev:com1",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    received = bytearray()

    async def output(message) -> None:  # type: ignore[no-untyped-def]
        received.extend(msgspec.json.decode(message.data, type=ConsoleOutput).data)

    await nc.subscribe(subjects.for_machine("a1", subjects.CONSOLE_OUT), cb=output)
    qemu = await start_qemu()
    try:
        config = write_config(short_dir, f'[vm.a1]\nqmp = "{qmp}"\nserial = "{serial}"\n')
        await services("machine", config)
        for run in range(2):
            await wait_for(lambda: b"GUEST-IPMI" in received, timeout=60, message="the guest on the console")
            await asyncio.sleep(1)  # the shell is up
            command, answer = f"echo ATTACHED-$(({run}+42))\n".encode(), f"ATTACHED-{run + 42}".encode()
            written = await bus.request(nc, "a1", subjects.CONSOLE_IN, ConsoleInput(data=command), ConsoleWritten)
            assert written.written == len(command)
            await wait_for(lambda answer=answer: answer in received, timeout=20, message="the echo")
            # a serial break, then "h": the guest's kernel answers with its magic SysRq help
            await bus.request(nc, "a1", subjects.CONSOLE_IN, ConsoleInput(data=b"h", send_break=True), ConsoleWritten)
            await wait_for(lambda: b"sysrq: HELP" in received, timeout=20, message="the magic SysRq help")
            qemu.kill()  # the operator replaces its QEMU: the console connects to the new one
            await qemu.wait()
            received.clear()
            qemu = await start_qemu()
    finally:
        qemu.kill()
        await qemu.wait()
