"""AccountService: the BMC users as Redfish accounts (ManagerAccount, Role schemas).

Every machine's BMC has its own 15 user slots in the state service, shared with IPMI (slot 1 is
IPMI's null user and never an account). One Redfish service serves all machines, so an account
is a user *name*: the accounts a caller sees are the named users of the machines it administers
(its login is Administrator there), merged by name, plus its own. A change made through Redfish
is made on every machine the caller administers that has the user (a new account: on every
machine the caller administers), and holds for IPMI at once: the user's LAN channel privilege is
its role (4 Administrator, 3 Operator, 2 ReadOnly, anything else NoAccess).

A machine's last enabled Administrator (with a password) cannot be deleted, disabled or demoted:
409 Conflict, since the request is sound but the machine's current users forbid it; it would
otherwise leave a BMC nobody can administer over the network.

An Administrator renames an account by PATCHing its UserName: the user is renamed on every
machine the caller administers that has it (on all of them or, when one refuses, on none; a name
one of them already has is 409 ResourceAlreadyExists), and the account moves to its new URI (the
answer is the renamed account, with a Location header). IPMI's Set User Name renames the same
user. A session belongs to a user name: the renamed user's Redfish sessions end (by either rename,
since a session's user must still be in its slot), and it logs in again with its new name.

PasswordChangeRequired is kept by the state service with each user slot (any new password clears
it, IPMI's Set User Password too). An Administrator sets or clears it (PATCH, or POST of a new
account); with ``[redfish] password_change_required = true`` every account created here starts
with it, so that its first password is only good for choosing another. While an account has it,
the user may only log in, GET its own account and PATCH its own Password (see auth.py); over
IPMI it cannot log in at all (docs/ipmi.md).

The account policy (AccountLockoutThreshold, AccountLockoutDuration,
AccountLockoutCounterResetAfter, MinPasswordLength) is each machine's, kept by the state service
and applied by IPMI too; a PATCH of the AccountService sets it on every machine the caller
administers, and the AccountService shows the policy of the first of the machines the caller
logs in to. A lockout holds per user and client address (see the state service's lockout.py);
an account is ``Locked`` while it is locked out from any address, and an Administrator PATCHing
``Locked: false`` ends every lockout of it."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import POLICY_RANGES
from qemu_bmc_shared.ipmi.core import LAN_CHANNEL
from qemu_bmc_shared.messages import (
    AccountPolicy,
    AccountPolicyUpdate,
    Empty,
    LoginAttempt,
    LoginUnlock,
    LoginVerdict,
    PasswordSet,
    User,
    UserAccessUpdate,
    UserList,
    UserUpdate,
)

from .auth import ACCOUNTS_PATH, PRIVILEGES, ROLES, Login, account_path, refuse_until_password_changed, role_of
from .errors import RedfishError, message
from .resources import (
    ENABLED,
    Redfish,
    check_if_match,
    collection,
    etag_of,
    json_body,
    json_response,
    link,
    patch_body,
    writable,
)

SERVICE_PATH = "/redfish/v1/AccountService"
ROLES_PATH = f"{SERVICE_PATH}/Roles"
#: RoleId → the user's IPMI privilege limit on the LAN channel.
ROLE_IDS = {"Administrator": 4, "Operator": 3, "ReadOnly": 2, "NoAccess": 15}
ROLE_RANK = {"NoAccess": 0, "ReadOnly": 1, "Operator": 2, "Administrator": 3}
PRIVILEGE_ORDER = ("Login", "ConfigureManager", "ConfigureUsers", "ConfigureSelf", "ConfigureComponents")
MAX_PASSWORD, MAX_NAME = 20, 16
#: Printable ASCII without the characters that break Basic authentication (:) or a URI.
NAME = re.compile(r"^[!$&'()*+,\-.0-9;=@A-Z\[\]^_`a-z{|}~]+$")
FIRST_SLOT, LAST_SLOT = 2, 15
SOL_PAYLOAD = 0x02
NO_ACCESS = 15
HIDDEN = "******"
WRITABLE = ("UserName", "Password", "RoleId", "Enabled", "PasswordChangeRequired", "Locked")
#: AccountService property → AccountPolicy field.
POLICY = {"AccountLockoutThreshold": "lockout_threshold", "AccountLockoutDuration": "lockout_duration",
          "AccountLockoutCounterResetAfter": "lockout_reset_after", "MinPasswordLength": "min_password_length"}


def role_id(user: User) -> str:
    """The user's role from its LAN channel privilege, enabled or not."""
    access = user.channels.get(LAN_CHANNEL)
    privilege = access.privilege if access is not None else NO_ACCESS
    return ROLES[min(privilege, 4)] if 2 <= privilege <= 5 else "NoAccess"


def account_body(name: str, users: dict[str, User], locked: bool = False) -> dict[str, Any]:
    """The account ``name`` as it is on ``users`` (machine → the user there): when machines
    differ, the highest role and enabled on any. Its ETag changes with every change of those
    user slots, a password included."""
    role = max((role_id(user) for user in users.values()), key=ROLE_RANK.__getitem__)
    version = sorted((machine, user.slot, user.changes) for machine, user in users.items())
    return {"@odata.id": account_path(name), "@odata.type": "#ManagerAccount.v1_14_1.ManagerAccount",
            "@odata.etag": etag_of({"account": name, "version": version}),
            "Id": name, "Name": f"Account {name}", "Description": f"BMC user on {', '.join(sorted(users))}",
            "UserName": name, "RoleId": role, "Enabled": any(user.enabled for user in users.values()),
            "Locked": locked, "Password": None, "AccountTypes": ["Redfish", "IPMI"], **writable(*WRITABLE),
            "PasswordChangeRequired": any(user.password_change_required for user in users.values()),
            "Links": {"Role": link(f"{ROLES_PATH}/{role}")}}


def role_body(role: str) -> dict[str, Any]:
    privileges = PRIVILEGES.get(role, set())
    return {"@odata.id": f"{ROLES_PATH}/{role}", "@odata.type": "#Role.v1_3_3.Role", "Id": role, "Name": role,
            "RoleId": role, "IsPredefined": True, "Description": f"{role} role",
            "AssignedPrivileges": [privilege for privilege in PRIVILEGE_ORDER if privilege in privileges],
            "OemPrivileges": []}


def named(users: list[User], name: str) -> User | None:
    return next((user for user in users if user.slot >= FIRST_SLOT and user.name == name), None)


def administrators(users: list[User], but: int) -> int:
    """How many enabled Administrators with a password other than slot ``but`` there are."""
    return sum(1 for user in users if user.slot not in (1, but) and user.password_set
               and role_of(user) == "Administrator")


class Scope:
    """One caller's view: its logins and the users of the machines it logs in to."""

    def __init__(self, logins: dict[str, Login], users: dict[str, list[User]]) -> None:
        self.logins, self.users = logins, users

    @property
    def administered(self) -> list[str]:
        return sorted(machine for machine, login in self.logins.items() if login.role == "Administrator")

    def managed(self, name: str) -> dict[str, User]:
        """Where the caller may manage ``name``: the machines it administers that have it."""
        found = {machine: named(self.users[machine], name) for machine in self.administered}
        return {machine: user for machine, user in found.items() if user is not None}

    def own(self, name: str) -> dict[str, User]:
        """The machines where ``name`` is the caller itself."""
        own = {}
        for machine, login in self.logins.items():
            user = named(self.users[machine], name)
            if login.user == name and user is not None and user.slot == login.slot:
                own[machine] = user
        return own

    def account(self, name: str) -> dict[str, User]:
        """The users ``name`` the caller may see (404 or 403 when none)."""
        users = {**self.own(name), **self.managed(name)}
        if not users:
            raise RedfishError(404, "ResourceNotFound", "ManagerAccount", name) if self.administered else \
                RedfishError(403, "InsufficientPrivilege")
        return users


def check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise RedfishError(400, "PropertyValueTypeError", name, "UserName")
    if not name or len(name.encode()) > MAX_NAME or not NAME.match(name):
        raise RedfishError(400, "PropertyValueFormatError", name, "UserName")
    return name


def check_password(password: Any, shortest: int) -> str:
    if not isinstance(password, str):
        raise RedfishError(400, "PropertyValueTypeError", HIDDEN, "Password")
    if "\0" in password:
        raise RedfishError(400, "PropertyValueFormatError", HIDDEN, "Password")
    if not shortest <= len(password) or len(password.encode()) > MAX_PASSWORD:
        raise RedfishError(400, "PasswordIncorrectLength", extra=[message("PropertyValueIncorrect", "Password",
                                                                          HIDDEN)])
    return password


def check_role(role: Any) -> int:
    if not isinstance(role, str):
        raise RedfishError(400, "PropertyValueTypeError", role, "RoleId")
    if role not in ROLE_IDS:
        raise RedfishError(400, "PropertyValueNotInList", role, "RoleId")
    return ROLE_IDS[role]


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise RedfishError(400, "PropertyValueTypeError", value, key)
    return value


def refuse_unknown(body: dict[str, Any]) -> None:
    for key in body:
        if key in WRITABLE:
            continue
        known = key in ("Id", "Name", "Description", "AccountTypes", "Links") or key.startswith("@odata.")
        raise RedfishError(400, "PropertyNotWritable" if known else "PropertyUnknown", key)


CREATE_ATTEMPTS = 5
"""Times an account creation looks for free slots again when another replica took one first."""


class SlotTaken(Exception):
    """The free user slot chosen was taken by another front-end in the meantime."""


def register(app: FastAPI, redfish: Redfish) -> None:
    creating = asyncio.Lock()

    async def request_on(machine: str, operation: str, payload: Any, reply: type) -> Any:
        try:
            return await bus.request(redfish.nc, machine, operation, payload, reply)
        finally:
            redfish.auth.reads_of(machine).clear()  # this replica's next check sees the change

    async def scope(request: Request, password_change: bool = False) -> Scope:
        """The caller's view (``password_change``: also of a user that must change its password,
        which the route then limits to its own account)."""
        logins = await redfish.auth.login(request, await redfish.machines.list(), password_change)
        machines = sorted(logins)
        lists = await asyncio.gather(*(bus.request(redfish.nc, machine, subjects.USERS_LIST, Empty(), UserList)
                                       for machine in machines))
        return Scope(logins, {machine: found.users for machine, found in zip(machines, lists, strict=True)})

    async def policy_of(machine: str) -> AccountPolicy:
        return await bus.request(redfish.nc, machine, subjects.ACCOUNT_POLICY_GET, Empty(), AccountPolicy)

    async def shortest_password(machines: list[str]) -> int:
        """The longest of the minimum password lengths of ``machines``."""
        policies = await asyncio.gather(*(policy_of(machine) for machine in machines))
        return max((policy.min_password_length for policy in policies), default=AccountPolicy().min_password_length)

    async def locked(name: str, machines: list[str]) -> bool:
        verdicts = await asyncio.gather(*(bus.request(redfish.nc, machine, subjects.LOGIN_CHECK,
                                                      LoginAttempt(name=name), LoginVerdict) for machine in machines))
        return not all(verdict.allowed for verdict in verdicts)

    async def account_response(name: str, users: dict[str, User], headers: dict[str, str] | None = None,
                               status: int = 200) -> Response:
        return json_response(account_body(name, users, await locked(name, list(users))), status, headers=headers)

    def keep_an_administrator(view: Scope, users: dict[str, User], conflict: RedfishError) -> None:
        for machine, user in users.items():
            if role_of(user) == "Administrator" and not administrators(view.users[machine], user.slot):
                raise conflict

    async def end_sessions(name: str, users: dict[str, User]) -> None:
        """End the Redfish sessions of ``name`` on the machines of ``users`` (deleted, renamed: a new
        user in the slot must not inherit them)."""
        if redfish.auth.sessions is not None:
            for record in await redfish.auth.sessions.all():
                if record.user == name and any(record.machines.get(machine) == user.slot
                                               for machine, user in users.items()):
                    await redfish.auth.sessions.delete(record)

    async def rename(users: dict[str, User], name: str, new_name: str) -> dict[str, User]:
        """Rename ``name`` on every machine of ``users``, or on none (those done are renamed back
        when one fails); the renamed users."""
        renamed: dict[str, User] = {}
        try:
            for machine, user in users.items():
                renamed[machine] = await request_on(machine, subjects.USERS_SET,
                                                    UserUpdate(slot=user.slot, name=new_name, if_name=name), User)
        except BaseException as exc:
            for machine, user in renamed.items():
                await asyncio.shield(request_on(machine, subjects.USERS_SET,
                                                UserUpdate(slot=user.slot, name=name, if_name=new_name), User))
            if isinstance(exc, BusError) and exc.error == "conflict":
                raise RedfishError(409, "ResourceAlreadyExists", "ManagerAccount", "UserName", new_name) from None
            raise
        await end_sessions(name, users)
        return renamed

    async def clear_slot(machine: str, user: User) -> None:
        """Free a slot: disabled, no password, no channel access, no name."""
        await request_on(machine, subjects.USERS_SET, UserUpdate(slot=user.slot, enabled=False), User)
        await request_on(machine, subjects.USERS_PASSWORD, PasswordSet(slot=user.slot, password=None), User)
        for channel in user.channels:
            await request_on(machine, subjects.USERS_ACCESS, UserAccessUpdate(
                slot=user.slot, channel=channel, privilege=NO_ACCESS, ipmi_messaging=False, link_auth=False,
                callback_only=False, payloads=0, oem_payloads=0), User)
        await request_on(machine, subjects.USERS_SET, UserUpdate(slot=user.slot, name=""), User)

    async def create_on(machine: str, slot: User, name: str, password: str, privilege: int, enabled: bool,
                        password_change_required: bool) -> None:
        """Make ``name`` in the free ``slot``: named first (the state service refuses a name in use),
        enabled last, so it never works half made."""
        try:
            await request_on(machine, subjects.USERS_SET,
                             UserUpdate(slot=slot.slot, name=name, enabled=False, if_name=""), User)
        except BusError as exc:
            if exc.error == "conflict":
                raise RedfishError(409, "ResourceAlreadyExists", "ManagerAccount", "UserName", name) from None
            if exc.error == "invalid_state":  # another replica took the slot a moment ago
                raise SlotTaken(machine) from None
            raise
        try:
            await request_on(machine, subjects.USERS_PASSWORD, PasswordSet(slot=slot.slot, password=password), User)
            for channel in slot.channels:
                if channel != LAN_CHANNEL:
                    await request_on(machine, subjects.USERS_ACCESS, UserAccessUpdate(
                        slot=slot.slot, channel=channel, privilege=NO_ACCESS, ipmi_messaging=False,
                        link_auth=False, callback_only=False, payloads=0, oem_payloads=0), User)
            await request_on(machine, subjects.USERS_ACCESS, UserAccessUpdate(
                slot=slot.slot, channel=LAN_CHANNEL, privilege=privilege, ipmi_messaging=True, link_auth=True,
                callback_only=False, payloads=SOL_PAYLOAD, oem_payloads=0), User)
            await request_on(machine, subjects.USERS_SET, UserUpdate(
                slot=slot.slot, enabled=enabled, password_change_required=password_change_required), User)
        except BaseException:
            await asyncio.shield(clear_slot(machine, User(slot=slot.slot, channels=slot.channels)))
            raise

    async def service_body(machine: str) -> dict[str, Any]:
        policy = await policy_of(machine)
        return {
            "@odata.id": SERVICE_PATH, "@odata.type": "#AccountService.v1_18_1.AccountService",
            "Id": "AccountService", "Name": "Account service",
            "Description": "The BMC users of every machine (shared with IPMI)", "ServiceEnabled": True,
            "Status": ENABLED, "LocalAccountAuth": "Enabled",
            "MinPasswordLength": policy.min_password_length, "MaxPasswordLength": MAX_PASSWORD,
            **{key: getattr(policy, field) for key, field in POLICY.items() if key != "MinPasswordLength"},
            "AccountLockoutCounterResetEnabled": True, **writable(*POLICY),
            "SupportedAccountTypes": ["Redfish", "IPMI"],
            "Accounts": link(ACCOUNTS_PATH), "Roles": link(ROLES_PATH)}

    @app.get(SERVICE_PATH)
    async def account_service(request: Request) -> Response:
        return json_response(await service_body(min(await redfish.visible_machines(request))))

    @app.patch(SERVICE_PATH)
    async def patch_account_service(request: Request) -> Response:
        """The account policy, on every machine the caller administers (ConfigureUsers).
        AccountLockoutCounterResetAfter may not exceed AccountLockoutDuration (the schema's rule)."""
        view = await scope(request)
        if not view.administered:
            raise RedfishError(403, "InsufficientPrivilege")
        body = await patch_body(request)
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key not in POLICY:
                known = key in ("Id", "Name", "Description", "ServiceEnabled", "MaxPasswordLength")
                raise RedfishError(400, "PropertyNotWritable" if known else "PropertyUnknown", key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise RedfishError(400, "PropertyValueTypeError", value, key)
            low, high = POLICY_RANGES[POLICY[key]]
            if not low <= value <= high:
                raise RedfishError(400, "PropertyValueOutOfRange", value, key)
            changes[POLICY[key]] = value
        update = AccountPolicyUpdate(**changes)
        policies = await asyncio.gather(*(policy_of(machine) for machine in view.administered))
        for policy in policies:
            merged = msgspec.structs.replace(policy, **changes)
            if merged.lockout_duration and merged.lockout_reset_after > merged.lockout_duration:
                raise RedfishError(400, "PropertyValueConflict", "AccountLockoutCounterResetAfter",
                                   "AccountLockoutDuration")
        for machine in view.administered:
            await request_on(machine, subjects.ACCOUNT_POLICY_SET, update, AccountPolicy)
        return json_response(await service_body(min(view.logins)))

    @app.get(ACCOUNTS_PATH)
    async def accounts(request: Request) -> Response:
        """The named users of the machines the caller administers, and the caller itself."""
        view = await scope(request)
        names = {user.name for machine in view.administered for user in view.users[machine]
                 if user.slot >= FIRST_SLOT and user.name}
        names.update(login.user for login in view.logins.values())
        members = sorted(names)
        return json_response(collection(ACCOUNTS_PATH, "ManagerAccountCollection", "Accounts",
                                        [account_path(name) for name in members]))

    @app.post(ACCOUNTS_PATH)
    async def create_account(request: Request) -> Response:
        """A new account on every machine the caller administers (ConfigureUsers); it must change
        its password first when the body or else ``[redfish] password_change_required`` says so."""
        view = await scope(request)
        if not view.administered:
            raise RedfishError(403, "InsufficientPrivilege")
        body = await json_body(request)
        for required in ("UserName", "Password", "RoleId"):
            if required not in body:
                raise RedfishError(400, "CreateFailedMissingReqProperties", required,
                                   extra=[message("PropertyMissing", required)])
        refuse_unknown(body)
        name = check_name(body["UserName"])
        password = check_password(body["Password"], await shortest_password(view.administered))
        privilege, enabled = check_role(body["RoleId"]), check_bool(body.get("Enabled", True), "Enabled")
        policy = redfish.config.redfish.password_change_required
        change_required = check_bool(body.get("PasswordChangeRequired", policy), "PasswordChangeRequired")
        async with creating:
            for _ in range(CREATE_ATTEMPTS):
                view = await scope(request)
                slots: dict[str, User] = {}
                for machine in view.administered:
                    if named(view.users[machine], name) is not None:
                        raise RedfishError(409, "ResourceAlreadyExists", "ManagerAccount", "UserName", name)
                    free = [user for user in view.users[machine] if user.slot >= FIRST_SLOT and not user.name]
                    if not free:
                        raise RedfishError(409, "CreateLimitReachedForResource")
                    slots[machine] = free[0]
                made: list[str] = []
                try:
                    for machine, slot in slots.items():
                        await create_on(machine, slot, name, password, privilege, enabled, change_required)
                        made.append(machine)
                    break
                except BaseException as exc:
                    for machine in made:
                        user = named((await bus.request(redfish.nc, machine, subjects.USERS_LIST, Empty(),
                                                        UserList)).users, name)
                        if user is not None:
                            await asyncio.shield(clear_slot(machine, user))
                    if not isinstance(exc, SlotTaken):
                        raise
            else:
                raise RedfishError(503, "ServiceTemporarilyUnavailable", 1)
            view = await scope(request)
        return await account_response(name, view.managed(name), {"Location": account_path(name)}, 201)

    @app.get(ACCOUNTS_PATH + "/{name}")
    async def account(request: Request, name: str) -> Response:
        """An account the caller may see; its own even while it must change its password."""
        view = await scope(request, password_change=True)
        if not view.own(name):
            refuse_until_password_changed(view.logins)
        return await account_response(name, view.account(name))

    @app.patch(ACCOUNTS_PATH + "/{name}")
    async def patch_account(request: Request, name: str) -> Response:
        """UserName, Password, RoleId, Enabled, PasswordChangeRequired by an Administrator of the
        user's machines; the user itself may change its own Password (ConfigureSelf), which is all
        it may do while it must change it. A new Password clears PasswordChangeRequired unless the
        same PATCH sets it. ``Locked: false`` ends the account's lockouts. One account PATCH at a
        time here, so that of simultaneous PATCHes with the same If-Match only the first is
        applied. The answer is the account as changed (at its new URI when renamed, with a
        Location header)."""
        async with patching:
            return await patch_account_now(request, name)

    patching = asyncio.Lock()

    async def patch_account_now(request: Request, name: str) -> Response:
        view = await scope(request, password_change=True)
        body = await patch_body(request)
        if not view.own(name) or set(body) != {"Password"}:
            refuse_until_password_changed(view.logins)
        users = view.account(name)
        check_if_match(request, account_body(name, users, await locked(name, list(users))))
        refuse_unknown(body)
        new_name = check_name(body["UserName"]) if body.get("UserName", name) != name else None
        password = check_password(body["Password"], await shortest_password(list(users))) \
            if "Password" in body else None
        privilege = check_role(body["RoleId"]) if "RoleId" in body else None
        flags = {key: check_bool(body[field], field) for key, field in (
            ("enabled", "Enabled"), ("password_change_required", "PasswordChangeRequired")) if field in body}
        unlock = "Locked" in body
        if unlock and check_bool(body["Locked"], "Locked"):
            raise RedfishError(400, "PropertyValueNotInList", "true", "Locked")  # only the service locks
        managed = view.managed(name)
        if privilege is not None or flags or new_name is not None or unlock:
            if not managed:
                raise RedfishError(403, "InsufficientPrivilege")
            targets = managed
        else:
            targets = users
            for machine in targets:
                view.logins[machine].require("ConfigureUsers" if machine in managed else "ConfigureSelf")
        if privilege is not None and privilege != ROLE_IDS["Administrator"]:
            keep_an_administrator(view, targets, RedfishError(
                409, "PropertyValueResourceConflict", "RoleId", body["RoleId"], account_path(name)))
        if flags.get("enabled") is False:
            keep_an_administrator(view, targets, RedfishError(
                409, "PropertyValueResourceConflict", "Enabled", "false", account_path(name)))
        if new_name is not None:
            if any(named(view.users[machine], new_name) for machine in targets):
                raise RedfishError(409, "ResourceAlreadyExists", "ManagerAccount", "UserName", new_name)
            targets = await rename(targets, name, new_name)
        renewed: dict[str, int] = {}
        for machine, user in targets.items():
            if password is not None:
                changed = await request_on(machine, subjects.USERS_PASSWORD,
                                           PasswordSet(slot=user.slot, password=password), User)
                renewed[machine] = changed.password_changes
            if privilege is not None:
                await request_on(machine, subjects.USERS_ACCESS,
                                 UserAccessUpdate(slot=user.slot, channel=LAN_CHANNEL, privilege=privilege), User)
            if flags:  # after the password, which clears PasswordChangeRequired
                await request_on(machine, subjects.USERS_SET, UserUpdate(slot=user.slot, **flags), User)
            if unlock:
                await bus.request(redfish.nc, machine, subjects.LOGIN_UNLOCK, LoginUnlock(name=user.name), Empty)
        own_session = next((view.logins[machine].session for machine in view.own(name)
                            if view.logins[machine].session), None)
        if renewed and own_session is not None and redfish.auth.sessions is not None:
            await redfish.auth.sessions.keep_after_password_change(own_session, renewed)
        return await changed_account(new_name or name, list(users), renamed=new_name is not None)

    async def changed_account(name: str, machines: list[str], renamed: bool) -> Response:
        """The account ``name`` as it now is on ``machines``, read from the state service (the
        caller's credentials may no longer be what they were: a new password, a new name)."""
        lists = await asyncio.gather(*(bus.request(redfish.nc, machine, subjects.USERS_LIST, Empty(), UserList)
                                       for machine in machines))
        users = {machine: user for machine, found in zip(machines, lists, strict=True)
                 if (user := named(found.users, name)) is not None}
        if not users:  # renamed or deleted again meanwhile
            raise RedfishError(404, "ResourceNotFound", "ManagerAccount", name)
        return await account_response(name, users, {"Location": account_path(name)} if renamed else None)

    @app.delete(ACCOUNTS_PATH + "/{name}")
    async def delete_account(request: Request, name: str) -> Response:
        """Remove ``name`` from the machines the caller administers (ConfigureUsers)."""
        view = await scope(request)
        view.account(name)
        managed = view.managed(name)
        if not managed:
            raise RedfishError(403, "InsufficientPrivilege")
        keep_an_administrator(view, managed, RedfishError(409, "ResourceCannotBeDeleted"))
        for machine, user in managed.items():
            await clear_slot(machine, user)
        await end_sessions(name, managed)
        return Response(status_code=204)

    @app.get(ROLES_PATH)
    async def roles(request: Request) -> Response:
        await redfish.login(request)
        return json_response(collection(ROLES_PATH, "RoleCollection", "Roles",
                                        [f"{ROLES_PATH}/{role}" for role in ROLE_IDS]))

    @app.get(ROLES_PATH + "/{role}")
    async def role(request: Request, role: str) -> Response:
        await redfish.login(request)
        if role not in ROLE_IDS:
            raise RedfishError(404, "ResourceNotFound", "Role", role)
        return json_response(role_body(role))
