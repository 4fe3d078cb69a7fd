"""Bytes on the wire: RMCP, ASF presence ping, IPMI 1.5 and RMCP+ session headers, IPMI LAN messages.

Every parser here takes untrusted bytes and raises :class:`FrameError` (never anything else) for
what it cannot read; tests/test_ipmi_lan_fuzz.py holds it to that.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RMCP_VERSION = 0x06
RMCP_NO_ACK = 0xFF
CLASS_ASF = 0x06
CLASS_IPMI = 0x07
ASF_IANA = 4542
ASF_PING = 0x80
ASF_PONG = 0x40

AUTH_NONE = 0x00
AUTH_MD2 = 0x01
AUTH_MD5 = 0x02
AUTH_PASSWORD = 0x04
AUTH_RMCP_PLUS = 0x06

PAYLOAD_IPMI = 0x00
PAYLOAD_SOL = 0x01
PAYLOAD_OPEN_SESSION_REQUEST = 0x10
PAYLOAD_OPEN_SESSION_RESPONSE = 0x11
PAYLOAD_RAKP1 = 0x12
PAYLOAD_RAKP2 = 0x13
PAYLOAD_RAKP3 = 0x14
PAYLOAD_RAKP4 = 0x15

BMC_ADDRESS = 0x20


class FrameError(Exception):
    """Bytes that are not a well-formed frame."""


def rmcp_header(message_class: int) -> bytes:
    """RMCP header (IPMI v2.0 §13.1.3): version, reserved, sequence (no ack), class."""
    return bytes([RMCP_VERSION, 0, RMCP_NO_ACK, message_class])


def split_rmcp(packet: bytes) -> tuple[int, bytes]:
    """(message class, body) of an RMCP packet."""
    if len(packet) < 4 or packet[0] != RMCP_VERSION:
        raise FrameError("not RMCP")
    return packet[3] & 0x1F, packet[4:]


def asf_pong(ping: bytes) -> bytes | None:
    """The answer to an ASF Presence Ping (ASF 2.0 §3.2.4.3 / IPMI v2.0 §13.2.3), None for other ASF."""
    if len(ping) < 8:
        raise FrameError("short ASF message")
    iana, message_type, tag = struct.unpack(">IBB", ping[:6])
    if iana != ASF_IANA or message_type != ASF_PING:
        return None
    # IANA, OEM, supported entities (IPMI supported, ASF 1.0), supported interactions, reserved
    data = struct.pack(">II", ASF_IANA, 0) + bytes([0x81, 0x00]) + bytes(6)
    return rmcp_header(CLASS_ASF) + struct.pack(">IBBBB", ASF_IANA, ASF_PONG, tag, 0, len(data)) + data


@dataclass
class V15Packet:
    """IPMI 1.5 session header and its message (IPMI v2.0 §13.6)."""

    auth_type: int
    sequence: int
    session_id: int
    auth_code: bytes
    message: bytes


def parse_v15(body: bytes) -> V15Packet:
    if len(body) < 10:
        raise FrameError("short IPMI 1.5 header")
    auth_type = body[0] & 0x0F
    sequence, session_id = struct.unpack("<II", body[1:9])
    offset = 9
    auth_code = b""
    if auth_type != AUTH_NONE:
        auth_code = body[offset:offset + 16]
        offset += 16
    if len(body) < offset + 1:
        raise FrameError("short IPMI 1.5 header")
    length = body[offset]
    message = body[offset + 1:offset + 1 + length]
    if len(message) != length or len(auth_code) != (16 if auth_type != AUTH_NONE else 0):
        raise FrameError("truncated IPMI 1.5 message")
    return V15Packet(auth_type, sequence, session_id, auth_code, message)


def build_v15(auth_type: int, sequence: int, session_id: int, auth_code: bytes, message: bytes) -> bytes:
    header = bytes([auth_type]) + struct.pack("<II", sequence, session_id)
    if auth_type != AUTH_NONE:
        header += auth_code
    return rmcp_header(CLASS_IPMI) + header + bytes([len(message)]) + message


@dataclass
class V20Packet:
    """RMCP+ session header and payload (IPMI v2.0 §13.6, table 13-8)."""

    encrypted: bool
    authenticated: bool
    payload_type: int
    session_id: int
    sequence: int
    payload: bytes
    signed: bytes = b""
    """The bytes the integrity code covers (auth type through next header)."""
    auth_code: bytes = b""


def parse_v20(body: bytes, auth_code_length: int) -> V20Packet:
    """Parse an RMCP+ packet; ``auth_code_length`` is the session's integrity code size (0 when
    the packet is not authenticated or the session has no integrity algorithm)."""
    if len(body) < 12 or body[0] & 0x0F != AUTH_RMCP_PLUS:
        raise FrameError("not RMCP+")
    kind = body[1]
    payload_type = kind & 0x3F
    offset = 2
    if payload_type == 0x02:  # OEM explicit: IANA and OEM payload id
        offset += 6
    if len(body) < offset + 10:
        raise FrameError("short RMCP+ header")
    session_id, sequence, length = struct.unpack("<IIH", body[offset:offset + 10])
    offset += 10
    payload = body[offset:offset + length]
    if len(payload) != length:
        raise FrameError("truncated RMCP+ payload")
    packet = V20Packet(bool(kind & 0x80), bool(kind & 0x40), payload_type, session_id, sequence, payload)
    if packet.authenticated and auth_code_length:
        trailer = body[offset + length:]
        if len(trailer) < 2 + auth_code_length:
            raise FrameError("missing integrity trailer")
        pad_length = trailer[-auth_code_length - 2]
        if trailer[-auth_code_length - 1] != 0x07 or len(trailer) != pad_length + 2 + auth_code_length:
            raise FrameError("bad integrity pad")
        packet.signed = body[:len(body) - auth_code_length]
        packet.auth_code = body[len(body) - auth_code_length:]
    return packet


def build_v20(payload_type: int, session_id: int, sequence: int, payload: bytes, *, encrypted: bool = False,
              integrity: tuple[int, object] | None = None) -> bytes:
    """An RMCP+ packet; ``integrity`` is (code length, sign function) for an authenticated one."""
    kind = payload_type | (0x80 if encrypted else 0) | (0x40 if integrity else 0)
    body = bytes([AUTH_RMCP_PLUS, kind]) + struct.pack("<IIH", session_id, sequence, len(payload)) + payload
    if integrity:
        _, sign = integrity
        pad = (4 - (len(body) + 2) % 4) % 4
        body += b"\xff" * pad + bytes([pad, 0x07])
        body += sign(body)  # type: ignore[operator]
    return rmcp_header(CLASS_IPMI) + body


def checksum(data: bytes) -> int:
    """Two's complement checksum (IPMI v2.0 §13.8)."""
    return (-sum(data)) & 0xFF


@dataclass(frozen=True)
class LanMessage:
    """An IPMI request as it travels on LAN (IPMI v2.0 §13.8, table 13-4)."""

    responder: int
    netfn: int
    responder_lun: int
    requester: int
    sequence: int
    requester_lun: int
    cmd: int
    data: bytes


def parse_lan_message(message: bytes) -> LanMessage:
    if len(message) < 7:
        raise FrameError("short IPMI message")
    if checksum(message[:2]) != message[2] or checksum(message[3:-1]) != message[-1]:
        raise FrameError("IPMI message checksum")
    return LanMessage(responder=message[0], netfn=message[1] >> 2, responder_lun=message[1] & 3,
                      requester=message[3], sequence=message[4] >> 2, requester_lun=message[4] & 3,
                      cmd=message[5], data=message[6:-1])


def build_lan_response(request: LanMessage, completion: int, data: bytes) -> bytes:
    """The response to ``request``: addresses swapped, netfn + 1."""
    head = bytes([request.requester, ((request.netfn | 1) << 2) | request.requester_lun])
    body = bytes([request.responder, (request.sequence << 2) | request.responder_lun, request.cmd, completion]) + data
    return head + bytes([checksum(head)]) + body + bytes([checksum(body)])


def build_lan_request(netfn: int, cmd: int, data: bytes, sequence: int = 0, requester: int = 0x81) -> bytes:
    """A request as a remote console sends it (for tests and benchmarks)."""
    head = bytes([BMC_ADDRESS, netfn << 2])
    body = bytes([requester, sequence << 2, cmd]) + data
    return head + bytes([checksum(head)]) + body + bytes([checksum(body)])
