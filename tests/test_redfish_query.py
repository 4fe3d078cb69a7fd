"""Redfish query parameters (DSP0266 §7.3) against the real services: $select, $filter, $top/$skip,
only and $expand, alone and together, what they answer to invalid values, expansion across
resources the caller may not read. DMTF's use-case checker's "Query Parameters" category runs in
test_redfish_conformance.py."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from conftest import free_tcp_port, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PasswordSet, User, UserAccessUpdate, UserUpdate
from test_redfish import PASSWORD, USER, Service

VIEWER, VIEWER_PASSWORD = "viewer", "view-only-1"
ROLES = "/redfish/v1/AccountService/Roles"


@pytest.fixture
async def redfish(request: pytest.FixtureRequest, nc, services, short_dir: Path, images: GuestImages) -> Service:
    """Two machines (n1: 64 MiB, the others 128 MiB; more with an indirect parameter); the
    ReadOnly user ``viewer`` is a user of n1 only."""
    port = free_tcp_port()
    machines = "".join(f'[vm.n{number}]\ncmd = {toml_list(images.qemu_args(nic=False, memory=64 * min(number, 2)))}\n'
                       for number in range(1, getattr(request, "param", 2) + 1))
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n{machines}')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    await bus.request(nc, "n1", subjects.USERS_SET, UserUpdate(slot=4, name=VIEWER, enabled=True), User)
    await bus.request(nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=4, password=VIEWER_PASSWORD), User)
    await bus.request(nc, "n1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=4, channel=1, privilege=2, ipmi_messaging=True), User)
    return Service(nc, short_dir, f"https://127.0.0.1:{port}")


def ids(collection: dict) -> list[str]:
    return [member["@odata.id"].rsplit("/", 1)[1] for member in collection["Members"]]


def message_id(response: httpx.Response) -> str:
    return response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].rsplit(".", 1)[1]


async def test_protocol_features_say_what_is_supported(redfish: Service):
    async with httpx.AsyncClient(base_url=redfish.url, verify=False) as anonymous:
        features = (await anonymous.get("/redfish/v1")).json()["ProtocolFeaturesSupported"]
    assert features["ExpandQuery"] == {"ExpandAll": True, "NoLinks": True, "Links": True, "Levels": True,
                                       "MaxLevels": 6}
    assert all(features[name] for name in ("SelectQuery", "FilterQuery", "OnlyMemberQuery", "TopSkipQuery",
                                            "MultipleHTTPRequests"))
    assert features["ExcerptQuery"] is False and features["DeepOperations"] == {"DeepPATCH": False,
                                                                                 "DeepPOST": False}


async def test_select_keeps_the_resource_etag(redfish: Service):
    async with redfish.client() as client:
        plain = await client.get("/redfish/v1/Systems/n1")
        system = plain.json()
        response = await client.get("/redfish/v1/Systems/n1",
                                    params={"$select": "PowerState,Boot/BootSourceOverrideTarget,MemorySummary"})
        assert response.status_code == 200, response.text
        view = response.json()
        assert set(view) == {"@odata.id", "@odata.type", "@odata.etag", "PowerState", "Boot", "MemorySummary"}
        target = "BootSourceOverrideTarget"
        assert view["Boot"] == {target: system["Boot"][target], f"{target}@Redfish.AllowableValues": system["Boot"][
            f"{target}@Redfish.AllowableValues"]}  # a property's annotations come with it
        assert view["MemorySummary"] == system["MemorySummary"]
        # the view's ETag is the resource's: If-Match with it changes the resource while it is unchanged
        assert view["@odata.etag"] == system["@odata.etag"] == response.headers["ETag"] == plain.headers["ETag"]
        assert response.headers["Allow"] == plain.headers["Allow"] and response.headers["OData-Version"] == "4.0"
        changed = await client.patch("/redfish/v1/Systems/n1", headers={"If-Match": view["@odata.etag"]},
                                     json={"Boot": {"BootSourceOverrideTarget": "Pxe",
                                                    "BootSourceOverrideEnabled": "Once"}})
        assert changed.status_code == 200, changed.text
        stale = await client.patch("/redfish/v1/Systems/n1", headers={"If-Match": view["@odata.etag"]},
                                   json={"Boot": {"BootSourceOverrideTarget": "Hdd"}})
        assert stale.status_code == 412
        role = (await client.get(f"{ROLES}/Operator", params={"$select": "Name,AssignedPrivileges"})).json()
        assert set(role) == {"@odata.id", "@odata.type", "@odata.etag", "Name", "AssignedPrivileges"}
        head = await client.head("/redfish/v1/Systems/n1", params={"$select": "PowerState"})
        assert head.status_code == 200 and head.content == b""
        collection = (await client.get("/redfish/v1/Systems", params={"$select": "Members"})).json()
        assert set(collection) == {"@odata.id", "@odata.type", "@odata.etag", "Members", "Members@odata.count"}


async def test_filter_top_skip_and_only(redfish: Service):
    async with redfish.client() as client:
        async def members(path: str, **params: str) -> list[str]:
            response = await client.get(path, params=params)
            assert response.status_code == 200, (params, response.text)
            return ids(response.json())

        assert await members(ROLES) == ["Administrator", "Operator", "ReadOnly", "NoAccess"]
        assert await members(ROLES, **{"$filter": "Id eq 'Operator'"}) == ["Operator"]
        assert await members(ROLES, **{"$filter": "not (Id eq 'Operator')"}) == ["Administrator", "ReadOnly",
                                                                                  "NoAccess"]
        assert await members(ROLES, **{"$filter": "Id eq 'ReadOnly' or Id eq 'Administrator'"}) == [
            "Administrator", "ReadOnly"]
        assert await members(ROLES, **{"$filter": "IsPredefined eq true and (Id ne 'NoAccess')"}) == [
            "Administrator", "Operator", "ReadOnly"]
        assert await members(ROLES, **{"$filter": "Id gt 'P'"}) == ["ReadOnly"]
        assert await members(ROLES, **{"$filter": "NoSuchProperty eq null"}) == await members(ROLES)
        assert await members("/redfish/v1/Systems", **{"$filter": "MemorySummary/TotalSystemMemoryGiB gt 0.1"}) == [
            "n2"]
        filtered = (await client.get(ROLES, params={"$filter": "Id ne 'NoAccess'"})).json()
        assert filtered["Members@odata.count"] == 3

        # $filter tests what the machines are now: n1 powered on shows up
        assert await members("/redfish/v1/Systems", **{"$filter": "PowerState eq 'On'"}) == []
        reset = await client.post("/redfish/v1/Systems/n1/Actions/ComputerSystem.Reset", json={"ResetType": "On"})
        assert reset.status_code == 204
        powered: list[str] = []

        async def n1_on() -> bool:
            powered[:] = await members("/redfish/v1/Systems", **{"$filter": "PowerState eq 'On'"})
            return powered == ["n1"]
        await wait_for(n1_on, timeout=30, message="n1 on")
        assert await members("/redfish/v1/Systems", **{"$filter": "PowerState ne 'On'"}) == ["n2"]

        # $top/$skip: pages with a link to the next one, which keeps the other options
        page = (await client.get(ROLES, params={"$top": "3"})).json()
        assert ids(page) == ["Administrator", "Operator", "ReadOnly"] and page["Members@odata.count"] == 4
        assert page["Members@odata.nextLink"] == f"{ROLES}?$top=3&$skip=3"
        last = (await client.get(page["Members@odata.nextLink"])).json()
        assert ids(last) == ["NoAccess"] and "Members@odata.nextLink" not in last
        page = (await client.get(ROLES, params={"$filter": "Id ne 'Operator'", "$top": "1", "$skip": "1"})).json()
        assert ids(page) == ["ReadOnly"] and page["Members@odata.count"] == 3
        assert page["Members@odata.nextLink"] == f"{ROLES}?$filter=Id%20ne%20'Operator'&$top=1&$skip=2"
        assert ids((await client.get(page["Members@odata.nextLink"])).json()) == ["NoAccess"]
        assert await members(ROLES, **{"$skip": "3"}) == ["NoAccess"]
        assert await members(ROLES, **{"$skip": "9"}) == []
        assert await members(ROLES, **{"$top": "0"}) == []

        # only: a collection of one member answers the member, of more the collection itself
        both = await client.get("/redfish/v1/Systems", params={"only": ""})
        assert both.json()["@odata.id"] == "/redfish/v1/Systems" and len(both.json()["Members"]) == 2
        assert (await client.get(f"{ROLES}?only")).json()["@odata.id"] == ROLES
    async with redfish.client(VIEWER, VIEWER_PASSWORD) as viewer:
        only = await viewer.get("/redfish/v1/Systems?only")
        plain = await viewer.get("/redfish/v1/Systems/n1")
        assert only.status_code == 200 and only.json()["Id"] == "n1"
        assert only.headers["ETag"] == plain.headers["ETag"] and "PATCH" in only.headers["Allow"]


async def test_expand(redfish: Service):
    async with redfish.client() as client:
        systems = await client.get("/redfish/v1/Systems", params={"$expand": "."})
        assert systems.status_code == 200, systems.text
        for member in systems.json()["Members"]:
            plain = (await client.get(member["@odata.id"])).json()
            assert member["Id"] == plain["Id"] and member["@odata.etag"] == plain["@odata.etag"]
        assert systems.headers["ETag"] == (await client.get("/redfish/v1/Systems")).headers["ETag"]

        def expanded(value: dict) -> bool:
            return "@odata.type" in value

        root = (await client.get("/redfish/v1", params={"$expand": "*"})).json()
        assert expanded(root["Systems"]) and expanded(root["AccountService"]) and expanded(root["Links"]["Sessions"])
        assert not expanded(root["Systems"]["Members"][0])  # one level
        root = (await client.get("/redfish/v1", params={"$expand": "."})).json()
        assert expanded(root["Systems"]) and not expanded(root["Links"]["Sessions"])
        root = (await client.get("/redfish/v1", params={"$expand": "~"})).json()
        assert not expanded(root["Systems"]) and expanded(root["Links"]["Sessions"])
        root = (await client.get("/redfish/v1", params={"$expand": ".($levels=2)"})).json()
        assert [member["Id"] for member in root["Systems"]["Members"]] == ["n1", "n2"]
        assert not expanded(root["Systems"]["Members"][0]["EthernetInterfaces"])  # a third level

        # with $select after it, and on a page of members
        view = (await client.get("/redfish/v1/Systems", params={"$expand": ".", "$select": "Members/PowerState",
                                                                 "$top": "1", "$skip": "1"})).json()
        assert view["Members"] == [{"@odata.id": "/redfish/v1/Systems/n2", "@odata.type": view["Members"][0][
            "@odata.type"], "@odata.etag": view["Members"][0]["@odata.etag"], "PowerState": "Off"}]

    # expansion reads with the caller's credentials: what it may not read stays a link
    async with httpx.AsyncClient(base_url=redfish.url, verify=False) as anonymous:
        root = await anonymous.get("/redfish/v1", params={"$expand": "*"})
        assert root.status_code == 200
        assert root.json()["Systems"] == {"@odata.id": "/redfish/v1/Systems"}
        assert root.json()["Links"]["Sessions"] == {"@odata.id": "/redfish/v1/SessionService/Sessions"}
    async with redfish.client(VIEWER, VIEWER_PASSWORD) as viewer:
        root = (await viewer.get("/redfish/v1", params={"$expand": "*($levels=2)"})).json()
        assert [member["Id"] for member in root["Systems"]["Members"]] == ["n1"]
        assert [member["Id"] for member in root["Managers"]["Members"]] == ["n1"]
        assert (await viewer.get("/redfish/v1/Systems/n2")).status_code in (401, 403, 404)  # not the viewer's
        response = await viewer.get("/redfish/v1/Systems", params={"$expand": ".", "$filter": "Id eq 'n2'"})
        assert response.json()["Members"] == []


@pytest.mark.parametrize("redfish", [4], indirect=True)
async def test_expand_is_bounded(redfish: Service):
    """Every link six levels deep from the service root of four machines is far more resources
    than one request may embed: 400, and the service goes on serving."""
    async with redfish.client() as client:
        response = await client.get("/redfish/v1", params={"$expand": "*($levels=6)"})
        assert (response.status_code, message_id(response)) == (400, "QueryParameterOutOfRange")
        assert "1000 resources" in response.json()["error"]["message"]
        response = await client.get("/redfish/v1", params={"$expand": "*($levels=2)"})
        assert response.status_code == 200 and len(response.json()["Systems"]["Members"]) == 4


INVALID = [
    ("$levels=2", 501, "QueryParameterUnsupported"),
    ("$orderby=Id", 501, "QueryParameterUnsupported"),
    ("$expand=Systems", 400, "QueryParameterValueFormatError"),
    ("$expand=*($levels=x)", 400, "QueryParameterValueTypeError"),
    ("$expand=*($levels=7)", 400, "QueryParameterOutOfRange"),
    ("$expand=.($levels=0)", 400, "QueryParameterOutOfRange"),
    ("$select=Name,", 400, "QueryParameterValueFormatError"),
    ("$select=Boot//Target", 400, "QueryParameterValueFormatError"),
    ("$filter=Id eq", 400, "QueryParameterValueFormatError"),
    ("$filter=Id eq 'x", 400, "QueryParameterValueFormatError"),
    ("$filter=(Id eq 'x'", 400, "QueryParameterValueFormatError"),
    ("$filter=Id like 'x'", 400, "QueryParameterValueFormatError"),
    ("$filter=PowerState eq 1", 400, "QueryParameterValueTypeError"),
    ("$filter=MemorySummary eq 'x'", 400, "QueryParameterValueTypeError"),
    ("$top=x", 400, "QueryParameterValueTypeError"),
    ("$top=1.5", 400, "QueryParameterValueTypeError"),
    ("$skip=-1", 400, "QueryParameterOutOfRange"),
    ("only=yes", 400, "QueryParameterValueFormatError"),
    ("only&$top=1", 400, "QueryCombinationInvalid"),
    ("$top=1&$top=2", 400, "QueryCombinationInvalid"),
]
"""Queries of /redfish/v1/Systems with invalid values: the status and the Base MessageId."""


async def test_invalid_values(redfish: Service):
    async with redfish.client() as client:
        for query, status, message in INVALID:
            response = await client.get(f"/redfish/v1/Systems?{quote(query, safe='$=&*();,/')}")
            assert (response.status_code, message_id(response)) == (status, message), (query, response.text)
            assert response.headers["OData-Version"] == "4.0"
        assert (await client.get("/redfish/v1/Systems")).status_code == 200


async def test_where_queries_do_not_apply(redfish: Service):
    async with redfish.client() as client:
        for path, params in (("/redfish/v1/Systems/n1", "$filter=Id eq 'n1'"), ("/redfish/v1/Systems/n1", "$top=1"),
                             ("/redfish/v1/AccountService", "only"), ("/redfish/v1/$metadata", "$select=Name"),
                             ("/redfish/v1/EventService/SSE", "$select=Id")):  # a stream: answered, not waited for
            response = await client.get(f"{path}?{quote(params, safe='$=')}")
            assert (response.status_code, message_id(response)) == (400, "QueryNotSupportedOnResource"), path
        response = await client.patch("/redfish/v1/Systems/n1?$select=Boot", json={"Boot": {}})
        assert (response.status_code, message_id(response)) == (400, "QueryNotSupportedOnOperation")
        for params in ("rpvunknown", "excerpt", "excerpt=x"):  # parameters without $ it does not support: ignored
            response = await client.get(f"/redfish/v1/Systems?{params}")
            assert response.status_code == 200 and ids(response.json()) == ["n1", "n2"]
        assert (await client.get("/redfish/v1/NoSuchThing?$select=Id")).status_code == 404
    async with httpx.AsyncClient(base_url=redfish.url, verify=False) as anonymous:
        assert (await anonymous.get("/redfish/v1/Systems?$expand=.")).status_code == 401
