"""LAN sessions: established sessions in a bounded table with idle expiry, handshakes still being
opened in their own small table with a per-source quota, and sequence windows.

A session is *pending* from Open Session (RMCP+) or Get Session Challenge (IPMI 1.5) until RAKP 3
or Activate Session proves the password: anyone who can send a datagram can make one, so pending
sessions never take a place of the established ones (``capacity``, ``[ipmi] max_sessions``). They
live ``PENDING_LIFE`` seconds at most, each source address holds at most ``PENDING_PER_SOURCE`` of
them (a source over its quota loses its own oldest one) and the table at most ``PENDING_CAPACITY``
(when it is full, the source holding the most loses its oldest): a flood from one address only
ever evicts that address's own handshakes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from qemu_bmc_shared.ipmi import Privilege, Response

from .crypto import SessionKeys

SEQUENCE_WINDOW = 16
#: A handshake not finished after this long is dropped: a real console answers within milliseconds.
PENDING_LIFE = 5.0
#: Handshakes under way from one source address at most (ipmitool and FreeIPMI open one at a time).
PENDING_PER_SOURCE = 4
#: Handshakes under way at most, from every source together.
PENDING_CAPACITY = 64
#: A console answers RAKP 2 with RAKP 3 within milliseconds; one that has not after this long has
#: given up, which real consoles do when RAKP 2 shows that they hold another password.
ABANDONED_AFTER = 1.0


class SequenceWindow:
    """Accepts each inbound sequence number once, up to 16 behind the highest seen and any number
    ahead within 16 (IPMI v2.0 §6.12.13): replays and stale packets are refused."""

    def __init__(self) -> None:
        self.highest = 0
        self.seen: set[int] = set()

    def accept(self, sequence: int) -> bool:
        if sequence == 0:
            return False
        if self.highest and not (self.highest - SEQUENCE_WINDOW < sequence <= self.highest + SEQUENCE_WINDOW):
            return False
        if sequence in self.seen:
            return False
        self.seen.add(sequence)
        self.highest = max(self.highest, sequence)
        self.seen = {seen for seen in self.seen if seen > self.highest - SEQUENCE_WINDOW}
        return True


@dataclass
class Session:
    bmc_id: int
    console_id: int
    v2: bool
    address: tuple[str, int]
    handle: int = 0
    """The session handle (§22.20), given when the session is established."""
    max_privilege: Privilege = Privilege.ADMINISTRATOR
    privilege: Privilege = Privilege.USER
    active: bool = False
    user_slot: int | None = None
    user_name: bytes = b""
    password: bytes = b""
    # RMCP+
    keys: SessionKeys | None = None
    cipher_suite: int | None = None
    console_random: bytes = b""
    bmc_random: bytes = b""
    role: int = 0
    kg: bytes | None = None
    # IPMI 1.5
    auth_type: int = 0
    challenge: bytes = b""
    inbound: SequenceWindow = field(default_factory=SequenceWindow)
    outbound: int = 0
    opened: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    running: dict[tuple[int, int, int, bytes], asyncio.Future[Response]] = field(default_factory=dict)
    """The requests under way, by (netfn, cmd, LUN, data): a console's retry of one joins it."""

    @property
    def source(self) -> str:
        return self.address[0]

    def next_outbound(self) -> int:
        self.outbound = (self.outbound + 1) & 0xFFFFFFFF or 1
        return self.outbound


class SessionTable:
    """At most ``capacity`` established sessions, idle ones expire after ``timeout`` s; handshakes
    under way apart (see the module). ``on_abandoned`` hears of each RMCP+ handshake dropped after
    RAKP 2 without an answer (a failed login)."""

    def __init__(self, capacity: int = 32, timeout: float = 60.0,
                 on_abandoned: Callable[[Session], None] | None = None) -> None:
        self.capacity = capacity
        self.timeout = timeout
        self.on_abandoned = on_abandoned
        self.established: dict[int, Session] = {}
        self.pending: dict[int, Session] = {}

    def expire(self) -> None:
        now = time.monotonic()
        for bmc_id in [bmc_id for bmc_id, session in self.established.items() if self._expired(session, now)]:
            del self.established[bmc_id]
        for bmc_id in [bmc_id for bmc_id, session in self.pending.items() if self._expired(session, now)]:
            self._drop_pending(bmc_id)

    def sweep_abandoned(self, name: bytes) -> list[Session]:
        """Drop the handshakes of ``name`` that got RAKP 2 and were given up; they are returned, not
        told to ``on_abandoned``."""
        before = time.monotonic() - ABANDONED_AFTER
        abandoned = [session for session in self.pending.values()
                     if session.bmc_random and session.user_name == name and session.last_activity < before]
        for session in abandoned:
            del self.pending[session.bmc_id]
        return abandoned

    def _drop_pending(self, bmc_id: int) -> None:
        session = self.pending.pop(bmc_id)
        if session.bmc_random and self.on_abandoned is not None:
            self.on_abandoned(session)

    def _expired(self, session: Session, now: float) -> bool:
        if session.active:
            return session.last_activity < now - self.timeout
        return session.opened < now - min(self.timeout, PENDING_LIFE)

    def open(self, console_id: int, v2: bool, address: tuple[str, int]) -> Session | None:
        """A new pending session, or None when the established sessions fill the table (this
        handshake could not end in a session)."""
        self.expire()
        if len(self.established) >= self.capacity:
            return None
        mine = [session for session in self.pending.values() if session.source == address[0]]
        if len(mine) >= PENDING_PER_SOURCE:
            self._drop_pending(min(mine, key=lambda session: session.opened).bmc_id)
        elif len(self.pending) >= PENDING_CAPACITY:
            busiest, _ = Counter(session.source for session in self.pending.values()).most_common(1)[0]
            self._drop_pending(min((session for session in self.pending.values() if session.source == busiest),
                                   key=lambda session: session.opened).bmc_id)
        bmc_id = 0
        while bmc_id == 0 or bmc_id in self.pending or bmc_id in self.established:
            bmc_id = secrets.randbits(32)
        session = Session(bmc_id=bmc_id, console_id=console_id, v2=v2, address=address)
        self.pending[bmc_id] = session
        return session

    def establish(self, session: Session) -> bool:
        """The handshake proved the password: the session becomes established (with a handle),
        unless the established sessions fill the table meanwhile (False; it is dropped)."""
        self.expire()
        if self.pending.pop(session.bmc_id, None) is None:
            return False
        if len(self.established) >= self.capacity:
            return False
        used = {other.handle for other in self.established.values()}
        session.handle = next(number for number in range(1, 256) if number not in used)
        session.active = True
        session.last_activity = time.monotonic()
        self.established[session.bmc_id] = session
        return True

    def get(self, bmc_id: int) -> Session | None:
        session = self.established.get(bmc_id) or self.pending.get(bmc_id)
        if session is None:
            return None
        if self._expired(session, time.monotonic()):
            if session.active:
                del self.established[bmc_id]
            else:
                self._drop_pending(bmc_id)
            return None
        return session

    def close(self, bmc_id: int) -> bool:
        """Drop a session (established or pending) without hearing of it as abandoned."""
        return (self.established.pop(bmc_id, None) or self.pending.pop(bmc_id, None)) is not None

    def clear(self) -> None:
        self.established.clear()
        self.pending.clear()

    @property
    def active(self) -> list[Session]:
        return list(self.established.values())
