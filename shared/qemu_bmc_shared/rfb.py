"""Serving a VNC viewer from a machine's display stream (RFC 6143, RFB 3.8).

:func:`serve_viewer` stands between a viewer (a VNC client on a TCP connection, or noVNC on a
WebSocket) and one RFB session with QEMU's VNC server (a :class:`qemu_bmc_shared.kvm.KvmStream`,
or anything with the same ``read``/``write``/``close``):

* the server side of the handshake with the viewer (§7.1): version 3.8, security type None when
  no password is given, else VNC Authentication (§7.2.2: a DES challenge-response);
* the client side with QEMU (security None; its socket is the machine service's own), always
  asking for a shared session, so that one viewer never disconnects the others (§7.3.1);
* QEMU's ServerInit and every later byte QEMU sends go to the viewer as they come;
* every message the viewer sends is parsed and checked (§7.5, and QEMU's extended key event)
  before it goes to QEMU, re-encoded (padding zeroed); a message of an unknown type, too large or
  malformed ends the viewer's connection, and QEMU never sees its bytes. Without control (view
  only), key, pointer, clipboard and desktop size messages are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

try:  # cryptography >= 43 keeps single DES (TripleDES with one key three times) here
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES  # type: ignore[no-redef]
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from .kvm import KvmClosed

log = logging.getLogger(__name__)

VERSION = b"RFB 003.008\n"
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a viewer has from connecting to the end of the handshake (ServerInit)."""
AUTH_FAILURE_DELAY = 1.0
"""Seconds before a wrong password is answered: one guess per second per connection."""
MAX_CUT_TEXT = 1 << 20
"""The largest ClientCutText a viewer may send (QEMU's own limit too)."""
MAX_ENCODINGS = 64
"""The most encodings a SetEncodings message may list."""
MAX_SERVER_NAME = 1 << 16
MAX_PENDING = 1 << 16
"""Bytes of parsed viewer messages held while the previous write to QEMU is under way; beyond
this (plus one message) the viewer is not read until QEMU takes them."""
MAX_SCREENS = 16
"""The most screens a SetDesktopSize message may carry."""
ENCODING_QEMU_AUDIO = -259
"""QEMU's audio pseudo-encoding: not passed on (its client messages, 255/1, are not relayed)."""

# Client message types (§7.5; 251: the ExtendedDesktopSize extension; 255: QEMU's)
SET_PIXEL_FORMAT, SET_ENCODINGS, FRAMEBUFFER_UPDATE_REQUEST = 0, 2, 3
KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT = 4, 5, 6
SET_DESKTOP_SIZE = 251
QEMU_CLIENT_MESSAGE = 255
QEMU_EXTENDED_KEY_EVENT = 0


class RfbError(Exception):
    """The viewer or QEMU broke the protocol (the message says how); the connection ends."""


class ByteStream(Protocol):
    """One RFB session with QEMU's VNC server (:class:`qemu_bmc_shared.kvm.KvmStream`)."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class ViewerReader(Protocol):
    """What is read from the viewer (an :class:`asyncio.StreamReader` is one): ``readexactly``
    raises :class:`asyncio.IncompleteReadError` when the viewer has gone."""

    async def readexactly(self, n: int) -> bytes: ...


class ViewerWriter(Protocol):
    """Where the viewer's bytes go (an :class:`asyncio.StreamWriter` is one)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


StreamOpener = Callable[[], Awaitable[ByteStream]]


class _BufferedStream:
    """``readexactly`` over a stream that hands out chunks."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream, self.buffer = stream, bytearray()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self.stream.read()
            if not data:
                raise RfbError("QEMU's VNC server closed the session during the handshake")
            self.buffer += data
        chunk = bytes(self.buffer[:n])
        del self.buffer[:n]
        return chunk


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """The answer to a VNC Authentication challenge (§7.2.2): the 16 bytes DES-encrypted with the
    password (8 bytes at most, zero-padded) as the key, each key byte's bits in reverse order
    (what every VNC implementation does, though the RFC does not say so)."""
    raw = password.encode("latin-1")[:8].ljust(8, b"\0")
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in raw)
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # one key three times: single DES
    return encryptor.update(challenge) + encryptor.finalize()


def _failure(reason: str) -> bytes:
    """SecurityResult "failed" with its reason string (§7.1.3, version 3.8)."""
    text = reason.encode()
    return struct.pack("!II", 1, len(text)) + text


async def refuse_viewer(reader: ViewerReader, writer: ViewerWriter, reason: str,
                        timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Turn a viewer away before authentication (too many connections): the version exchange,
    then no security types and the reason (§7.1.2)."""
    text = reason.encode()
    writer.write(VERSION)
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        async with asyncio.timeout(timeout):
            await writer.drain()
            await reader.readexactly(12)
            writer.write(struct.pack("!BI", 0, len(text)) + text)
            await writer.drain()


async def _viewer_security(reader: ViewerReader, writer: ViewerWriter, password: str | None) -> bool:
    """The viewer's version and security handshake up to (not including) the SecurityResult: True
    when it authenticated, False when a failure was already sent."""
    writer.write(VERSION)
    await writer.drain()
    version = await reader.readexactly(12)
    if version != VERSION:
        raise RfbError(f"viewer asked for protocol version {version!r}; only RFB 003.008 is served")
    offered = SECURITY_NONE if password is None else SECURITY_VNC_AUTH
    writer.write(bytes([1, offered]))
    await writer.drain()
    chosen = (await reader.readexactly(1))[0]
    if chosen != offered:
        writer.write(_failure(f"security type {chosen} was not offered"))
        await writer.drain()
        return False
    if password is None:
        return True
    challenge = secrets.token_bytes(16)
    writer.write(challenge)
    await writer.drain()
    response = await reader.readexactly(16)
    if hmac.compare_digest(response, vnc_auth_response(password, challenge)):
        return True
    await asyncio.sleep(AUTH_FAILURE_DELAY)
    writer.write(_failure("authentication failed"))
    await writer.drain()
    return False


async def _qemu_handshake(qemu: _BufferedStream, stream: ByteStream) -> None:
    """The client side with QEMU up to its SecurityResult (security None)."""
    version = await qemu.readexactly(12)
    if not version.startswith(b"RFB 003."):
        raise RfbError(f"QEMU's VNC server sent {version!r}, not an RFB version")
    await stream.write(VERSION)
    count = (await qemu.readexactly(1))[0]
    if count == 0:
        length = struct.unpack("!I", await qemu.readexactly(4))[0]
        reason = await qemu.readexactly(min(length, 1024))
        raise RfbError(f"QEMU's VNC server refused the session: {reason.decode(errors='replace')}")
    types = await qemu.readexactly(count)
    if SECURITY_NONE not in types:
        raise RfbError(f"QEMU's VNC server asks for authentication (security types {list(types)})")
    await stream.write(bytes([SECURITY_NONE]))
    if struct.unpack("!I", await qemu.readexactly(4))[0] != 0:
        raise RfbError("QEMU's VNC server refused the session")


async def _server_init(qemu: _BufferedStream) -> bytes:
    """QEMU's ServerInit (§7.3.2), whole."""
    head = await qemu.readexactly(24)
    name_length = struct.unpack("!I", head[20:24])[0]
    if name_length > MAX_SERVER_NAME:
        raise RfbError(f"QEMU's ServerInit names a desktop of {name_length} bytes")
    return head + await qemu.readexactly(name_length)


async def read_client_message(reader: ViewerReader, control: bool) -> bytes | None:
    """The next message from the viewer, checked and re-encoded as QEMU is to get it; None when it
    is dropped (view only, or QEMU's audio encoding). Raises :class:`RfbError` for a message of an
    unknown type or a malformed one, and IncompleteReadError when the viewer has gone."""
    kind = (await reader.readexactly(1))[0]
    if kind == SET_PIXEL_FORMAT:  # §7.5.1: 3 padding bytes, PIXEL_FORMAT (§7.4), 3 padding bytes
        body = await reader.readexactly(19)
        bits, depth, big_endian, true_colour = body[3:7]
        if bits not in (8, 16, 32) or not 0 < depth <= bits or big_endian > 1 or true_colour > 1:
            raise RfbError(f"SetPixelFormat with {bits} bits per pixel, depth {depth}, big-endian flag {big_endian}, "
                           f"true-colour flag {true_colour}")
        return bytes([SET_PIXEL_FORMAT, 0, 0, 0]) + body[3:16] + bytes(3)
    if kind == SET_ENCODINGS:  # §7.5.2
        count = struct.unpack("!xH", await reader.readexactly(3))[0]
        if count > MAX_ENCODINGS:
            raise RfbError(f"SetEncodings lists {count} encodings (at most {MAX_ENCODINGS})")
        encodings = [encoding for encoding in struct.unpack(f"!{count}i", await reader.readexactly(4 * count))
                     if encoding != ENCODING_QEMU_AUDIO]
        return struct.pack(f"!BxH{len(encodings)}i", SET_ENCODINGS, len(encodings), *encodings)
    if kind == FRAMEBUFFER_UPDATE_REQUEST:  # §7.5.3
        incremental, x, y, width, height = struct.unpack("!BHHHH", await reader.readexactly(9))
        if incremental > 1:
            raise RfbError(f"FramebufferUpdateRequest with incremental flag {incremental}")
        return struct.pack("!BBHHHH", kind, incremental, x, y, width, height)
    if kind == KEY_EVENT:  # §7.5.4
        down, key = struct.unpack("!B2xI", await reader.readexactly(7))
        if down > 1:
            raise RfbError(f"KeyEvent with down-flag {down}")
        return struct.pack("!BB2xI", kind, down, key) if control else None
    if kind == POINTER_EVENT:  # §7.5.5
        buttons, x, y = struct.unpack("!BHH", await reader.readexactly(5))
        return struct.pack("!BBHH", kind, buttons, x, y) if control else None
    if kind == CLIENT_CUT_TEXT:  # §7.5.6 (a negative length: the extended clipboard's, QEMU takes its size)
        length = struct.unpack("!3xi", await reader.readexactly(7))[0]
        if abs(length) > MAX_CUT_TEXT:
            raise RfbError(f"ClientCutText of {abs(length)} bytes (at most {MAX_CUT_TEXT})")
        text = await reader.readexactly(abs(length))
        return struct.pack("!B3xi", kind, length) + text if control else None
    if kind == SET_DESKTOP_SIZE:  # the ExtendedDesktopSize extension: width, height, screens of 16 bytes
        width, height, screens = struct.unpack("!xHHBx", await reader.readexactly(7))
        if not 0 < screens <= MAX_SCREENS or not width or not height:
            raise RfbError(f"SetDesktopSize of {width}x{height} with {screens} screens")
        layout = await reader.readexactly(16 * screens)
        return struct.pack("!BxHHBx", kind, width, height, screens) + layout if control else None
    if kind == QEMU_CLIENT_MESSAGE:  # QEMU's extension messages: only the extended key event
        subtype = (await reader.readexactly(1))[0]
        if subtype != QEMU_EXTENDED_KEY_EVENT:
            raise RfbError(f"QEMU client message of sub-type {subtype} (only 0, the extended key event, is relayed)")
        down, keysym, keycode = struct.unpack("!HII", await reader.readexactly(10))
        if down > 1:
            raise RfbError(f"QEMU extended key event with down-flag {down}")
        return struct.pack("!BBHII", kind, subtype, down, keysym, keycode) if control else None
    raise RfbError(f"unknown client message type {kind}")


async def _qemu_to_viewer(stream: ByteStream, writer: ViewerWriter) -> None:
    while data := await stream.read():
        writer.write(data)
        await writer.drain()


async def _viewer_to_qemu(reader: ViewerReader, stream: ByteStream, control: bool) -> None:
    """Parse the viewer's messages and pass them on; those that arrive while a write is under way
    go together in the next one (a key's down, up and update request: one write). The messages
    read before the viewer went, or before a malformed one, are all passed on first."""
    pending = bytearray()
    wake, room = asyncio.Event(), asyncio.Event()
    finished = False

    async def send() -> None:
        while pending or not finished:
            await wake.wait()
            wake.clear()
            if pending:
                data = bytes(pending)
                pending.clear()
                room.set()
                await stream.write(data)

    sender = asyncio.create_task(send())
    try:
        error: RfbError | None = None
        try:
            while not sender.done():
                message = await read_client_message(reader, control)
                if message is None:
                    continue
                while len(pending) >= MAX_PENDING and not sender.done():
                    room.clear()
                    waiter = asyncio.ensure_future(room.wait())
                    try:
                        await asyncio.wait([sender, waiter], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                pending.extend(message)
                wake.set()
        except asyncio.IncompleteReadError:
            pass
        except RfbError as exc:
            error = exc
        finished = True
        wake.set()
        await sender  # what was read goes to QEMU first (or the write's error)
        if error is not None:
            raise error
    finally:
        sender.cancel()


#: How a session ends normally: the viewer went (EOF or reset), or the stream ended.
_SESSION_ENDS = (asyncio.IncompleteReadError, ConnectionError, KvmClosed)


async def serve_viewer(reader: ViewerReader, writer: ViewerWriter, stream: ByteStream | StreamOpener, *,
                       password: str | None, control: bool, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Serve one viewer until it or QEMU's session ends (see the module's description).

    ``stream`` is the RFB session with QEMU, or a coroutine function that opens one: it is then
    called only once the viewer has authenticated (what an unauthenticated client may make the
    service hold: one connection, for ``handshake_timeout`` seconds at most), and when it fails
    (the machine is off, has no display...) the viewer is told why in the SecurityResult and the
    error is raised. The stream is closed on return; the viewer's connection is the caller's. A
    stream whose ``control`` attribute is false (a KvmStream the machine service did not grant
    control: ``kvm_control = "first"``) is served view-only whatever ``control`` says.

    Returns when the viewer or the stream ends (or authentication failed: the viewer was told).
    Raises :class:`RfbError` when the viewer or QEMU breaks the protocol, and
    :class:`TimeoutError` when the handshake takes longer than ``handshake_timeout``."""
    opened: ByteStream | None = None if callable(stream) else stream
    try:
        async with asyncio.timeout(handshake_timeout):
            if not await _viewer_security(reader, writer, password):
                return
            try:
                if opened is None:
                    opened = await stream()  # type: ignore[operator]
                qemu = _BufferedStream(opened)
                await _qemu_handshake(qemu, opened)
            except Exception as exc:
                writer.write(_failure(f"the machine's display cannot be reached: {exc}"))
                await writer.drain()
                raise
            writer.write(struct.pack("!I", 0))  # SecurityResult: OK
            await writer.drain()
            await reader.readexactly(1)  # ClientInit: QEMU is asked for a shared session whatever the viewer asks
            await opened.write(b"\x01")
            control = control and getattr(opened, "control", True)
            writer.write(await _server_init(qemu) + bytes(qemu.buffer))
            await writer.drain()
        tasks = [asyncio.create_task(_qemu_to_viewer(opened, writer)),
                 asyncio.create_task(_viewer_to_qemu(reader, opened, control))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and isinstance(task.exception(), Exception) \
                    and not isinstance(task.exception(), _SESSION_ENDS):
                raise task.exception()  # type: ignore[misc]
    except _SESSION_ENDS:
        pass
    finally:
        if opened is not None:
            with contextlib.suppress(Exception):
                await opened.close()
