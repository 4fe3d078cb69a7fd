"""Real command-line clients as the tests run them: ipmitool over IPMI 2.0 (lanplus, cipher
suite 3 unless told otherwise), its exit status and output."""

from __future__ import annotations

import asyncio


def ipmitool_argv(port: int, *args: str, user: str, password: str, host: str = "127.0.0.1",
                  interface: tuple[str, ...] = ("-I", "lanplus", "-C", "3"), timeout: int = 2,
                  retries: int = 3) -> list[str]:
    """``timeout`` (-N) seconds per try and ``retries`` (-R) tries of each request."""
    return ["ipmitool", *interface, "-H", host, "-p", str(port), "-U", user, "-P", password,
            "-N", str(timeout), "-R", str(retries), *args]


async def run(*argv: str, timeout: float = 60) -> tuple[int, str]:
    """Run a command to its end: exit status, standard output and error together."""
    process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode or 0, output.decode(errors="replace")


async def ipmitool(port: int, *args: str, **options: object) -> tuple[int, str]:
    return await run(*ipmitool_argv(port, *args, **options))  # type: ignore[arg-type]
