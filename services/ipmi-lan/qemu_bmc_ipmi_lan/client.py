"""A small asyncio RMCP+ client (IPMI v2.0 §13): open a session with any offered cipher suite,
send requests, close. For tests (including packets real clients never send: tampered, replayed),
benchmarks and debugging; not a replacement for ipmitool."""

from __future__ import annotations

import asyncio
import os
import struct

from qemu_bmc_shared.ipmi.core import CIPHER_SUITES

from . import crypto, framing

ADMINISTRATOR_BY_NAME = 0x14


class IpmiClientError(Exception):
    pass


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.queue.put_nowait(data)


class RmcpPlusClient:
    def __init__(self, host: str, port: int, user: str, password: str, cipher_suite: int = 3,
                 role: int = ADMINISTRATOR_BY_NAME, timeout: float = 2.0) -> None:
        self.address = (host, port)
        self.user, self.password = user.encode(), password.encode()
        self.cipher_suite, self.role, self.timeout = cipher_suite, role, timeout
        self.console_id = struct.unpack("<I", os.urandom(4))[0] | 1
        self.bmc_id = 0
        self.sequence = 0
        self.keys = crypto.SessionKeys(*CIPHER_SUITES[cipher_suite])
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> RmcpPlusClient:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: _Receiver(self.queue),
                                                                remote_addr=self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, packet: bytes, timeout: float | None = None) -> bytes | None:
        """Send one datagram and wait for the next one back (None after the time-out)."""
        assert self.transport is not None
        self.transport.sendto(packet)
        try:
            return await asyncio.wait_for(self.queue.get(), self.timeout if timeout is None else timeout)
        except TimeoutError:
            return None

    async def _payload(self, payload_type: int, payload: bytes) -> bytes:
        reply = await self.exchange(framing.build_v20(payload_type, 0, 0, payload))
        if reply is None:
            raise IpmiClientError(f"no answer to payload {payload_type:#x}")
        answer = framing.parse_v20(framing.split_rmcp(reply)[1], 0).payload
        if len(answer) < 2 or answer[1] != 0:
            raise IpmiClientError(f"RMCP+ status {answer[1] if len(answer) > 1 else None:#x}")
        return answer

    async def open(self) -> None:
        """Open Session, RAKP 1-4 (§13.17-13.23)."""
        auth, integrity, confidentiality = CIPHER_SUITES[self.cipher_suite]
        proposal = b"".join(bytes([kind, 0, 0, 8, algorithm, 0, 0, 0])
                            for kind, algorithm in enumerate((auth, integrity, confidentiality)))
        opened = await self._payload(framing.PAYLOAD_OPEN_SESSION_REQUEST,
                                     bytes([1, 0, 0, 0]) + struct.pack("<I", self.console_id) + proposal)
        self.bmc_id = struct.unpack("<I", opened[8:12])[0]
        console_random = os.urandom(16)
        rakp2 = await self._payload(framing.PAYLOAD_RAKP1, bytes([2, 0, 0, 0]) + struct.pack("<I", self.bmc_id)
                                    + console_random + bytes([self.role, 0, 0, len(self.user)]) + self.user)
        bmc_random, guid = rakp2[8:24], rakp2[24:40]
        console_id = struct.pack("<I", self.console_id)
        expected = self.keys.rakp2_code(self.password, console_id, struct.pack("<I", self.bmc_id), console_random,
                                        bmc_random, guid, self.role, self.user)
        if not crypto.hmac_compare(expected, rakp2[40:]):
            raise IpmiClientError("RAKP 2 does not prove the BMC knows the password")
        proof = b""
        if auth != crypto.AUTH_RAKP_NONE:
            proof = crypto.hmac_digest(self.keys.hash, self.password, bmc_random, console_id,
                                       bytes([self.role, len(self.user)]), self.user)
        await self._payload(framing.PAYLOAD_RAKP3, bytes([3, 0, 0, 0]) + struct.pack("<I", self.bmc_id) + proof)
        self.keys.derive(self.password, console_random, bmc_random, self.role, self.user)

    def request_packet(self, netfn: int, cmd: int, data: bytes = b"") -> bytes:
        """The next in-session request (encrypted and signed as the cipher suite says)."""
        self.sequence += 1
        message = framing.build_lan_request(netfn, cmd, data, sequence=self.sequence & 0x3F)
        encrypted = self.keys.confidentiality != crypto.CONFIDENTIALITY_NONE
        integrity = (self.keys.integrity_length, self.keys.sign) if self.keys.integrity else None
        return framing.build_v20(framing.PAYLOAD_IPMI, self.bmc_id, self.sequence,
                                 self.keys.encrypt(message) if encrypted else message, encrypted=encrypted,
                                 integrity=integrity)

    def response_of(self, reply: bytes) -> tuple[int, bytes]:
        """(completion code, data) of an in-session reply."""
        packet = framing.parse_v20(framing.split_rmcp(reply)[1], self.keys.integrity_length)
        if self.keys.integrity and not self.keys.verify(packet.signed, packet.auth_code):
            raise IpmiClientError("reply with a bad integrity code")
        payload = self.keys.decrypt(packet.payload) if packet.encrypted else packet.payload
        if payload is None or len(payload) < 8:
            raise IpmiClientError("undecodable reply")
        return payload[6], payload[7:-1]

    async def request(self, netfn: int, cmd: int, data: bytes = b"") -> tuple[int, bytes]:
        reply = await self.exchange(self.request_packet(netfn, cmd, data))
        if reply is None:
            raise IpmiClientError(f"no reply to netfn {netfn:#x} cmd {cmd:#x}")
        return self.response_of(reply)

    async def close(self) -> None:
        """Close Session (§22.19)."""
        await self.request(0x06, 0x3C, struct.pack("<I", self.bmc_id))
