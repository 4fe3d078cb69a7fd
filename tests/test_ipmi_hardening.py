"""IPMI over LAN under attack and faults (issue 13), against a real state service and the real LAN
service, with ipmitool as the administrator and hostile packets from another loopback address
(127.0.0.2: the whole 127/8 is local on Linux, so the service sees a second source)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import clients
import pytest
from conftest import free_udp_port, wait_for, write_config
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_ipmi_lan import crypto, framing
from qemu_bmc_ipmi_lan.client import IpmiClientError, RmcpPlusClient, _Receiver
from qemu_bmc_shared import bus, config, subjects
from qemu_bmc_shared.config import IpmiConfig
from qemu_bmc_shared.ipmi.core import CIPHER_SUITES
from qemu_bmc_shared.messages import AccountPolicy, AccountPolicyUpdate, LoginAttempt, LoginVerdict

USER, PASSWORD = "admin", "s3cret-Pass"
ATTACKER = "127.0.0.2"
LANPLUS = ("-I", "lanplus", "-C", "3")
LAN_MD5 = ("-I", "lan", "-A", "MD5")


async def start_lan(nc, services, directory: Path, ipmi: str = "") -> int:
    """The state and LAN services for machine n1 (no machine service: the commands used here are
    the BMC's own); the LAN port."""
    port = free_udp_port()
    config = write_config(directory, f'[ipmi]\n{ipmi}\n[vm.n1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:{port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("ipmi-lan", config)
    return port


async def ipmitool(port: int, *args: str, interface: tuple[str, ...] = LANPLUS, password: str = PASSWORD
                   ) -> tuple[int, str]:
    return await clients.ipmitool(port, *args, user=USER, password=password, interface=interface, timeout=2,
                                  retries=2)


class Console(RmcpPlusClient):
    """The service's own RMCP+ client, from a chosen source address, with the hostile variants."""

    def __init__(self, port: int, source: str = ATTACKER, password: str = PASSWORD, cipher_suite: int = 3) -> None:
        super().__init__("127.0.0.1", port, USER, password, cipher_suite=cipher_suite, timeout=1.0)
        self.source = source

    async def __aenter__(self) -> Console:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: _Receiver(self.queue),
                                                                local_addr=(self.source, 0), remote_addr=self.address)
        return self

    async def bogus_rakp3(self) -> int:
        """Open Session, RAKP 1, then a RAKP 3 whose code is not made with the password: the RAKP 4
        status (0x0F: wrong password)."""
        auth, integrity, confidentiality = CIPHER_SUITES[self.cipher_suite]
        proposal = b"".join(bytes([kind, 0, 0, 8, algorithm, 0, 0, 0])
                            for kind, algorithm in enumerate((auth, integrity, confidentiality)))
        opened = await self._payload(framing.PAYLOAD_OPEN_SESSION_REQUEST,
                                     bytes([1, 0, 0, 0]) + struct.pack("<I", self.console_id) + proposal)
        bmc_id = opened[8:12]
        await self._payload(framing.PAYLOAD_RAKP1, bytes([2, 0, 0, 0]) + bmc_id + os.urandom(16)
                            + bytes([self.role, 0, 0, len(self.user)]) + self.user)
        reply = await self.exchange(framing.build_v20(framing.PAYLOAD_RAKP3, 0, 0, bytes([3, 0, 0, 0]) + bmc_id
                                                      + os.urandom(20)))
        assert reply is not None
        return framing.parse_v20(framing.split_rmcp(reply)[1], 0).payload[1]


def open_session_request(tag: int = 1, suite: int = 3) -> bytes:
    proposal = b"".join(bytes([kind, 0, 0, 8, algorithm, 0, 0, 0])
                        for kind, algorithm in enumerate(CIPHER_SUITES[suite]))
    return framing.build_v20(framing.PAYLOAD_OPEN_SESSION_REQUEST, 0, 0,
                             bytes([tag, 4, 0, 0]) + os.urandom(4) + proposal)


def v15_request(netfn: int, cmd: int, data: bytes, session_id: int = 0, sequence: int = 0, auth_type: int = 0,
                password: str = "") -> bytes:
    message = framing.build_lan_request(netfn, cmd, data)
    code = crypto.v15_auth_code(auth_type, password.encode(), struct.pack("<I", session_id), message,
                                struct.pack("<I", sequence)) if auth_type else b""
    return framing.build_v15(auth_type, sequence, session_id, code, message)


def challenge_request(auth_type: int = framing.AUTH_MD5, name: str = USER) -> bytes:
    return v15_request(0x06, 0x39, bytes([auth_type]) + name.encode().ljust(16, b"\0"))


def v15_answer(reply: bytes | None) -> tuple[int, bytes]:
    """(completion code, data) of an IPMI 1.5 reply."""
    assert reply is not None, "no answer"
    message = framing.parse_v15(framing.split_rmcp(reply)[1]).message
    return message[6], message[7:-1]


class Udp:
    """A plain UDP socket from ``source`` to the LAN service."""

    def __init__(self, port: int, source: str = ATTACKER) -> None:
        self.port, self.source = port, source
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> Udp:
        self.transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Receiver(self.queue), local_addr=(self.source, 0), remote_addr=("127.0.0.1", self.port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.transport is not None
        self.transport.close()

    def send(self, packet: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(packet)

    async def exchange(self, packet: bytes, timeout: float = 2.0) -> bytes | None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.send(packet)
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def v15_login_with(self, password: str, auth_type: int = framing.AUTH_MD5) -> int:
        """Get Session Challenge then Activate Session with ``password``: the completion code, or
        -1 when the service does not answer (a bad auth code is dropped)."""
        completion, data = v15_answer(await self.exchange(challenge_request(auth_type)))
        if completion:
            return completion
        session_id, challenge = struct.unpack("<I", data[:4])[0], data[4:20]
        reply = await self.exchange(v15_request(0x06, 0x3A, bytes([auth_type, 4]) + challenge + struct.pack("<I", 1),
                                                session_id, 0, auth_type, password), timeout=1.0)
        return -1 if reply is None else v15_answer(reply)[0]


@contextlib.asynccontextmanager
async def flooding(port: int, packet: bytes | Callable[[], bytes], per_tick: int = 10) -> AsyncIterator[list[int]]:
    """Sends ``packet`` (or what it makes) from the attacker's address, ``per_tick`` every 10 ms (about 1,000 a second),
    until the block ends; yields the running count."""
    sent = [0]

    async def flood() -> None:
        async with Udp(port) as udp:
            while True:
                for _ in range(per_tick):
                    udp.send(packet() if callable(packet) else packet)
                sent[0] += per_tick
                await asyncio.sleep(0.01)

    task = asyncio.create_task(flood())
    try:
        yield sent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------- pending sessions

async def test_unauthenticated_handshakes_never_keep_the_administrator_out(nc, services, short_dir: Path):
    """200 Open Sessions and 200 Get Session Challenges from one address (before, 30 filled the
    whole session table for 10 s): they take no place of the established sessions, the
    attacker's own oldest handshakes go, and ipmitool logs in at once, over RMCP+ and IPMI 1.5,
    after the flood and while it goes on."""
    port = await start_lan(nc, services, short_dir)
    async with Udp(port) as attacker:
        answers = [await attacker.exchange(open_session_request(tag)) for tag in range(200)]
        statuses = [framing.parse_v20(framing.split_rmcp(answer)[1], 0).payload[1] for answer in answers if answer]
        assert len(statuses) == 200 and set(statuses) == {0}, statuses  # a handshake each: its own oldest went
        first_id = framing.parse_v20(framing.split_rmcp(answers[0])[1], 0).payload[8:12]
        rakp2 = await attacker.exchange(framing.build_v20(framing.PAYLOAD_RAKP1, 0, 0, bytes([9, 0, 0, 0]) + first_id
                                                          + bytes(16) + bytes([0x14, 0, 0, 5]) + b"admin"))
        assert framing.parse_v20(framing.split_rmcp(rakp2)[1], 0).payload[1] == 0x02  # evicted: invalid session id
        for _ in range(200):
            assert v15_answer(await attacker.exchange(challenge_request()))[0] == 0
    code, out = await ipmitool(port, "session", "info", "active")
    assert code == 0 and "session handle" in out.lower(), out
    code, out = await ipmitool(port, "mc", "info", interface=LAN_MD5)
    assert code == 0 and "IPMI Version" in out, out

    for packet in (open_session_request, challenge_request()):
        async with flooding(port, packet) as sent:
            await wait_for(lambda: sent[0] >= 500, message="the flood under way")
            before = sent[0]
            for interface in (LANPLUS, ("-I", "lanplus", "-C", "17"), LAN_MD5):
                code, out = await ipmitool(port, "mc", "info", interface=interface)
                assert code == 0 and "IPMI Version" in out, (interface, out)
            assert sent[0] > before  # it went on meanwhile


async def test_a_full_table_of_established_sessions_still_refuses(nc, services, short_dir: Path):
    """The established sessions keep their limit (max_sessions): the next login is told "no
    resources" (RMCP+ status 0x01) and Get Session Challenge 0xC4."""
    port = await start_lan(nc, services, short_dir, "max_sessions = 2")
    async with Console(port, "127.0.0.1") as one, Console(port, "127.0.0.1", cipher_suite=17) as two:
        await one.open()
        await two.open()
        async with Console(port, "127.0.0.1") as third:
            with pytest.raises(IpmiClientError, match=r"status 0x1$"):
                await third.open()
        async with Udp(port, "127.0.0.1") as udp:
            assert v15_answer(await udp.exchange(challenge_request()))[0] == 0xC4
        await one.close()
        async with Console(port, "127.0.0.1") as third:
            await third.open()
            assert (await third.request(0x06, 0x01))[0] == 0


# ---------------------------------------------------------------------- lockout per user and source

async def test_lockout_is_per_user_and_source(nc, services, short_dir: Path):
    """Bogus RAKP 3 messages for admin from one address lock admin out from that address only:
    ipmitool from another logs in at once; from the attacker's address the right password is
    refused while locked (without extending it) and accepted once the lockout is over."""
    port = await start_lan(nc, services, short_dir)
    await bus.request(nc, "n1", subjects.ACCOUNT_POLICY_SET,
                      AccountPolicyUpdate(lockout_threshold=3, lockout_duration=3, lockout_reset_after=60),
                      AccountPolicy)
    async with Console(port) as attacker:
        assert [await attacker.bogus_rakp3() for _ in range(3)] == [0x0F] * 3
    verdict = await bus.request(nc, "n1", subjects.LOGIN_CHECK, LoginAttempt(name=USER, source=ATTACKER), LoginVerdict)
    assert not verdict.allowed

    code, out = await ipmitool(port, "mc", "info")
    assert code == 0 and "IPMI Version" in out, out
    async with Console(port) as victim_of_its_own:
        with pytest.raises(IpmiClientError, match=r"status 0xd$"):
            await victim_of_its_own.open()

    async def logs_in_from_there() -> bool:
        async with Console(port) as console:
            try:
                await console.open()
            except IpmiClientError:
                return False
            return (await console.request(0x06, 0x01))[0] == 0

    await wait_for(logs_in_from_there, timeout=30, interval=0.5, message="the lockout ending")


async def test_ipmi_1_5_lockout_is_per_user_and_source(nc, services, short_dir: Path):
    """IPMI 1.5: Activate Session with a wrong password's auth code counts; a locked-out name gets
    0x81 from Get Session Challenge there, and ipmitool -I lan from elsewhere logs in."""
    port = await start_lan(nc, services, short_dir)
    await bus.request(nc, "n1", subjects.ACCOUNT_POLICY_SET,
                      AccountPolicyUpdate(lockout_threshold=3, lockout_duration=60), AccountPolicy)
    async with Udp(port) as attacker:
        assert [await attacker.v15_login_with("wrong-password") for _ in range(3)] == [-1] * 3
        assert await attacker.v15_login_with(PASSWORD) == 0x81
    code, out = await ipmitool(port, "mc", "info", interface=LAN_MD5)
    assert code == 0 and "IPMI Version" in out, out


# ---------------------------------------------------------------------- authentication types and cipher suites

async def test_straight_password_and_weak_suites_are_off_by_default(nc, services, short_dir: Path):
    port = await start_lan(nc, services, short_dir)
    assert (await ipmitool(port, "mc", "info", interface=LAN_MD5))[0] == 0
    code, out = await ipmitool(port, "mc", "info", interface=("-I", "lan", "-A", "PASSWORD"))
    assert code != 0, out
    for suite in ("1", "2", "15", "16", "0"):
        code, out = await ipmitool(port, "mc", "info", interface=("-I", "lanplus", "-C", suite))
        assert code != 0, (suite, out)
    code, out = await ipmitool(port, "channel", "getciphers", "ipmi", "1", interface=("-I", "lanplus", "-C", "17"))
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:] if line.strip()] == ["3", "17"], out
    code, out = await ipmitool(port, "raw", "0x06", "0x38", "0x8e", "0x04")  # Get Channel Authentication Capabilities
    assert code == 0 and out.split()[1] == "84", out  # IPMI 2.0 extended, MD5 only
    async with Udp(port, "127.0.0.1") as udp:
        for auth_type in (framing.AUTH_PASSWORD, framing.AUTH_NONE, framing.AUTH_MD2):
            assert v15_answer(await udp.exchange(challenge_request(auth_type)))[0] == 0xCC, auth_type
    async with Console(port, "127.0.0.1", cipher_suite=15) as console:
        with pytest.raises(IpmiClientError, match=r"status 0x5$"):  # invalid integrity algorithm (§13.24)
            await console.open()

    # a packet without integrity code carrying only a victim's session id is not answered
    async with Console(port, "127.0.0.1", cipher_suite=17) as victim, Udp(port) as forger:
        await victim.open()
        forged = framing.build_v20(framing.PAYLOAD_IPMI, victim.bmc_id, 1, framing.build_lan_request(0x06, 0x01, b""))
        assert await forger.exchange(forged, timeout=1.0) is None
        assert (await victim.request(0x06, 0x01))[0] == 0


async def test_weak_authentication_when_the_operator_enables_it(nc, services, short_dir: Path):
    port = await start_lan(nc, services, short_dir, 'auth_types = ["MD5", "straight"]\ncipher_suites = [1, 3, 15, 17]')
    code, out = await ipmitool(port, "mc", "info", interface=("-I", "lan", "-A", "PASSWORD"))
    assert code == 0 and "IPMI Version" in out, out
    for suite in ("1", "15", "3", "17"):
        code, out = await ipmitool(port, "mc", "info", interface=("-I", "lanplus", "-C", suite))
        assert code == 0 and "IPMI Version" in out, (suite, out)
    assert (await ipmitool(port, "mc", "info", interface=("-I", "lanplus", "-C", "16")))[0] != 0
    code, out = await ipmitool(port, "raw", "0x06", "0x38", "0x8e", "0x04")
    assert code == 0 and out.split()[1] == "94", out  # MD5 and straight password
    # what the default spares: on suite 15 a forged packet with the victim's session id is answered
    async with Console(port, "127.0.0.1", cipher_suite=15) as victim, Udp(port) as forger:
        await victim.open()
        forged = framing.build_v20(framing.PAYLOAD_IPMI, victim.bmc_id, 1, framing.build_lan_request(0x06, 0x01, b""))
        assert await forger.exchange(forged, timeout=1.0) is not None


async def test_cipher_suite_privilege_levels_are_enforced(nc, services, short_dir: Path):
    """LAN parameter 24 set with ipmitool: suite 3 at most User. A session on suite 3 cannot run an
    Administrator command, a session on suite 17 (no nibble: no limit) can."""
    port = await start_lan(nc, services, short_dir)
    c17 = ("-I", "lanplus", "-C", "17")
    code, out = await ipmitool(port, "lan", "set", "1", "cipher_privs", "XXXuXXXXXXXXXXX", interface=c17)
    assert code == 0, out
    code, out = await ipmitool(port, "lan", "print", "1", interface=c17)
    assert "Cipher Suite Priv Max   : XXXuXXXXXXXXXXX" in out, out
    code, out = await ipmitool(port, "-L", "ADMINISTRATOR", "user", "set", "name", "5", "maas")
    assert code != 0, out
    code, out = await ipmitool(port, "-L", "USER", "mc", "info")
    assert code == 0 and "IPMI Version" in out, out
    code, out = await ipmitool(port, "-L", "USER", "user", "set", "name", "5", "maas")
    assert code != 0, out
    code, out = await ipmitool(port, "-L", "ADMINISTRATOR", "user", "set", "name", "5", "maas", interface=c17)
    assert code == 0, out
    async with Console(port, "127.0.0.1") as console:  # asks for Administrator by name and role
        with pytest.raises(IpmiClientError, match=r"status 0xa$"):
            await console.open()


# ---------------------------------------------------------------------- the bus going away

async def test_bus_outage_is_busy_not_a_wrong_password(nats_server: NatsServer, nc, services, short_dir: Path):
    """With nats-server stopped, an established session's state requests get 0xC0 (node busy), a
    login RMCP+ status 0x01 (no resources, not "unauthorized name") and Get Session Challenge
    0xC0; once nats-server is back on its port, everything answers again."""
    port = await start_lan(nc, services, short_dir)
    get_sel_info = (0x0A, 0x40)
    async with Console(port, "127.0.0.1", cipher_suite=17) as console:
        await console.open()
        assert (await console.request(*get_sel_info))[0] == 0
        await nats_server.stop()
        assert (await console.request(*get_sel_info))[0] in (0xC0, 0xD3)
        async with Console(port, "127.0.0.1") as login:
            with pytest.raises(IpmiClientError, match=r"status 0x1$"):
                await login.open()
        async with Udp(port, "127.0.0.1") as udp:
            assert v15_answer(await udp.exchange(challenge_request()))[0] == 0xC0
        await nats_server.start()

        async def served() -> bool:
            try:
                return (await console.request(*get_sel_info))[0] == 0
            except IpmiClientError:
                return False

        await wait_for(served, timeout=30, interval=0.2, message="answers after the bus came back")
    code, out = await ipmitool(port, "mc", "info")
    assert code == 0 and "IPMI Version" in out, out


# ---------------------------------------------------------------------- the [ipmi] policy in the config

def test_ipmi_policy_configuration(caplog: pytest.LogCaptureFixture):
    assert config.parse({}, None).ipmi == IpmiConfig(auth_types=("MD5",), cipher_suites=(3, 17))
    opened = config.parse({"ipmi": {"auth_types": ["md5", "PASSWORD", "none"], "cipher_suites": [17, 1, 15]}}, None)
    assert opened.ipmi.auth_types == ("MD5", "straight", "none") and opened.ipmi.cipher_suites == (1, 15, 17)
    # the keys of earlier versions still load: mapped, or ignored (the lockout is the state service's)
    old = {"auth_none": True, "cipher_suite_0": True, "lockout_failures": 3, "lockout_window": 30, "lockout_time": 5}
    with caplog.at_level("WARNING", logger="qemu_bmc_shared.config"):
        legacy = config.parse({"ipmi": old}, None)
    assert legacy.ipmi.auth_types == ("MD5", "none") and legacy.ipmi.cipher_suites == (0, 3, 17)
    assert sum("deprecated" in record.getMessage() for record in caplog.records) == 5
    bad = [{"auth_types": ["MD2"]}, {"auth_types": "MD5"}, {"cipher_suites": [4]}, {"cipher_suites": [True]},
           {"max_sessions": 64}, {"session_timeout": 0}]
    for table in bad:
        with pytest.raises(config.ConfigError, match=f"ipmi.{next(iter(table))}"):
            config.parse({"ipmi": table}, None)
