"""One machine's IPMI over LAN endpoint (UDP): RMCP, ASF ping, IPMI 1.5 and RMCP+ sessions.

Requests are framed and authenticated here, then run by the shared command layer
(qemu_bmc_shared.ipmi); the session commands live in lan_commands.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from qemu_bmc_shared import subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.bus import request as bus_request
from qemu_bmc_shared.config import IPMI_AUTH_TYPES, IpmiConfig
from qemu_bmc_shared.ipmi import Completion, Context, Privilege, Registry, Request, Response
from qemu_bmc_shared.ipmi.core import CIPHER_SUITES, LAN_CHANNEL, StateReads
from qemu_bmc_shared.ipmi.transport import LAN_PARAMS, cipher_suite_privileges, front_end
from qemu_bmc_shared.messages import (
    ChannelAccess,
    ChannelRef,
    Credentials,
    CredentialsRequest,
    KgKey,
    LanConfig,
    LanRef,
    LoginAttempt,
    LoginOutcome,
    LoginVerdict,
)

from . import crypto, framing
from .framing import FrameError
from .sessions import Session, SessionTable
from .sol import SolSession

log = logging.getLogger(__name__)

# RMCP+ status codes (IPMI v2.0 §13.24, table 13-15)
STATUS_OK = 0x00
STATUS_NO_RESOURCES = 0x01
STATUS_INVALID_SESSION = 0x02
STATUS_INVALID_AUTH_ALGORITHM = 0x04
STATUS_INVALID_INTEGRITY_ALGORITHM = 0x05
STATUS_INVALID_ROLE = 0x09
STATUS_UNAUTHORIZED_ROLE = 0x0A
STATUS_INVALID_NAME_LENGTH = 0x0C
STATUS_UNAUTHORIZED_NAME = 0x0D
STATUS_INVALID_INTEGRITY_CHECK = 0x0F
STATUS_INVALID_CONFIDENTIALITY_ALGORITHM = 0x10
STATUS_NO_CIPHER_SUITE_MATCH = 0x11
STATUS_ILLEGAL_PARAMETER = 0x12

MAX_PENDING_PACKETS = 256
#: Datagrams of one source address handled at once at most: a flood from one address cannot take
#: every place of ``MAX_PENDING_PACKETS``.
MAX_PENDING_PER_SOURCE = 64
#: Seconds a login waits for the state service (the user, K_G, the lockout) before it is refused as
#: "no resources": well within a console's retry time-out.
LOGIN_BUS_TIMEOUT = 3.0

T = TypeVar("T", bound=msgspec.Struct)


def machine_guid(machine: str) -> bytes:
    """The managed system GUID that RAKP 2 and 4 carry: stable, derived from the machine name."""
    return hashlib.sha256(f"qemu-bmc-guid:{machine}".encode()).digest()[:16]


class LanServer(asyncio.DatagramProtocol):
    def __init__(self, machine: str, nc: Client, registry: Registry, options: IpmiConfig) -> None:
        self.machine = machine
        self.nc = nc
        self.registry = registry
        self.options = options
        self.sessions = SessionTable(options.max_sessions, options.session_timeout, self.handshake_abandoned)
        self.state = StateReads()
        self.guid = machine_guid(machine)
        self.extra: dict[str, object] = {"lan": self, **front_end(options)}
        """What the command layer may know of this front-end (see ipmi.transport and ipmi.app)."""
        self.cipher_suites = {suite: CIPHER_SUITES[suite] for suite in options.cipher_suites}
        self.auth_types = {IPMI_AUTH_TYPES[name] for name in options.auth_types}
        """The IPMI 1.5 session authentication types allowed (session header codes, §13.6)."""
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()
        self.pending_by_source: Counter[str] = Counter()
        self.background: set[asyncio.Task[Any]] = set()
        """Login outcomes being recorded in the state service."""
        self.sol: SolSession | None = None
        """The active Serial over LAN payload instance (one per machine), see sol.py."""

    # ------------------------------------------------------------------ datagrams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.extra.update(front_end(self.options, (transport.get_extra_info("sockname") or ("0.0.0.0", 623))[:2]))

    def datagram_received(self, data: bytes, address: tuple[str, int]) -> None:
        source = address[0]
        if len(self.pending) >= MAX_PENDING_PACKETS or self.pending_by_source[source] >= MAX_PENDING_PER_SOURCE:
            return  # overloaded: drop, as a busy BMC does; clients retry
        task = asyncio.ensure_future(self.handle(data, address))
        self.pending.add(task)
        self.pending_by_source[source] += 1
        task.add_done_callback(lambda done: self._handled(done, source))

    def _handled(self, task: asyncio.Task[None], source: str) -> None:
        self.pending.discard(task)
        self.pending_by_source[source] -= 1
        if self.pending_by_source[source] <= 0:
            del self.pending_by_source[source]

    def send(self, packet: bytes, address: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(packet, address)

    async def handle(self, data: bytes, address: tuple[str, int]) -> None:
        """One datagram; nothing escapes, malformed input is dropped."""
        try:
            message_class, body = framing.split_rmcp(data)
            if message_class == framing.CLASS_ASF:
                pong = framing.asf_pong(body)
                if pong:
                    self.send(pong, address)
            elif message_class == framing.CLASS_IPMI and body:
                if body[0] & 0x0F == framing.AUTH_RMCP_PLUS:
                    await self.handle_v20(body, address)
                else:
                    await self.handle_v15(body, address)
        except FrameError as exc:
            log.debug("%s: dropped a malformed packet from %s: %s", self.machine, address, exc)
        except Exception:
            log.exception("%s: packet from %s", self.machine, address)

    async def run(self, session: Session | None, message: framing.LanMessage, address: tuple[str, int]) -> bytes:
        """Run one IPMI request from ``address``; the LAN response message."""
        command = self.registry.find(message.netfn, message.cmd)
        if session is None and (command is None or not command.sessionless):
            completion = Completion.INVALID_COMMAND if command is None else Completion.INSUFFICIENT_PRIVILEGE
            return framing.build_lan_response(message, completion, b"")
        # outside a session only the session-less commands get here, whatever their privilege
        context = Context(machine=self.machine, nc=self.nc, channel=LAN_CHANNEL,
                          privilege=session.privilege if session else Privilege.ADMINISTRATOR,
                          user_slot=session.user_slot if session else None, session=session,
                          extra={**self.extra, "active_sessions": len(self.sessions.active), "address": address},
                          reads=self.state)
        request = Request(message.netfn, message.cmd, message.data, message.responder_lun)
        if session is None:
            response = await self.registry.dispatch(context, request)
        else:
            response = await self.joined(session, context, request)
        return framing.build_lan_response(message, response.completion, response.data)

    async def joined(self, session: Session, context: Context, request: Request) -> Response:
        """Run a session's request, or join the same request already under way in that session.

        Consoles resend a request that is not answered in time (ipmipower after 0.4 s) with new
        sequence numbers, so a retry cannot be told from a new request; while the first is still
        running (a power cycle can take longer) the retry waits for its answer instead of
        running the command again (which would find the machine off half-way through the cycle
        and answer 0xD5)."""
        key = (request.netfn, request.cmd, request.lun, request.data)
        running = session.running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        session.running[key] = answer
        try:
            response = await self.registry.dispatch(context, request)  # answers, never raises
            answer.set_result(response)
            return response
        finally:
            del session.running[key]
            if not answer.done():  # cancelled (the service stopping): its retries end too
                answer.cancel()

    # ------------------------------------------------------------------ users

    async def ask(self, operation: str, message: msgspec.Struct | None, reply_type: type[T]) -> T:
        """A state service request of a login: :class:`BusError` ``unavailable`` at once while the
        bus is down (a request would wait for the reconnection), ``timeout`` after
        ``LOGIN_BUS_TIMEOUT``."""
        if not self.nc.is_connected:
            raise BusError("unavailable", "the bus is unreachable")
        try:
            return await bus_request(self.nc, self.machine, operation, message, reply_type, timeout=LOGIN_BUS_TIMEOUT)
        except nats.errors.Error as exc:
            raise BusError("unavailable", f"the bus: {exc}") from None

    async def user(self, name: bytes) -> tuple[Credentials, int] | None:
        """The user with this name (empty: the null user) and its privilege limit on the LAN
        channel, if it may log in over LAN at all: not while it must change its password (IPMI
        cannot tell it so; it is refused as a disabled user is, see docs/ipmi.md). Raises
        :class:`BusError` when the state service cannot tell."""
        try:
            name.decode("ascii")
        except UnicodeDecodeError:
            return None
        credentials, channel = await asyncio.gather(
            self.state.get(("user", name), lambda: self._credentials(name)), self.channel_access())
        if credentials is None:
            return None
        user = credentials.user
        access = user.channels.get(LAN_CHANNEL)
        if (not user.enabled or user.password_change_required or access is None or not access.ipmi_messaging
                or access.privilege > Privilege.OEM):
            return None
        if channel.access_mode == 0 or (credentials.password is None and name):
            return None
        return credentials, min(access.privilege, channel.privilege_limit)

    async def _credentials(self, name: bytes) -> Credentials | None:
        try:
            return await self.ask(subjects.USERS_CREDENTIALS, CredentialsRequest(name=name.decode("ascii")),
                                  Credentials)
        except BusError as exc:
            if exc.error in ("not_found", "bad_request"):  # no such user; a name no user can have
                return None
            raise

    async def channel_access(self) -> ChannelAccess:
        return await self.state.get("channel", lambda: self.ask(
            subjects.CHANNEL_GET, ChannelRef(channel=LAN_CHANNEL), ChannelAccess))

    async def kg(self) -> bytes | None:
        return await self.state.get("kg", self._kg)

    async def _kg(self) -> bytes | None:
        return (await self.ask(subjects.KG_GET, None, KgKey)).key

    async def suite_privilege_limit(self, suite: int) -> int:
        """The highest privilege a session of this cipher suite may have: LAN parameter 24 (§23.2,
        nibble n for suite id n; 0 when the suite is unused); suites above 15 have no nibble, no limit."""
        if suite > 15:
            return Privilege.OEM
        params = (await self.state.get("lan", lambda: self.ask(subjects.LAN_GET, LanRef(channel=LAN_CHANNEL),
                                                                  LanConfig))).params
        stored = params.get(24)
        if stored is None or len(stored) != LAN_PARAMS[24].size:
            return Privilege.ADMINISTRATOR  # the default: Administrator for every offered suite
        return cipher_suite_privileges(stored)[suite]

    # ------------------------------------------------------------------ login lockout (state service)

    async def login_allowed(self, name: bytes, source: str) -> LoginVerdict:
        """May ``name`` try to log in from ``source`` now (the lockout is the state service's, per
        user and source, shared by every front-end and replica)? Raises :class:`BusError`."""
        return await self.ask(subjects.LOGIN_CHECK, LoginAttempt(name=_text(name), source=source), LoginVerdict)

    async def record_login(self, name: bytes, source: str, ok: bool) -> None:
        """Count a login this front-end checked itself (RAKP 3, IPMI 1.5 auth codes)."""
        try:
            verdict = await self.ask(subjects.LOGIN_RESULT, LoginOutcome(name=_text(name), source=source, ok=ok),
                                     LoginVerdict)
        except BusError as exc:
            log.warning("%s: the login of user %r from %s could not be recorded: %s", self.machine, _text(name),
                        source, exc)
            return
        if not verdict.allowed:
            log.warning("%s: user %r is locked out from %s for %.0f s", self.machine, _text(name), source,
                        verdict.retry_after)

    def in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ------------------------------------------------------------------ IPMI 1.5

    async def handle_v15(self, body: bytes, address: tuple[str, int]) -> None:
        packet = framing.parse_v15(body)
        message = framing.parse_lan_message(packet.message)
        if packet.session_id == 0:
            if packet.auth_type != framing.AUTH_NONE:
                return
            response = await self.run(None, message, address)
            self.send(framing.build_v15(framing.AUTH_NONE, 0, 0, b"", response), address)
            return
        session = self.sessions.get(packet.session_id)
        if session is None or session.v2 or packet.auth_type != session.auth_type:
            return
        if not self.v15_authentic(session, packet):
            log.warning("%s: IPMI 1.5 packet with a bad auth code from %s", self.machine, address)
            if not session.active:  # Activate Session with another password: a failed login
                self.sessions.close(session.bmc_id)
                await self.record_login(session.user_name, address[0], False)
            return
        if session.active:
            if not session.inbound.accept(packet.sequence):
                return
        elif not (message.netfn == 0x06 and message.cmd == 0x3A):
            return  # only Activate Session on a session that is not active yet
        session.last_activity = time.monotonic()
        response = await self.run(session, message, address)
        # outbound numbers start with the Activate Session response (at the number the console
        # asked for); a refused activation and a closed session answer with 0
        sequence = session.next_outbound() if session.bmc_id in self.sessions.established else 0
        session_id = packet.session_id
        code = b""
        if session.auth_type != framing.AUTH_NONE:
            code = crypto.v15_auth_code(session.auth_type, session.password, struct.pack("<I", session_id),
                                        response, struct.pack("<I", sequence))
        self.send(framing.build_v15(session.auth_type, sequence, session_id, code, response), address)

    def v15_authentic(self, session: Session, packet: framing.V15Packet) -> bool:
        if session.auth_type == framing.AUTH_NONE:
            return True
        expected = crypto.v15_auth_code(session.auth_type, session.password, struct.pack("<I", packet.session_id),
                                        packet.message, struct.pack("<I", packet.sequence))
        return crypto.hmac_compare(expected, packet.auth_code)

    # ------------------------------------------------------------------ RMCP+

    async def handle_v20(self, body: bytes, address: tuple[str, int]) -> None:
        header = framing.parse_v20(body, 0)
        if header.session_id == 0:
            if header.payload_type == framing.PAYLOAD_OPEN_SESSION_REQUEST:
                await self.open_session(header.payload, address)
            elif header.payload_type == framing.PAYLOAD_RAKP1:
                await self.rakp1(header.payload, address)
            elif header.payload_type == framing.PAYLOAD_RAKP3:
                await self.rakp3(header.payload, address)
            elif header.payload_type == framing.PAYLOAD_IPMI and not header.authenticated:
                response = await self.run(None, framing.parse_lan_message(header.payload), address)
                self.send(framing.build_v20(framing.PAYLOAD_IPMI, 0, 0, response), address)
            return
        session = self.sessions.get(header.session_id)
        if session is None or not session.v2 or not session.active or session.keys is None:
            return
        keys = session.keys
        if keys.integrity != crypto.INTEGRITY_NONE:
            if not header.authenticated:
                return
            packet = framing.parse_v20(body, keys.integrity_length)
            if not keys.verify(packet.signed, packet.auth_code):
                log.warning("%s: RMCP+ packet with a bad integrity code from %s", self.machine, address)
                return
        else:
            packet = header
        if keys.confidentiality != crypto.CONFIDENTIALITY_NONE and not packet.encrypted:
            return
        payload = keys.decrypt(packet.payload) if packet.encrypted else packet.payload
        if payload is None or not session.inbound.accept(packet.sequence):
            return
        session.last_activity = time.monotonic()
        if packet.payload_type == framing.PAYLOAD_SOL:
            if self.sol is not None and self.sol.session is session:
                await self.sol.received(payload, address)
            return
        if packet.payload_type != framing.PAYLOAD_IPMI:
            return
        response = await self.run(session, framing.parse_lan_message(payload), address)
        self.send_v20(session, framing.PAYLOAD_IPMI, response, address)

    async def close(self) -> None:
        """The service stops: end SOL."""
        if self.sol is not None:
            await self.sol.stop()

    def send_v20(self, session: Session, payload_type: int, payload: bytes, address: tuple[str, int]) -> None:
        keys = session.keys
        assert keys is not None
        encrypted = keys.confidentiality != crypto.CONFIDENTIALITY_NONE
        integrity = (keys.integrity_length, keys.sign) if keys.integrity != crypto.INTEGRITY_NONE else None
        self.send(framing.build_v20(payload_type, session.console_id, session.next_outbound(),
                                    keys.encrypt(payload) if encrypted else payload, encrypted=encrypted,
                                    integrity=integrity), address)

    def send_unsessioned(self, payload_type: int, payload: bytes, address: tuple[str, int]) -> None:
        self.send(framing.build_v20(payload_type, 0, 0, payload), address)

    async def open_session(self, payload: bytes, address: tuple[str, int]) -> None:
        """RMCP+ Open Session Request → Response (IPMI v2.0 §13.17, §13.18): only the cipher suites
        ``[ipmi] cipher_suites`` enables, a session at most at the privilege LAN parameter 24 gives
        its suite. The session is pending (sessions.py) until RAKP 3 proves the password."""
        if len(payload) < 32:
            raise FrameError("short Open Session Request")
        tag, requested = payload[0], payload[1] & 0x0F
        console_id = payload[4:8]
        proposed = []
        for offset, kind in ((8, 0), (16, 1), (24, 2)):
            if payload[offset] != kind:
                return self.open_session_failure(tag, STATUS_ILLEGAL_PARAMETER, console_id, address)
            proposed.append(payload[offset + 4] & 0x3F)
        auth, integrity, confidentiality = proposed
        suites = self.cipher_suites
        if not any(algorithms[0] == auth for algorithms in suites.values()):
            return self.open_session_failure(tag, STATUS_INVALID_AUTH_ALGORITHM, console_id, address)
        suite = next((suite for suite, algorithms in suites.items() if list(algorithms) == proposed), None)
        if suite is None:
            status = STATUS_INVALID_INTEGRITY_ALGORITHM if not any(
                a[:2] == (auth, integrity) for a in suites.values()) else STATUS_INVALID_CONFIDENTIALITY_ALGORITHM
            return self.open_session_failure(tag, status, console_id, address)
        if requested > Privilege.OEM:
            return self.open_session_failure(tag, STATUS_INVALID_ROLE, console_id, address)
        try:
            channel, suite_limit = await asyncio.gather(self.channel_access(), self.suite_privilege_limit(suite))
            limit = Privilege(min(channel.privilege_limit, suite_limit)) if suite_limit else None
        except (BusError, ValueError) as exc:
            log.warning("%s: Open Session from %s refused: the state service cannot tell the limits (%s)",
                        self.machine, address, exc)
            return self.open_session_failure(tag, STATUS_NO_RESOURCES, console_id, address)
        if limit is None:  # parameter 24 marks the suite unused
            return self.open_session_failure(tag, STATUS_NO_CIPHER_SUITE_MATCH, console_id, address)
        session = self.sessions.open(struct.unpack("<I", console_id)[0], True, address)
        if session is None:
            return self.open_session_failure(tag, STATUS_NO_RESOURCES, console_id, address)
        session.keys = crypto.SessionKeys(auth, integrity, confidentiality)
        session.cipher_suite = suite
        session.max_privilege = Privilege(min(requested or limit, limit))
        response = bytes([tag, STATUS_OK, session.max_privilege, 0]) + console_id + struct.pack("<I", session.bmc_id)
        response += algorithm_payload(0, auth) + algorithm_payload(1, integrity) + algorithm_payload(2, confidentiality)
        self.send_unsessioned(framing.PAYLOAD_OPEN_SESSION_RESPONSE, response, address)

    def open_session_failure(self, tag: int, status: int, console_id: bytes, address: tuple[str, int]) -> None:
        self.send_unsessioned(framing.PAYLOAD_OPEN_SESSION_RESPONSE,
                              bytes([tag, status, 0, 0]) + console_id, address)

    async def rakp1(self, payload: bytes, address: tuple[str, int]) -> None:
        """RAKP Message 1 → 2 (IPMI v2.0 §13.20, §13.21). A user locked out from this source, unknown
        or disabled gets status 0x0D; a login the state service cannot check, 0x01 (no resources)."""
        if len(payload) < 28:
            raise FrameError("short RAKP 1")
        tag = payload[0]
        session = self.sessions.get(struct.unpack("<I", payload[4:8])[0])
        if session is None or not session.v2 or session.active or session.keys is None:
            return self.rakp_failure(framing.PAYLOAD_RAKP2, tag, STATUS_INVALID_SESSION, 0, address)
        console_id = struct.pack("<I", session.console_id)
        role, name_length = payload[24], payload[27]
        name = payload[28:28 + name_length]
        if name_length > 16 or len(name) != name_length:
            return self.rakp_failure(framing.PAYLOAD_RAKP2, tag, STATUS_INVALID_NAME_LENGTH, session, address)
        requested = Privilege(role & 0x0F) if role & 0x0F in (1, 2, 3, 4, 5) else None
        if requested is None:
            return self.rakp_failure(framing.PAYLOAD_RAKP2, tag, STATUS_INVALID_ROLE, session, address)
        source = address[0]
        for abandoned in self.sessions.sweep_abandoned(name):  # counted before this login is checked
            await self.record_login(name, abandoned.source, False)
            self.log_abandoned(abandoned)
        try:
            verdict, found, kg = await asyncio.gather(self.login_allowed(name, source), self.user(name), self.kg())
        except BusError as exc:
            log.warning("%s: RAKP 1 from %s for user %r refused: the login cannot be checked (%s)", self.machine,
                        address, _text(name), exc)
            return self.rakp_failure(framing.PAYLOAD_RAKP2, tag, STATUS_NO_RESOURCES, session, address)
        if not verdict.allowed:
            log.warning("%s: RAKP 1 from %s for user %r refused: locked out from there for %.0f s more",
                        self.machine, address, _text(name), verdict.retry_after)
            return self.rakp_failure(framing.PAYLOAD_RAKP2, tag, STATUS_UNAUTHORIZED_NAME, session, address)
        if found is None:
            log.warning("%s: RAKP 1 from %s for unknown or disabled user %r (or one that must change its "
                        "password)", self.machine, address, _text(name))
            self.sessions.close(session.bmc_id)
            await self.record_login(name, source, False)  # counted before the console hears of it
            return self.rakp_failure(framing.PAYLOAD_RAKP2, tag, STATUS_UNAUTHORIZED_NAME, session, address)
        credentials, limit = found
        if requested > limit or requested > session.max_privilege:
            return self.rakp_failure(framing.PAYLOAD_RAKP2, tag, STATUS_UNAUTHORIZED_ROLE, session, address)
        session.user_slot = credentials.user.slot
        session.user_name = name
        session.password = (credentials.password or "").encode()
        session.max_privilege = requested
        session.role = role
        session.kg = kg
        session.console_random = payload[8:24]
        session.bmc_random = os.urandom(16)
        session.last_activity = time.monotonic()
        code = session.keys.rakp2_code(session.password, console_id, struct.pack("<I", session.bmc_id),
                                       session.console_random, session.bmc_random, self.guid, role, name)
        message = bytes([tag, STATUS_OK, 0, 0]) + console_id + session.bmc_random + self.guid + code
        self.send_unsessioned(framing.PAYLOAD_RAKP2, message, address)

    async def rakp3(self, payload: bytes, address: tuple[str, int]) -> None:
        """RAKP Message 3 → 4 (IPMI v2.0 §13.22, §13.23): the console proves the password."""
        if len(payload) < 8:
            raise FrameError("short RAKP 3")
        tag, status = payload[0], payload[1]
        session = self.sessions.get(struct.unpack("<I", payload[4:8])[0])
        if session is None or not session.v2 or session.active or session.keys is None or not session.bmc_random:
            return self.rakp_failure(framing.PAYLOAD_RAKP4, tag, STATUS_INVALID_SESSION, 0, address)
        keys = session.keys
        if status != STATUS_OK:  # the console refused RAKP 2: it holds another password
            self.sessions.close(session.bmc_id)
            self.handshake_abandoned(session)
            return
        console_id = struct.pack("<I", session.console_id)
        if not keys.rakp3_valid(payload[8:], session.password, console_id, session.bmc_random, session.role,
                                session.user_name):
            log.warning("%s: failed RMCP+ login of user %r from %s (wrong password)", self.machine,
                        _text(session.user_name), address)
            self.sessions.close(session.bmc_id)
            await self.record_login(session.user_name, address[0], False)  # counted before the console hears
            return self.rakp_failure(framing.PAYLOAD_RAKP4, tag, STATUS_INVALID_INTEGRITY_CHECK, session, address)
        if not self.sessions.establish(session):
            return self.rakp_failure(framing.PAYLOAD_RAKP4, tag, STATUS_NO_RESOURCES, session, address)
        keys.derive(session.kg or session.password, session.console_random, session.bmc_random, session.role,
                    session.user_name)
        session.privilege = session.max_privilege
        code = keys.rakp4_code(session.console_random, struct.pack("<I", session.bmc_id), self.guid)
        self.send_unsessioned(framing.PAYLOAD_RAKP4, bytes([tag, STATUS_OK, 0, 0]) + console_id + code, address)
        log.info("%s: RMCP+ session for user %r from %s (cipher suite %d)", self.machine, _text(session.user_name),
                 address, session.cipher_suite)
        self.in_background(self.record_login(session.user_name, address[0], True))

    def handshake_abandoned(self, session: Session) -> None:
        """A console gave up after RAKP 2 (real consoles do when its code shows another password):
        a failed login."""
        self.log_abandoned(session)
        self.in_background(self.record_login(session.user_name, session.source, False))

    def log_abandoned(self, session: Session) -> None:
        log.warning("%s: failed RMCP+ login of user %r from %s (handshake given up after RAKP 2)", self.machine,
                    _text(session.user_name), session.source)

    def rakp_failure(self, payload_type: int, tag: int, status: int, session: Session | int,
                     address: tuple[str, int]) -> None:
        console_id = struct.pack("<I", session.console_id) if isinstance(session, Session) else bytes(4)
        if isinstance(session, Session) and status != STATUS_OK:
            self.sessions.close(session.bmc_id)
        self.send_unsessioned(payload_type, bytes([tag, status, 0, 0]) + console_id, address)


def _text(name: bytes) -> str:
    """A user name as the state service and the logs know it."""
    return name.decode("ascii", "replace")


def algorithm_payload(kind: int, algorithm: int) -> bytes:
    """An authentication/integrity/confidentiality algorithm record of Open Session (§13.17)."""
    return bytes([kind, 0, 0, 8, algorithm, 0, 0, 0])
