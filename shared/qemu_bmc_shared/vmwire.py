"""The OpenIPMI "VM" wire protocol that QEMU's ``ipmi-bmc-extern`` device speaks over a chardev:
the VM-wire service decodes and answers it; the machine service, which owns a managed machine's
chardev, only splits the stream into frames (``FrameSplitter``) and carries them over the bus.

A message ends with 0xA0, a control command with 0xA1; 0xAA escapes the byte after it, which is
sent with bit 4 set. A request from QEMU is: message id, netfn << 2 | LUN, command, data,
checksum (the two's complement of the sum of the bytes before it); a response carries the same
id, the response netfn, the command, the completion code, data and a checksum. Control
commands are one byte and an optional argument: version (0xFF, then 1) and capabilities (0x08)
when QEMU connects, reset (0x04) when the machine was reset; the BMC sends its version, "no
attention" (0x00), and enables or disables the interface's interrupt (0x05, 0x06).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MESSAGE_END = 0xA0
COMMAND_END = 0xA1
ESCAPE = 0xAA
SPECIAL = frozenset((MESSAGE_END, COMMAND_END, ESCAPE))
#: The longest frame QEMU sends or takes (an IPMI message of at most 300 bytes, its
#: MAX_IPMI_MSG_SIZE, with the id and the checksum); anything longer is dropped up to the next
#: end marker.
MAX_FRAME = 302
#: The longest frame as it is on the wire: every byte of the longest frame escaped, and its end marker.
MAX_WIRE_FRAME = 2 * MAX_FRAME + 1
_END = re.compile(rb"[\xa0\xa1]")

PROTOCOL_VERSION = 1
COMMAND_VERSION = 0xFF
COMMAND_NO_ATTENTION = 0x00
COMMAND_RESET = 0x04
COMMAND_ENABLE_IRQ = 0x05
COMMAND_DISABLE_IRQ = 0x06
COMMAND_CAPABILITIES = 0x08


@dataclass(frozen=True)
class Request:
    message_id: int
    netfn: int
    lun: int
    cmd: int
    data: bytes


@dataclass(frozen=True)
class Control:
    command: int
    argument: bytes


def checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def escape(frame: bytes) -> bytes:
    out = bytearray()
    for byte in frame:
        if byte in SPECIAL:
            out += bytes([ESCAPE, byte | 0x10])
        else:
            out.append(byte)
    return bytes(out)


def encode_response(request: Request, completion: int, data: bytes = b"") -> bytes:
    """The response to ``request``, framed."""
    body = bytes([request.message_id, (request.netfn | 1) << 2 | request.lun, request.cmd, completion]) + data
    return escape(body + bytes([checksum(body)])) + bytes([MESSAGE_END])


def encode_control(command: int, argument: bytes = b"") -> bytes:
    return escape(bytes([command]) + argument) + bytes([COMMAND_END])


def decode_request(frame: bytes) -> Request | None:
    """A request from an unescaped message frame; None when it is too short or its checksum is wrong."""
    if len(frame) < 4 or sum(frame) & 0xFF:
        return None
    return Request(frame[0], frame[1] >> 2, frame[1] & 0x03, frame[2], bytes(frame[3:-1]))


class Decoder:
    """Splits the byte stream into message and control frames. Malformed frames (a stray escape
    before an end marker, an overlong frame, a bad checksum, too short) are dropped whole and
    counted; the next frame is unaffected. QEMU answers the guest 0xC3 for a dropped request."""

    def __init__(self) -> None:
        self.frame = bytearray()
        self.escaped = False
        self.overflow = False
        self.dropped = 0

    def feed(self, data: bytes) -> list[Request | Control]:
        frames: list[Request | Control] = []
        for byte in data:
            if byte in (MESSAGE_END, COMMAND_END):
                frame, bad = bytes(self.frame), self.escaped or self.overflow
                self.frame.clear()
                self.escaped = self.overflow = False
                decoded = None if bad else decode_request(frame) if byte == MESSAGE_END else (
                    Control(frame[0], frame[1:]) if frame else None)
                if decoded is None:
                    self.dropped += bool(frame) or bad
                else:
                    frames.append(decoded)
            elif byte == ESCAPE:
                self.escaped = True
            else:
                if self.escaped:
                    byte &= ~0x10
                    self.escaped = False
                if len(self.frame) >= MAX_FRAME:
                    self.overflow = True
                else:
                    self.frame.append(byte)
        return frames


class FrameSplitter:
    """Splits the byte stream into frames at their end markers, without decoding them: each frame
    as it came (escapes kept, end marker included), so that it can be carried whole to whoever
    decodes it. An escape never hides an end marker (an escaped byte is sent with bit 4 set), so
    the split is the Decoder's. A frame longer than ``MAX_WIRE_FRAME`` is dropped up to the next
    end marker and counted, so that a peer that sends no end marker holds at most that much."""

    def __init__(self) -> None:
        self.frame = bytearray()
        self.overflow = False
        self.dropped = 0

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        start = 0
        for end in _END.finditer(data):
            self._take(data[start:end.end()])
            if self.overflow:
                self.dropped += 1
            else:
                frames.append(bytes(self.frame))
            self.frame.clear()
            self.overflow = False
            start = end.end()
        self._take(data[start:])
        return frames

    def _take(self, piece: bytes) -> None:
        if not self.overflow and len(self.frame) + len(piece) > MAX_WIRE_FRAME:
            self.overflow = True
            self.frame.clear()
        if not self.overflow:
            self.frame += piece
