"""Who asks: HTTP Basic credentials (or, later, a session token) checked against the machine's
users in the state service, the same users IPMI has; the user's IPMI privilege on the LAN channel
is its Redfish role (4 Administrator, 3 Operator, 2 ReadOnly)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from dataclasses import dataclass

from nats.aio.client import Client
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.ipmi.core import LAN_CHANNEL, StateReads
from qemu_bmc_shared.messages import PasswordCheck, PasswordCheckResult

from .errors import RedfishError

ROLES = {4: "Administrator", 3: "Operator", 2: "ReadOnly"}
ROLE_PRIVILEGES = {role: privilege for privilege, role in ROLES.items()}
#: Redfish privileges (DSP0266 §13.3, the Base privilege registry) of each role.
PRIVILEGES = {"ReadOnly": {"Login"},
              "Operator": {"Login", "ConfigureComponents", "ConfigureSelf"},
              "Administrator": {"Login", "ConfigureComponents", "ConfigureSelf", "ConfigureManager",
                                "ConfigureUsers"}}
CHALLENGE = {"WWW-Authenticate": 'Basic realm="qemu-bmc"'}


@dataclass(frozen=True)
class Login:
    user: str
    role: str

    def require(self, privilege: str) -> None:
        if privilege not in PRIVILEGES[self.role]:
            raise RedfishError(403, "InsufficientPrivilege")


class Authenticator:
    """Checks credentials per machine, keeping the answers until the state service announces a
    change of that machine (the same StateReads the IPMI front-ends keep)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.reads: dict[str, StateReads] = {}

    def reads_of(self, machine: str) -> StateReads:
        return self.reads.setdefault(machine, StateReads())

    async def check(self, machine: str, name: str, password: str) -> Login | None:
        """The login of ``name`` on ``machine``, or None (unknown machine, wrong password,
        disabled user, no role)."""
        key = ("basic", name, hashlib.sha256(password.encode()).digest())

        async def ask() -> Login | None:
            try:
                result = await bus.request(self.nc, machine, subjects.USERS_CHECK,
                                           PasswordCheck(password=password, name=name), PasswordCheckResult)
            except BusError as exc:
                if exc.error in ("unknown_machine", "bad_request"):
                    return None
                raise
            user = result.user
            if not result.ok or user is None or not user.enabled:
                return None
            access = user.channels.get(LAN_CHANNEL)
            role = ROLES.get(min(access.privilege, 4)) if access and access.privilege <= 5 else None
            return Login(name, role) if role else None

        try:
            return await self.reads_of(machine).get(key, ask)
        except BusError as exc:
            raise RedfishError(503, "ServiceTemporarilyUnavailable", 1) from exc

    async def login(self, authorization: str | None, machines: list[str]) -> dict[str, Login]:
        """The machines among ``machines`` these credentials log in to (401 when none)."""
        name, password = basic_credentials(authorization)
        if len(name.encode()) > 16 or len(password.encode()) > 20:
            raise RedfishError(401, "NoValidSession", headers=CHALLENGE)
        logins = await asyncio.gather(*(self.check(machine, name, password) for machine in machines))
        granted = {machine: login for machine, login in zip(machines, logins, strict=True) if login}
        if not granted:
            raise RedfishError(401, "NoValidSession", headers=CHALLENGE)
        return granted


def basic_credentials(authorization: str | None) -> tuple[str, str]:
    if not authorization or not authorization.lower().startswith("basic "):
        raise RedfishError(401, "NoValidSession", headers=CHALLENGE)
    try:
        name, sep, password = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise RedfishError(401, "NoValidSession", headers=CHALLENGE) from None
    if not sep:
        raise RedfishError(401, "NoValidSession", headers=CHALLENGE)
    return name, password
