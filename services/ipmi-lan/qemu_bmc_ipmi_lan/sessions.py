"""LAN sessions: a bounded table with idle expiry, sequence windows and login lockout."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qemu_bmc_shared.ipmi import Privilege, Response

from .crypto import SessionKeys

SEQUENCE_WINDOW = 16
#: A session still being opened (Open Session, RAKP, Get Session Challenge) is dropped after this long.
PENDING_TIMEOUT = 10.0
#: A console answers RAKP 2 with RAKP 3 within milliseconds; one that has not after this long has
#: given up, which real consoles do when RAKP 2 shows that they hold another password.
ABANDONED_AFTER = 1.0
#: Login failures are remembered for at most this many user names.
MAX_TRACKED_NAMES = 1024


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
    handle: int
    v2: bool
    address: tuple[str, int]
    max_privilege: Privilege = Privilege.ADMINISTRATOR
    privilege: Privilege = Privilege.USER
    active: bool = False
    user_slot: int | None = None
    user_name: bytes = b""
    password: bytes = b""
    # RMCP+
    keys: SessionKeys | None = None
    console_random: bytes = b""
    bmc_random: bytes = b""
    role: int = 0
    kg: bytes | None = None
    # IPMI 1.5
    auth_type: int = 0
    challenge: bytes = b""
    inbound: SequenceWindow = field(default_factory=SequenceWindow)
    outbound: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    running: dict[tuple[int, int, int, bytes], asyncio.Future[Response]] = field(default_factory=dict)
    """The requests under way, by (netfn, cmd, LUN, data): a console's retry of one joins it."""

    def next_outbound(self) -> int:
        self.outbound = (self.outbound + 1) & 0xFFFFFFFF or 1
        return self.outbound


class SessionTable:
    """At most ``capacity`` sessions (pending ones included); idle ones expire after ``timeout`` s.
    ``on_abandoned`` hears of each RMCP+ handshake dropped after RAKP 2 (a failed login)."""

    def __init__(self, capacity: int = 32, timeout: float = 60.0,
                 on_abandoned: Callable[[Session], None] | None = None) -> None:
        self.capacity = capacity
        self.timeout = timeout
        self.on_abandoned = on_abandoned
        self.sessions: dict[int, Session] = {}

    def expire(self) -> None:
        now = time.monotonic()
        for bmc_id in [bmc_id for bmc_id, session in self.sessions.items() if self._expired(session, now)]:
            self._drop(bmc_id)

    def sweep_abandoned(self, name: bytes) -> None:
        """Drop the handshakes of ``name`` that got RAKP 2 and were given up."""
        before = time.monotonic() - ABANDONED_AFTER
        for session in list(self.sessions.values()):
            if not session.active and session.bmc_random and session.user_name == name \
                    and session.last_activity < before:
                self._drop(session.bmc_id)

    def _drop(self, bmc_id: int) -> None:
        session = self.sessions.pop(bmc_id)
        if not session.active and session.bmc_random and self.on_abandoned is not None:
            self.on_abandoned(session)

    def _expired(self, session: Session, now: float) -> bool:
        return session.last_activity < now - (self.timeout if session.active else min(self.timeout, PENDING_TIMEOUT))

    def open(self, console_id: int, v2: bool, address: tuple[str, int]) -> Session | None:
        """A new session, or None when the table is full."""
        self.expire()
        if len(self.sessions) >= self.capacity:
            return None
        bmc_id = 0
        while bmc_id == 0 or bmc_id in self.sessions:
            bmc_id = secrets.randbits(32)
        used = {session.handle for session in self.sessions.values()}
        handle = next(number for number in range(1, 256) if number not in used)
        session = Session(bmc_id=bmc_id, console_id=console_id, handle=handle, v2=v2, address=address)
        self.sessions[bmc_id] = session
        return session

    def get(self, bmc_id: int) -> Session | None:
        session = self.sessions.get(bmc_id)
        if session is None:
            return None
        if self._expired(session, time.monotonic()):
            self._drop(bmc_id)
            return None
        return session

    def close(self, bmc_id: int) -> bool:
        return self.sessions.pop(bmc_id, None) is not None

    def clear(self) -> None:
        self.sessions.clear()

    @property
    def active(self) -> list[Session]:
        return [session for session in self.sessions.values() if session.active]


class LoginGuard:
    """Locks a user name out for ``lockout`` seconds after ``failures`` failed logins within ``window``."""

    def __init__(self, failures: int = 5, window: float = 30.0, lockout: float = 60.0) -> None:
        self.failures, self.window, self.lockout = failures, window, lockout
        self.attempts: dict[bytes, deque[float]] = defaultdict(deque)
        self.locked_until: dict[bytes, float] = {}

    def locked(self, name: bytes) -> bool:
        return self.locked_until.get(name, 0.0) > time.monotonic()

    def failed(self, name: bytes) -> bool:
        """Record a failure; True when it locks the name out."""
        now = time.monotonic()
        if name not in self.attempts and len(self.attempts) >= MAX_TRACKED_NAMES:
            del self.attempts[next(iter(self.attempts))]
        self.locked_until = {locked: until for locked, until in self.locked_until.items() if until > now}
        attempts = self.attempts[name]
        attempts.append(now)
        while attempts and attempts[0] < now - self.window:
            attempts.popleft()
        if len(attempts) >= self.failures:
            self.locked_until[name] = now + self.lockout
            attempts.clear()
            return True
        return False

    def succeeded(self, name: bytes) -> None:
        self.attempts.pop(name, None)

