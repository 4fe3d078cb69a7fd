"""Login lockout, counted per (machine, user name, source address).

A real BMC locks an account after a few failed logins (Redfish AccountService
``AccountLockoutThreshold``); counted per user alone, that lets anyone who can send a few bogus
logins lock the administrator out for everyone. Here a lockout holds only for the source that
failed: the administrator logging in from elsewhere does not see it. While locked, attempts
from that source are refused unchecked and do not extend the lockout; each further lockout of
the same (user, source) with no success between lasts twice as long as the one before, up to
``MAX_DOUBLINGS`` doublings.

The counts live in this service's memory, for every front-end (Redfish, IPMI over LAN, every
replica) at once; a restart of the state service forgets them, as a BMC's reboot does.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from qemu_bmc_shared.messages import AccountPolicy, LoginVerdict

MAX_DOUBLINGS = 4
MAX_TRACKED = 10_000
"""(machine, name, source) entries kept at most; the least recently failed go first."""

Key = tuple[str, str, str]


@dataclass
class Failures:
    count: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0
    lockouts: int = 0


class Lockout:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.entries: OrderedDict[Key, Failures] = OrderedDict()

    def verdict(self, machine: str, name: str, source: str | None) -> LoginVerdict:
        """May ``name`` log in from ``source`` now (no source: is it locked out from none)?"""
        now = self.clock()
        if source is None:
            waits = [entry.locked_until - now for (m, n, _), entry in self.entries.items() if (m, n) == (machine, name)]
        else:
            entry = self.entries.get((machine, name, source))
            waits = [entry.locked_until - now] if entry else []
        wait = max(waits, default=0.0)
        return LoginVerdict(allowed=wait <= 0, retry_after=max(wait, 0.0))

    def record(self, machine: str, name: str, source: str, ok: bool, policy: AccountPolicy
               ) -> tuple[LoginVerdict, bool]:
        """Count one login's outcome: the verdict for the next attempt, and whether this failure
        started a lockout."""
        key = (machine, name, source)
        if ok:
            self.entries.pop(key, None)
            return LoginVerdict(allowed=True), False
        now = self.clock()
        entry = self.entries.pop(key, None) or Failures()
        self.entries[key] = entry  # the most recent failure last
        while len(self.entries) > MAX_TRACKED:
            self.entries.popitem(last=False)
        if entry.locked_until > now:  # refused unchecked: it does not count
            return LoginVerdict(allowed=False, retry_after=entry.locked_until - now), False
        if now - entry.last_failure > policy.lockout_reset_after:
            entry.count = 0
        entry.count += 1
        entry.last_failure = now
        if policy.lockout_threshold and entry.count >= policy.lockout_threshold:
            entry.locked_until = now + policy.lockout_duration * 2 ** min(entry.lockouts, MAX_DOUBLINGS)
            entry.lockouts += 1
            entry.count = 0
            return LoginVerdict(allowed=False, retry_after=entry.locked_until - now), True
        return LoginVerdict(allowed=True), False

    def unlock(self, machine: str, name: str) -> None:
        for key in [key for key in self.entries if key[:2] == (machine, name)]:
            del self.entries[key]
