"""The state service on a real nats-server with JetStream: users, channels, LAN/SOL, K_G, persistence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from conftest import wait_for, write_config
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import (
    AccountPolicy,
    AccountPolicyUpdate,
    ChannelAccess,
    ChannelAccessUpdate,
    ChannelRef,
    Credentials,
    CredentialsRequest,
    Empty,
    KgKey,
    LanConfig,
    LanParamSet,
    LanRef,
    LoginAttempt,
    LoginOutcome,
    LoginUnlock,
    LoginVerdict,
    PasswordCheck,
    PasswordCheckResult,
    PasswordSet,
    SolConfig,
    SolParamSet,
    User,
    UserAccessUpdate,
    UserList,
    UserRef,
    UserUpdate,
)

SECRET = "S3cret-pass!"


@pytest.fixture
def state_config(short_dir: Path) -> Path:
    return write_config(short_dir, '[vm.m1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:6230"\n'
                                   '[vm.m2]\ncmd = ["-m", "64"]\n')


async def request(nc, operation, message, reply_type, machine="m1"):
    return await bus.request(nc, machine, operation, message, reply_type)


async def test_defaults_users_and_passwords(nc, services, state_config: Path):
    await services("state", state_config, env={"IPMI_USER": "root", "IPMI_PASS": "calvin"})
    users = (await request(nc, subjects.USERS_LIST, None, UserList)).users
    assert [user.slot for user in users] == list(range(1, 16))
    assert users[0].name == "" and not users[0].enabled  # slot 1: the anonymous user, disabled
    admin = users[1]
    assert admin.name == "root" and admin.enabled and admin.password_set
    assert admin.channels[1].privilege == 4 and admin.channels[1].ipmi_messaging
    assert (await request(nc, subjects.USERS_CHECK, PasswordCheck(name="root", password="calvin"),
                          PasswordCheckResult)).ok
    assert not (await request(nc, subjects.USERS_CHECK, PasswordCheck(name="root", password="wrong"),
                              PasswordCheckResult)).ok

    # a new user, as MAAS creates one in-band
    await request(nc, subjects.USERS_SET, UserUpdate(slot=3, name="maas", enabled=True), User)
    await request(nc, subjects.USERS_PASSWORD, PasswordSet(slot=3, password=SECRET), User)
    maas = await request(nc, subjects.USERS_ACCESS,
                         UserAccessUpdate(slot=3, channel=1, privilege=4, ipmi_messaging=True), User)
    assert maas.name == "maas" and maas.password_set and maas.channels[1].privilege == 4
    credentials = await request(nc, subjects.USERS_CREDENTIALS, CredentialsRequest(name="maas"), Credentials)
    assert credentials.password == SECRET and credentials.user.slot == 3
    check = await request(nc, subjects.USERS_CHECK, PasswordCheck(slot=3, password=SECRET), PasswordCheckResult)
    assert check.ok and check.user.name == "maas"

    # the other machine has its own BMC
    other = await request(nc, subjects.USERS_GET, UserRef(slot=3), User, machine="m2")
    assert other.name == "" and not other.password_set

    # names are unique, at most 16 bytes, ASCII; passwords at most 20 bytes
    for update, error in ((UserUpdate(slot=4, name="maas"), "conflict"),
                          (UserUpdate(slot=4, name="ünïcode"), "bad_request")):
        with pytest.raises(BusError) as refused:
            await request(nc, subjects.USERS_SET, update, User)
        assert refused.value.error == error
    with pytest.raises(BusError) as refused:
        await request(nc, subjects.USERS_PASSWORD, PasswordSet(slot=3, password="é" * 11), User)
    assert refused.value.error == "bad_request"

    # clearing a password
    cleared = await request(nc, subjects.USERS_PASSWORD, PasswordSet(slot=3, password=None), User)
    assert not cleared.password_set


async def test_channel_lan_sol_and_kg(nc, services, state_config: Path):
    await services("state", state_config)
    volatile = await request(nc, subjects.CHANNEL_GET, ChannelRef(channel=1), ChannelAccess)
    assert volatile.access_mode == 2 and volatile.privilege_limit == 4
    changed = await request(nc, subjects.CHANNEL_SET,
                            ChannelAccessUpdate(channel=1, volatile=False, access_mode=1), ChannelAccess)
    assert changed.access_mode == 1 and not changed.volatile
    assert (await request(nc, subjects.CHANNEL_GET, ChannelRef(channel=1), ChannelAccess)).access_mode == 2

    lan = await request(nc, subjects.LAN_GET, LanRef(channel=1), LanConfig)
    assert lan.params[3] == bytes([127, 0, 0, 1])  # where the IPMI front-end of m1 listens
    assert len(lan.params[5]) == 6 and lan.params[5][0] == 0x02  # a stable, locally administered MAC
    lan = await request(nc, subjects.LAN_SET, LanParamSet(param=4, data=b"\x02"), LanConfig)
    assert lan.params[4] == b"\x02" and lan.params[3] == bytes([127, 0, 0, 1])

    sol = await request(nc, subjects.SOL_GET, None, SolConfig)
    assert sol.params[1] == b"\x01" and sol.params[8] == (623).to_bytes(2, "little")
    sol = await request(nc, subjects.SOL_SET, SolParamSet(param=5, data=b"\x07"), SolConfig)
    assert sol.params[5] == b"\x07"

    assert (await request(nc, subjects.KG_GET, None, KgKey)).key is None
    key = bytes(range(20))
    await request(nc, subjects.KG_SET, KgKey(key=key), KgKey)
    assert (await request(nc, subjects.KG_GET, None, KgKey)).key == key


async def test_concurrent_writers_lose_no_update(nc, services, state_config: Path):
    """Two state-service replicas and 30 concurrent read-modify-writes of one user record."""
    await services("state", state_config)
    await services("state", state_config)
    updates = [UserAccessUpdate(slot=5, channel=channel, privilege=2, ipmi_messaging=True) for channel in range(15)]
    updates += [UserAccessUpdate(slot=5, channel=channel, link_auth=True) for channel in range(15)]
    await asyncio.gather(*(request(nc, subjects.USERS_ACCESS, update, User) for update in updates))
    user = await request(nc, subjects.USERS_GET, UserRef(slot=5), User)
    assert sorted(user.channels) == list(range(15))
    assert all(access.privilege == 2 and access.ipmi_messaging and access.link_auth
               for access in user.channels.values())

    # eight front-ends claiming one free slot at once (if_name=""): one gets it
    claims = await asyncio.gather(*(request(nc, subjects.USERS_SET, UserUpdate(slot=6, name=f"claim{index}",
                                                                             if_name=""), User)
                                    for index in range(8)), return_exceptions=True)
    won = [claim for claim in claims if isinstance(claim, User)]
    assert len(won) == 1 and all(isinstance(claim, BusError) and claim.error == "invalid_state"
                                 for claim in claims if claim not in won), claims
    assert (await request(nc, subjects.USERS_GET, UserRef(slot=6), User)).name == won[0].name


async def test_state_survives_restarts_and_is_encrypted(nc, nats_server: NatsServer, services, state_config: Path,
                                                         short_dir: Path):
    first = await services("state", state_config, env={"IPMI_PASS": "first-pass"})
    await request(nc, subjects.USERS_SET, UserUpdate(slot=3, name="maas", enabled=True), User)
    await request(nc, subjects.USERS_PASSWORD, PasswordSet(slot=3, password=SECRET), User)
    await request(nc, subjects.LAN_SET, LanParamSet(param=4, data=b"\x02"), LanConfig)

    # restart the state service with other defaults: nothing is re-seeded over existing state
    await first.stop()
    await services("state", state_config, env={"IPMI_PASS": "other-pass"})
    await _logs_in(nc, "admin", "first-pass")
    await _logs_in(nc, "maas", SECRET)

    # restart nats-server itself (same port, same JetStream directory)
    await nats_server.stop()
    await nats_server.start()
    await wait_for(lambda: nc.is_connected, timeout=15, message="client reconnected")
    await wait_for(lambda: _logs_in(nc, "maas", SECRET, quiet=True), timeout=20, message="state back after restart")
    assert (await request(nc, subjects.LAN_GET, LanRef(channel=1), LanConfig)).params[4] == b"\x02"

    # at rest: no password in the bucket, nor in the logs
    kv = await nc.jetstream().key_value("qemu_bmc_state")
    for key in await kv.keys():
        value = (await kv.get(key)).value or b""
        for password in (SECRET, "first-pass", "other-pass"):
            assert password.encode() not in value, key
    stored = msgspec.json.decode((await kv.get("m1.user.3")).value)
    assert stored["password"] and SECRET not in stored["password"]
    for log in short_dir.glob("*.log"):
        for password in (SECRET, "first-pass", "other-pass"):
            assert password not in log.read_text(), log
    key_file = short_dir / "rt" / "state" / "secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600


async def _logs_in(nc, name: str, password: str, quiet: bool = False) -> bool:
    try:
        result = await request(nc, subjects.USERS_CHECK, PasswordCheck(name=name, password=password),
                               PasswordCheckResult)
    except BusError:
        if quiet:
            return False
        raise
    assert result.ok or quiet
    return result.ok


async def test_bad_requests_get_structured_errors(nc, services, state_config: Path):
    await services("state", state_config)
    subject = subjects.for_machine("m1", subjects.USERS_GET)
    for payload, needle in ((b"{not json", "malformed"), (b'{"slot": 16}', "slot"), (b'{"slot": 1, "x": 2}', "x"),
                            (b'{"slot": "one"}', "slot")):
        reply = await nc.request(subject, payload, timeout=2)
        assert reply.headers["Nats-Service-Error-Code"] == "400"
        body = msgspec.json.decode(reply.data)
        assert body["error"] == "bad_request" and needle in body["message"].lower(), body
    with pytest.raises(BusError) as refused:
        await request(nc, subjects.USERS_GET, UserRef(slot=2), User, machine="nosuch")
    assert refused.value.error == "unknown_machine"
    with pytest.raises(BusError) as refused:
        await request(nc, subjects.USERS_CREDENTIALS, CredentialsRequest(slot=2, name="admin"), Credentials)
    assert refused.value.error == "bad_request"
    # still serving
    assert (await request(nc, subjects.USERS_GET, UserRef(slot=2), User)).name == "admin"


async def test_lockout_is_per_user_and_source_and_does_not_re_arm(nc, services, state_config: Path):
    """Failed logins lock a user out only from the source that failed; refused attempts while
    locked do not extend the lockout; a success from another source is never refused."""
    await services("state", state_config)
    await request(nc, subjects.ACCOUNT_POLICY_SET,
                  AccountPolicyUpdate(lockout_threshold=3, lockout_duration=1), AccountPolicy)

    async def login(password: str, source: str) -> PasswordCheckResult:
        return await request(nc, subjects.USERS_CHECK, PasswordCheck(name="admin", password=password, source=source),
                             PasswordCheckResult)

    for _ in range(3):
        assert not (await login("wrong-one", "192.0.2.9")).ok
    refused = await login("password", "192.0.2.9")
    assert not refused.ok and refused.locked
    assert (await login("password", "192.0.2.10")).ok  # another source is not locked out
    locked = await request(nc, subjects.LOGIN_CHECK, LoginAttempt(name="admin"), LoginVerdict)
    assert not locked.allowed and 0 < locked.retry_after <= 1.0
    # the front-ends that check passwords themselves (RAKP) report failures the same way
    verdict = await request(nc, subjects.LOGIN_RESULT, LoginOutcome(name="admin", source="192.0.2.9", ok=False),
                            LoginVerdict)
    assert not verdict.allowed and verdict.retry_after <= 1.0  # not re-armed
    async def logs_in() -> bool:
        return (await login("password", "192.0.2.9")).ok

    await wait_for(logs_in, timeout=30, interval=0.2, message="the lockout to end after its duration")
    # an administrator can end a lockout at once
    for _ in range(3):
        await login("wrong-one", "192.0.2.9")
    assert (await login("password", "192.0.2.9")).locked
    await request(nc, subjects.LOGIN_UNLOCK, LoginUnlock(name="admin"), Empty)
    assert (await login("password", "192.0.2.9")).ok


async def test_password_policy_and_password_changes(nc, services, state_config: Path):
    await services("state", state_config)
    with pytest.raises(BusError, match="at least 8 characters"):
        await request(nc, subjects.USERS_PASSWORD, PasswordSet(slot=3, password="short"), User)
    before = await request(nc, subjects.USERS_GET, UserRef(slot=2), User)
    after = await request(nc, subjects.USERS_PASSWORD, PasswordSet(slot=2, password="long-enough"), User)
    assert after.password_changes == before.password_changes + 1
    policy = await request(nc, subjects.ACCOUNT_POLICY_SET, AccountPolicyUpdate(min_password_length=4), AccountPolicy)
    assert policy.min_password_length == 4 and policy.lockout_threshold == 5
    await request(nc, subjects.USERS_PASSWORD, PasswordSet(slot=3, password="four"), User)
    assert (await request(nc, subjects.ACCOUNT_POLICY_GET, None, AccountPolicy, machine="m2")).min_password_length == 8
