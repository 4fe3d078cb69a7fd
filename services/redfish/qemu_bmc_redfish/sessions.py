"""Redfish sessions (DSP0266 §13.3.4 "Session login", SessionService and Session schemas).

A session is made by POSTing a user name and password to the Sessions collection: the password
is checked on every machine on the bus, and the session remembers its user and the machines
(with the user's slot on each) where it worked. Its token, sent back in ``X-Auth-Token``, then
stands for those credentials on those machines; the user's role is still read from the machine's
users at each request (see ``auth.Authenticator.token_login``), so a user disabled, removed or
demoted since loses its access: at once for a request that changes something (its login reads
through), as soon as the state service's announcement arrives for one that only reads.

Sessions live in a JetStream key-value bucket, so that any replica of the Redfish service accepts
a token another one made. One key per session::

    s.<first 16 hex digits of sha256(token)>.<the other 48 digits>  →  SessionRecord (JSON)

The token is never stored, only its hash: a request's token gives its key at once (one read);
the Session Id is the first 16 hex digits of the hash (a session's URI is looked up by the key's
first part), which tells nothing about the token. ``last_used`` is written back at most every
``touch_interval`` seconds (30 s, less for short time-outs); a session not used for
``SessionTimeout`` seconds is expired and removed at its next use. The bucket's ``max_age`` (two
days, more than the longest time-out) removes the sessions nobody ends.

Each replica keeps what it read for a few seconds (token hash → record), and forgets a session
as soon as any replica deletes it (it listens to the bucket's delete markers).

A session ends when its user's password changes (except the session that changed it), or the
user is disabled, deleted or renamed on all of its machines (auth.py). At most ``[redfish]
max_sessions`` sessions are open at once, and ``max_sessions_per_user`` of one user: beyond, a
login gets 503 SessionLimitExceeded (counted over the bucket at each login, so replicas logging in
at the same moment may pass it by one).

A user that must change its password (see auth.py) still gets a session, whose body carries the
PasswordChangeRequired message in ``@Message.ExtendedInfo``; with it, it may log out, nothing else
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from qemu_bmc_shared.bus import key_value, stored_keys

from .auth import CHALLENGE, Login, account_path, refuse_until_password_changed, source_of
from .errors import RedfishError, message, not_found
from .resources import ENABLED, Redfish, collection, json_body, json_response, link

BUCKET = "qemu_bmc_redfish_sessions"
MAX_AGE = 2 * 86400.0
"""Seconds the bucket keeps a session not written since (more than the longest SessionTimeout)."""
CACHE_SECONDS = 3.0
MAX_CACHED = 4096
TOUCH_INTERVAL = 30.0
SESSION_ID = re.compile(r"^[0-9a-f]{16}$")
SERVICE_PATH = "/redfish/v1/SessionService"
SESSIONS_PATH = f"{SERVICE_PATH}/Sessions"


class SessionRecord(msgspec.Struct):
    """A session as stored (never with its token)."""

    id: str
    token_sha256: str
    user: str
    machines: dict[str, int]
    """The machines the session logs in to, with the user's slot on each."""
    created: float
    last_used: float
    context: str | None = None
    password_changes: dict[str, int] = {}
    """The user's password version on each machine at login."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_of(hashed: str) -> str:
    return f"s.{hashed[:16]}.{hashed[16:]}"


class SessionStore:
    """The sessions in the JetStream bucket, with a short cache of the lookups.

    ``clock`` gives the wall-clock time (seconds since 1970: every replica must agree on it);
    tests give a fake one."""

    def __init__(self, nc: Client, timeout: float, clock: Callable[[], float] = time.time,
                 cache_seconds: float = CACHE_SECONDS) -> None:
        self.nc, self.timeout, self.clock, self.cache_seconds = nc, timeout, clock, cache_seconds
        self.cache: dict[str, tuple[float, SessionRecord, int]] = {}
        """Token hash → (when read, time.monotonic(); the record; its revision)."""
        self._kv: KeyValue | None = None
        self._subscription: Subscription | None = None
        self._lock = asyncio.Lock()

    @property
    def touch_interval(self) -> float:
        """How stale ``last_used`` may be: 30 s, a tenth of shorter time-outs."""
        return min(TOUCH_INTERVAL, self.timeout / 10)

    async def bucket(self) -> KeyValue:
        """The bucket (made when absent), and the subscription that forgets deleted sessions."""
        if self._kv is not None:
            return self._kv
        async with self._lock:
            if self._kv is None:
                kv = await key_value(self.nc, BUCKET, "qemu-bmc Redfish sessions", ttl=MAX_AGE)
                self._subscription = await self.nc.subscribe(f"$KV.{BUCKET}.s.>", cb=self._changed)
                self._kv = kv
        return self._kv

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _changed(self, message: Msg) -> None:
        """A session was written or deleted (by any replica): deleted ones are forgotten at once."""
        operation = (message.headers or {}).get("KV-Operation")
        if operation in ("DEL", "PURGE"):
            parts = message.subject.split(".")
            if len(parts) == 5:
                self.cache.pop(parts[3] + parts[4], None)

    def _remember(self, record: SessionRecord, revision: int) -> None:
        if len(self.cache) >= MAX_CACHED:
            self.cache.clear()
        self.cache[record.token_sha256] = (time.monotonic(), record, revision)

    async def create(self, user: str, machines: dict[str, int], context: str | None = None,
                     password_changes: dict[str, int] | None = None) -> tuple[str, SessionRecord]:
        """A new session of ``user`` on ``machines`` (with its slot on each, and its password
        version): its token (given out once, never stored) and its record."""
        kv = await self.bucket()
        while True:
            token = secrets.token_hex(32)
            hashed = token_hash(token)
            now = self.clock()
            record = SessionRecord(id=hashed[:16], token_sha256=hashed, user=user, machines=dict(machines),
                                   created=now, last_used=now, context=context,
                                   password_changes=dict(password_changes or {}))
            try:
                revision = await kv.create(key_of(hashed), msgspec.json.encode(record))
            except KeyWrongLastSequenceError:  # the same first 16 digits: draw again
                continue
            self._remember(record, revision)
            return token, record

    async def _read(self, key: str) -> tuple[SessionRecord, int] | None:
        kv = await self.bucket()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return msgspec.json.decode(entry.value, type=SessionRecord), entry.revision or 0

    def expired(self, record: SessionRecord) -> bool:
        return self.clock() - record.last_used > self.timeout

    async def lookup(self, token: str, fresh: bool = False) -> SessionRecord | None:
        """The live session of ``token`` (None: no such session, ended or expired); using it
        counts as activity. ``fresh``: read from the bucket, not from what this replica kept."""
        hashed = token_hash(token)
        key = key_of(hashed)
        cached = self.cache.get(hashed)
        if (not fresh and cached is not None and time.monotonic() - cached[0] < self.cache_seconds
                and not self.expired(cached[1])):
            record, revision = cached[1], cached[2]
        else:
            self.cache.pop(hashed, None)
            found = await self._read(key)
            if found is None:
                return None
            record, revision = found
            if self.expired(record):
                await self._delete(key, hashed)
                return None
            self._remember(record, revision)
        if self.clock() - record.last_used >= self.touch_interval:
            record = await self._touch(key, record, revision)
        return record

    async def _touch(self, key: str, record: SessionRecord, revision: int) -> SessionRecord | None:
        """Write back ``last_used`` (only over the revision read: an ended session stays ended;
        when another replica wrote first, its record is as good)."""
        kv = await self.bucket()
        touched = msgspec.structs.replace(record, last_used=self.clock())
        try:
            written = await kv.update(key, msgspec.json.encode(touched), last=revision)
        except KeyWrongLastSequenceError:
            self.cache.pop(record.token_sha256, None)
            found = await self._read(key)
            if found is None or self.expired(found[0]):
                return None
            self._remember(*found)
            return found[0]
        self._remember(touched, written)
        return touched

    async def _delete(self, key: str, hashed: str) -> None:
        self.cache.pop(hashed, None)
        kv = await self.bucket()
        await kv.delete(key)

    async def get(self, session_id: str) -> SessionRecord | None:
        """The live session with this Id (not counting as activity)."""
        if not SESSION_ID.match(session_id):
            return None
        for key in await self._keys(f"s.{session_id}.*"):
            found = await self._read(key)
            if found is not None:
                record = found[0]
                if self.expired(record):
                    await self._delete(key, record.token_sha256)
                    return None
                return record
        return None

    async def all(self) -> list[SessionRecord]:
        """Every live session (the expired ones found are removed)."""
        records = []
        for key in await self._keys("s.>"):
            found = await self._read(key)
            if found is None:
                continue
            if self.expired(found[0]):
                await self._delete(key, found[0].token_sha256)
            else:
                records.append(found[0])
        return sorted(records, key=lambda record: record.created)

    async def full(self, user: str, total: int, per_user: int) -> bool:
        """Are ``total`` sessions open, or ``per_user`` of ``user``? (Records are read only when
        there are as many keys as a user may have.)"""
        keys = await self._keys("s.>")
        if len(keys) < min(total, per_user):
            return False
        live = await self.all()
        return len(live) >= total or sum(record.user == user for record in live) >= per_user

    async def keep_after_password_change(self, session_id: str, password_changes: dict[str, int]) -> None:
        """The session that changed its own user's password goes on with the new one."""
        record = await self.get(session_id)
        if record is not None:
            kept = msgspec.structs.replace(record, password_changes={**record.password_changes, **password_changes})
            await (await self.bucket()).put(key_of(record.token_sha256), msgspec.json.encode(kept))
            self.cache.pop(record.token_sha256, None)

    async def delete(self, record: SessionRecord) -> None:
        """End a session: its token stops working on every replica."""
        await self._delete(key_of(record.token_sha256), record.token_sha256)

    async def _keys(self, pattern: str) -> list[str]:
        await self.bucket()
        return await stored_keys(self.nc, BUCKET, pattern)


def session_path(session_id: str) -> str:
    return f"{SESSIONS_PATH}/{session_id}"


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def session_body(record: SessionRecord) -> dict[str, Any]:
    body = {"@odata.id": session_path(record.id), "@odata.type": "#Session.v1_8_0.Session",
            "Id": record.id, "Name": f"Session of {record.user}", "UserName": record.user,
            "SessionType": "Redfish", "CreatedTime": iso_time(record.created)}
    if record.context is not None:
        body["Context"] = record.context
    return body


def register(app: FastAPI, redfish: Redfish) -> None:
    limits = redfish.config.redfish
    store = SessionStore(redfish.nc, limits.session_timeout)
    redfish.auth.sessions = store

    async def logins(request: Request, password_change: bool = False) -> dict[str, Login]:
        return await redfish.auth.login(request, await redfish.machines.list(), password_change)

    def owns(record: SessionRecord, logins: dict[str, Login]) -> bool:
        """The same session, or the same user on one of its machines."""
        return any(login.session == record.id for login in logins.values()) or \
            any(logins.get(machine) and logins[machine].user == record.user for machine in record.machines)

    def may_see(record: SessionRecord, logins: dict[str, Login]) -> bool:
        """Its owner, or an Administrator of all its machines."""
        return owns(record, logins) or \
            all(machine in logins and logins[machine].role == "Administrator" for machine in record.machines)

    async def visible(request: Request, session_id: str, logging_out: bool = False) -> SessionRecord:
        """The session, if the caller may see it (``logging_out``: or end it, which a user that must
        change its password may do to its own sessions)."""
        caller = await logins(request, logging_out)
        record = await store.get(session_id)
        if logging_out and (record is None or not owns(record, caller)):
            refuse_until_password_changed(caller)
        if record is None:
            raise not_found("Session", session_id)
        if not may_see(record, caller):
            raise RedfishError(403, "InsufficientPrivilege")
        return record

    @app.get(SERVICE_PATH)
    async def session_service(request: Request) -> Response:
        await redfish.login(request)
        return json_response({
            "@odata.id": SERVICE_PATH, "@odata.type": "#SessionService.v1_2_0.SessionService",
            "Id": "SessionService", "Name": "Session service", "ServiceEnabled": True,
            "SessionTimeout": store.timeout, "Status": ENABLED,
            "Sessions": link(SESSIONS_PATH),
            "Oem": {"QemuBmc": {"@odata.type": "#QemuBmcSessionService.v1_0_0.SessionService",
                                "MaxSessions": limits.max_sessions,
                                "MaxSessionsPerUser": limits.max_sessions_per_user}}})

    @app.get(SESSIONS_PATH)
    async def sessions(request: Request) -> Response:
        """The caller's own sessions, and those of all whose machines it administers."""
        caller = await logins(request)
        members = [record for record in await store.all() if may_see(record, caller)]
        return json_response(collection(SESSIONS_PATH, "SessionCollection", "Sessions",
                                        [session_path(record.id) for record in members]))

    @app.post(SESSIONS_PATH)
    @app.post(f"{SESSIONS_PATH}/Members")  # a POST to the collection's Members property creates too (§9.9)
    async def login(request: Request) -> Response:
        """Session login (no authentication needed): 201 with the token in X-Auth-Token, or 401
        when the credentials log in to no machine on the bus."""
        body = await json_body(request)
        for required in ("UserName", "Password"):
            if required not in body:
                raise RedfishError(400, "CreateFailedMissingReqProperties", required)
        for key, value in body.items():
            if key not in ("UserName", "Password", "Context"):
                raise RedfishError(400, "PropertyUnknown", key)
            if not isinstance(value, str):
                raise RedfishError(400, "PropertyValueTypeError", "******" if key == "Password" else value, key)
        name, password = body["UserName"], body["Password"]
        if not name or len(name.encode()) > 16 or len(password.encode()) > 20:
            raise RedfishError(401, "NoValidSession", headers=CHALLENGE)
        machines = await redfish.machines.list()
        source = source_of(request)
        checked = await asyncio.gather(*(redfish.auth.check(machine, name, password, source, fresh=True)
                                       for machine in machines))
        granted = {machine: login for machine, login in zip(machines, checked, strict=True) if login}
        if not granted:
            raise RedfishError(401, "NoValidSession", headers=CHALLENGE)
        if await store.full(name, limits.max_sessions, limits.max_sessions_per_user):
            raise RedfishError(503, "SessionLimitExceeded")
        token, record = await store.create(name, {machine: login.slot for machine, login in granted.items()},
                                           body.get("Context"),
                                           {machine: login.password_changes for machine, login in granted.items()})
        created = session_body(record)
        if any(login.password_change_required for login in granted.values()):
            created["@Message.ExtendedInfo"] = [message("PasswordChangeRequired", account_path(name))]
        return json_response(created, 201, headers={"X-Auth-Token": token, "Location": session_path(record.id)})

    @app.get(SESSIONS_PATH + "/{session_id}")
    async def session(request: Request, session_id: str) -> Response:
        return json_response(session_body(await visible(request, session_id)))

    @app.delete(SESSIONS_PATH + "/{session_id}")
    async def logout(request: Request, session_id: str) -> Response:
        """Log out: by the session's owner or an Administrator of its machines."""
        record = await visible(request, session_id, logging_out=True)
        await store.delete(record)
        return Response(status_code=204)
