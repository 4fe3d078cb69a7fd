"""Who asks: a session token (``X-Auth-Token``, see sessions.py) or HTTP Basic credentials, checked
against the machine's users in the state service, the same users IPMI has; the user's IPMI
privilege on the LAN channel is its Redfish role (4 Administrator, 3 Operator, 2 ReadOnly).

A user that must change its password (ManagerAccount PasswordChangeRequired, DSP0266 §13
"Password change required handling") logs in, but every request it makes is 403 with the Base
registry's PasswordChangeRequired message, except on the few routes that ask
:meth:`Authenticator.login` for ``password_change=True``: the session login, a GET of its own
account, a PATCH of its own Password, and its logout. Those routes call
:func:`refuse_until_password_changed` for what else they serve.

Failed logins count towards the account lockout of the machine's state service (AccountService
``AccountLockoutThreshold``), per user name and client address: a password is checked there with
the client's address each time (only successful checks are kept here, for a few seconds), and a
user locked out from an address gets 401 from it as for a wrong password."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from nats.aio.client import Client
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.ipmi.core import LAN_CHANNEL, StateReads
from qemu_bmc_shared.messages import PasswordCheck, PasswordCheckResult, User, UserRef
from starlette.requests import HTTPConnection

from .errors import RedfishError

if TYPE_CHECKING:
    from .sessions import SessionStore

ROLES = {4: "Administrator", 3: "Operator", 2: "ReadOnly"}
ROLE_PRIVILEGES = {role: privilege for privilege, role in ROLES.items()}
#: Redfish privileges (DSP0266 §13.3, the Base privilege registry DSP8011) of each role.
PRIVILEGES = {"ReadOnly": {"Login", "ConfigureSelf"},
              "Operator": {"Login", "ConfigureComponents", "ConfigureSelf"},
              "Administrator": {"Login", "ConfigureComponents", "ConfigureSelf", "ConfigureManager",
                                "ConfigureUsers"}}
CHALLENGE = {"WWW-Authenticate": 'Basic realm="qemu-bmc"'}
TOKEN_HEADER = "x-auth-token"
ACCOUNTS_PATH = "/redfish/v1/AccountService/Accounts"


@dataclass(frozen=True)
class Login:
    user: str
    role: str
    slot: int = 0
    """The user's slot on the machine (0: not known)."""
    session: str | None = None
    """The Id of the Redfish session the request came with (None: Basic credentials)."""
    password_change_required: bool = False
    """The user must change its password before anything else."""
    password_changes: int = 0
    """The user's password version when it logged in (a session ends when it changes)."""

    def require(self, privilege: str) -> None:
        if privilege not in PRIVILEGES[self.role]:
            raise RedfishError(403, "InsufficientPrivilege")


def role_of(user: User) -> str | None:
    """The Redfish role of an enabled user from its LAN channel privilege (5, OEM, counts as
    Administrator), None for a disabled user or one with no role (callback, no access)."""
    access = user.channels.get(LAN_CHANNEL)
    if not user.enabled or access is None or not 2 <= access.privilege <= 5:
        return None
    return ROLES[min(access.privilege, 4)]


def no_session() -> RedfishError:
    return RedfishError(401, "NoValidSession", headers=CHALLENGE)


def source_of(connection: HTTPConnection) -> str:
    """The client's address, to which a lockout applies."""
    return connection.client.host if connection.client is not None else "unknown"


#: Methods that change nothing: their logins may use what a replica kept (a change of a user
#: reaches every replica a moment after it is acknowledged); any other request reads through.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def changes_state(connection: HTTPConnection) -> bool:
    """Whether the request may change something (a WebSocket console types into the machine)."""
    return connection.scope["type"] != "http" or connection.scope["method"] not in SAFE_METHODS


def account_path(name: str) -> str:
    return f"{ACCOUNTS_PATH}/{quote(name, safe='')}"


def refuse_until_password_changed(logins: Mapping[str, Login]) -> None:
    """403 PasswordChangeRequired (with the account to PATCH) when the caller must change its
    password on any of the machines it logs in to (its account as a whole then requires it)."""
    due = next((login for login in logins.values() if login.password_change_required), None)
    if due is not None:
        raise RedfishError(403, "PasswordChangeRequired", account_path(due.user))


class Authenticator:
    """Checks credentials per machine, keeping the answers until the state service announces a
    change of that machine (the same StateReads the IPMI front-ends keep)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.reads: dict[str, StateReads] = {}
        self.sessions: SessionStore | None = None
        """Where session tokens are looked up (set by the sessions module; None: Basic only)."""

    def reads_of(self, machine: str) -> StateReads:
        return self.reads.setdefault(machine, StateReads())

    async def check(self, machine: str, name: str, password: str, source: str, fresh: bool) -> Login | None:
        """The login of ``name`` from ``source`` on ``machine``, or None (unknown machine, wrong
        password, disabled user, no role, locked out from ``source``); ``fresh``: asked now."""
        key = ("basic", name, hashlib.sha256(password.encode()).digest(), source)

        async def ask() -> Login | None:
            try:
                result = await bus.request(self.nc, machine, subjects.USERS_CHECK,
                                           PasswordCheck(password=password, name=name, source=source),
                                           PasswordCheckResult)
            except BusError as exc:
                if exc.error in ("unknown_machine", "bad_request"):
                    return None
                raise
            user = result.user
            if not result.ok or user is None:
                return None
            role = role_of(user)
            return Login(name, role, user.slot, None, user.password_change_required,
                         user.password_changes) if role else None

        try:
            return await self.reads_of(machine).get(key, ask, keep=lambda login: login is not None, fresh=fresh)
        except BusError as exc:
            raise RedfishError(503, "ServiceTemporarilyUnavailable", 1) from exc

    async def session_user(self, machine: str, name: str, slot: int, session: str,
                           password_changes: int | None, fresh: bool) -> Login | None:
        """The login on ``machine`` of a session's user, read now: the user in ``slot`` must still
        be ``name``, enabled, with a role, and the password it logged in with (a change takes
        effect at the state service's next announcement, i.e. at once)."""

        async def ask() -> User | None:
            try:
                return await bus.request(self.nc, machine, subjects.USERS_GET, UserRef(slot=slot), User)
            except BusError as exc:
                if exc.error in ("unknown_machine", "bad_request"):
                    return None
                raise

        try:
            user = await self.reads_of(machine).get(("slot", slot), ask, fresh=fresh)
        except BusError as exc:
            raise RedfishError(503, "ServiceTemporarilyUnavailable", 1) from exc
        if user is None or user.name != name or (role := role_of(user)) is None:
            return None
        if password_changes is not None and user.password_changes != password_changes:
            return None
        return Login(name, role, slot, session, user.password_change_required, user.password_changes)

    async def login(self, connection: HTTPConnection, machines: list[str],
                    password_change: bool = False) -> dict[str, Login]:
        """The machines among ``machines`` the request's credentials log in to (401 when none): a
        session token in X-Auth-Token, else Basic credentials in Authorization. A user that must
        change its password is refused (403) unless ``password_change``: the route is one it may
        still use, and checks the rest itself."""
        headers: Mapping[str, str] = connection.headers
        token = headers.get(TOKEN_HEADER)
        fresh = changes_state(connection)
        granted = await (self.token_login(token, machines, fresh) if token is not None
                         else self.basic_login(headers.get("authorization"), machines, source_of(connection), fresh))
        if not password_change:
            refuse_until_password_changed(granted)
        return granted

    async def basic_login(self, authorization: str | None, machines: list[str], source: str,
                          fresh: bool) -> dict[str, Login]:
        """The machines among ``machines`` Basic credentials log in to (401 when none)."""
        name, password = basic_credentials(authorization)
        if len(name.encode()) > 16 or len(password.encode()) > 20:
            raise no_session()
        logins = await asyncio.gather(*(self.check(machine, name, password, source, fresh) for machine in machines))
        granted = {machine: login for machine, login in zip(machines, logins, strict=True) if login}
        if not granted:
            raise no_session()
        return granted

    async def token_login(self, token: str, machines: list[str], fresh: bool) -> dict[str, Login]:
        """The machines among ``machines`` a session token logs in to: those of the session where
        its user still has a role and its password (401 when none, or for an unknown, ended or
        expired session). A session whose user lost them on all its machines (deleted, disabled,
        a new password) is ended."""
        if self.sessions is None:
            raise no_session()
        session = await self.sessions.lookup(token, fresh)
        if session is None:
            raise no_session()

        async def valid(wanted: list[str]) -> dict[str, Login]:
            logins = await asyncio.gather(*(self.session_user(machine, session.user, session.machines[machine],
                                                              session.id, session.password_changes.get(machine), fresh)
                                            for machine in wanted))
            return {machine: login for machine, login in zip(wanted, logins, strict=True) if login}

        granted = await valid([machine for machine in machines if machine in session.machines])
        if not granted:
            if not await valid([machine for machine in session.machines if machine not in machines]):
                await self.sessions.delete(session)
            raise no_session()
        return granted


def basic_credentials(authorization: str | None) -> tuple[str, str]:
    if not authorization or not authorization.lower().startswith("basic "):
        raise no_session()
    try:
        name, sep, password = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise no_session() from None
    if not sep:
        raise no_session()
    return name, password
