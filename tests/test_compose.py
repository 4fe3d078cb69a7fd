"""compose.yaml under a real engine (docs/deploy.md, "Compose"): Debian's dockerd started by the
test (tests/container_engine.py), the image built from this checkout, `qemu-bmc compose init`,
examples/qemu-bmc.toml copied as it is, `docker-compose up -d`, and then what a user does: power
over IPMI and Redfish with QEMU running in the machine container, `qemu-bmc services` in a
container, NATS refusing a client without the token, front-end replicas, restarts, down and up.

The deployment is shared by the tests of this module (one `up`, in file order)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest
from clients import ipmitool
from container_engine import NATS_IMAGE, ContainerEngine, compose_project, running_engine
from guest_images import GuestImages
from http_server import FileServer
from qemu_bmc_shared import bus
from waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
TAG = "compose-test"
#: examples/qemu-bmc.toml's addresses and first user (IPMI_USER/IPMI_PASS defaults of compose.yaml)
REDFISH = "https://127.0.0.1:8443"
NODE1_IPMI, NODE2_IPMI = 6230, 6231
ADMIN = ("admin", "password")
SERVICES = ("nats", "state", "machine", "ipmi-lan", "vmwire", "redfish")

pytestmark = pytest.mark.timeout(1800)  # the first run builds the base images and the image


class Deployment:
    def __init__(self, engine: ContainerEngine, directory: Path, nats_port: int, token: str,
                 guest: GuestImages) -> None:
        self.engine = engine
        self.guest = guest
        self.directory = directory
        self.nats_port = nats_port
        self.token = token

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.engine.compose(self.directory, *args, check=check, timeout=timeout)

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def running(self, container: str) -> bool:
        return self.engine.docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "true"

    def processes(self, container: str) -> list[str]:
        """The command names of the processes running in ``container`` (the image has no ps)."""
        result = self.engine.docker("exec", container, "sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null", check=False)
        return result.stdout.split()

    def qemu_running(self) -> bool:
        return any(name.startswith("qemu-system") for name in self.processes(self.containers("machine")[0]))


async def ipmi(port: int, *args: str, user: str = ADMIN[0], password: str = ADMIN[1]) -> tuple[int, str]:
    return await ipmitool(port, *args, user=user, password=password)


def redfish(auth: tuple[str, str] = ADMIN) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=REDFISH, auth=auth, verify=False, timeout=30)


async def power_status(port: int) -> str | None:
    code, output = await ipmi(port, "power", "status")
    return output.strip() if code == 0 else None


async def wait_until_serving() -> None:
    """Every front end answers: IPMI for both machines, Redfish for both systems."""
    await wait_for(lambda: power_status(NODE1_IPMI), timeout=180, interval=1, message="IPMI of node1")
    await wait_for(lambda: power_status(NODE2_IPMI), timeout=180, interval=1, message="IPMI of node2")

    async def systems() -> bool:
        try:
            async with redfish() as client:
                response = await client.get("/redfish/v1/Systems")
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json()["Members@odata.count"] == 2

    await wait_for(systems, timeout=180, interval=1, message="Redfish Systems")


@pytest.fixture(scope="module")
def engine() -> Iterator[ContainerEngine]:
    with running_engine() as engine:
        engine.ensure_base_images()
        engine.build_image(REPO, f"qemu-bmc:{TAG}")
        yield engine


@pytest.fixture(scope="module")
def deployment(engine: ContainerEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("qbcompose")
    token, nats_port = compose_project(directory, TAG)
    shutil.copy2(REPO / "examples/qemu-bmc.toml", directory / "qemu-bmc.toml")  # verbatim
    guest = GuestImages(tmp_path_factory.mktemp("guest")).build()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(guest.disk),
                    str(directory / "images/node1.qcow2")], check=True)
    deployment = Deployment(engine, directory, nats_port, token, guest)
    try:
        deployment.compose("up", "-d", "--no-build", timeout=600)
        yield deployment
    finally:
        logs = deployment.compose("logs", "--no-color", check=False).stdout
        (directory / "compose.log").write_text(logs)
        deployment.compose("down", "-v", "--timeout", "40", check=False, timeout=300)


async def test_ipmi_power_runs_qemu_in_the_machine_container(deployment: Deployment) -> None:
    await wait_until_serving()
    assert await power_status(NODE1_IPMI) == "Chassis Power is off"
    assert not deployment.qemu_running()
    code, output = await ipmi(NODE1_IPMI, "power", "on")
    assert code == 0, output
    await wait_for(deployment.qemu_running, timeout=60, interval=0.5, message="QEMU in the machine container")
    await wait_for(lambda: _is(power_status(NODE1_IPMI), "Chassis Power is on"), timeout=60, interval=1,
                   message="power on")
    code, output = await ipmi(NODE1_IPMI, "power", "off")
    assert code == 0, output
    await wait_for(lambda: not deployment.qemu_running(), timeout=60, interval=0.5, message="QEMU gone")
    assert await power_status(NODE1_IPMI) == "Chassis Power is off"
    # the attached machine: its QEMU is not running on the host, so it is off
    assert await power_status(NODE2_IPMI) == "Chassis Power is off"


async def _is(value: Awaitable[object], expected: str) -> bool:
    return (await value) == expected


async def test_redfish_systems_and_reset(deployment: Deployment) -> None:
    await wait_until_serving()
    async with redfish() as client:
        systems = (await client.get("/redfish/v1/Systems")).json()
        members = sorted(member["@odata.id"] for member in systems["Members"])
        assert members == ["/redfish/v1/Systems/node1", "/redfish/v1/Systems/node2"]
        reset = "/redfish/v1/Systems/node1/Actions/ComputerSystem.Reset"
        response = await client.post(reset, json={"ResetType": "On"})
        assert response.status_code in (200, 204), response.text
        await wait_for(deployment.qemu_running, timeout=60, interval=0.5, message="QEMU after Reset On")

        async def power_state() -> str:
            return (await client.get("/redfish/v1/Systems/node1")).json()["PowerState"]

        await wait_for(lambda: _is(power_state(), "On"), timeout=60, interval=1, message="PowerState On")
        response = await client.post(reset, json={"ResetType": "ForceOff"})
        assert response.status_code in (200, 204), response.text
        await wait_for(lambda: not deployment.qemu_running(), timeout=60, interval=0.5, message="QEMU gone")
        await wait_for(lambda: _is(power_state(), "Off"), timeout=60, interval=1, message="PowerState Off")


async def test_attached_machine_through_the_mounted_socket_folder(deployment: Deployment) -> None:
    """examples/qemu-bmc.toml's node2: a QEMU the user runs on the host with its QMP socket in
    ./sockets/node2, seen by the machine container as /run/qemu-bmc/node2/qmp.sock."""
    await wait_until_serving()
    (deployment.directory / "sockets/node2").mkdir(exist_ok=True)
    qemu = subprocess.Popen(["qemu-system-x86_64", *deployment.guest.qemu_args(nic=False),
                             "-qmp", "unix:sockets/node2/qmp.sock,server=on,wait=off", "-no-shutdown"],
                            cwd=deployment.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        await wait_for(lambda: _is(power_status(NODE2_IPMI), "Chassis Power is on"), timeout=90, interval=1,
                       message="the attached QEMU reported on")
    finally:
        qemu.kill()
        qemu.wait()
    await wait_for(lambda: _is(power_status(NODE2_IPMI), "Chassis Power is off"), timeout=90, interval=1,
                   message="the attached QEMU gone: off")


async def test_the_image_boots_virtual_media_over_http(deployment: Deployment) -> None:
    """The image keeps QEMU's curl driver alone from qemu-block-extra (Dockerfile): a CD image
    served over HTTP boots in the image's QEMU."""
    iso = deployment.guest.iso
    with FileServer(iso.parent) as server:
        container = deployment.engine.docker(
            "run", "-d", "--network", "host", f"qemu-bmc:{TAG}", "qemu-system-x86_64", "-nodefaults",
            "-display", "none", "-m", "64", "-serial", "stdio", "-boot", "d",
            "-drive", f"file={server.url(iso.name)},media=cdrom,readonly=on").stdout.strip()
        try:
            await wait_for(lambda: "MARKER-CD" in deployment.engine.docker("logs", container).stdout, timeout=120,
                           interval=1, message="the CD's marker on the serial port")
        finally:
            deployment.engine.docker("rm", "-f", container, check=False)


async def test_services_listed_inside_a_container(deployment: Deployment) -> None:
    await wait_until_serving()
    result = deployment.compose("exec", "-T", "state", "qemu-bmc", "services")
    for kind in ("machine", "state", "ipmi-lan", "vmwire", "redfish"):
        assert kind in result.stdout, result.stdout
    assert deployment.token not in result.stdout + result.stderr


async def test_nats_refuses_a_client_without_the_token(deployment: Deployment) -> None:
    await wait_until_serving()
    for credentials in ("", "wrong-token@"):  # a plain nats-py client, trying once
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            await nats.connect(f"nats://{credentials}127.0.0.1:{deployment.nats_port}", allow_reconnect=False,
                               connect_timeout=10)
    client = await nats.connect(f"nats://{deployment.token}@127.0.0.1:{deployment.nats_port}",
                                allow_reconnect=False, connect_timeout=10)
    await client.close()
    # and the project's client says why
    with pytest.raises(bus.BusUnreachable, match="authorization refused"):
        await bus.connect(f"nats://127.0.0.1:{deployment.nats_port}", "intruder", timeout=5)


async def test_the_nats_cluster_example_admits_only_routes_with_the_token(
        engine: ContainerEngine, tmp_path: Path) -> None:
    """examples/compose.nats-cluster.yaml's three nodes (alone, a project of their own): they form
    a JetStream cluster (a stream with 3 replicas is made), and a nats-server on compose's network
    whose routes lack the token, or give a wrong one, is refused by the nodes."""
    directory = tmp_path / "qbcluster"
    directory.mkdir()
    token, port = compose_project(directory, TAG, "examples/compose.nats-cluster.yaml",
                                  "examples/compose.nats-cluster.conf")
    files = ("-f", "compose.yaml", "-f", "examples/compose.nats-cluster.yaml")
    engine.compose(directory, *files, "up", "-d", "nats", "nats-2", "nats-3")
    intruder = None
    try:
        client = await nats.connect(f"nats://{token}@127.0.0.1:{port}", connect_timeout=10)
        try:
            async def replicated_stream() -> bool:
                try:
                    await client.jetstream().add_stream(name="probe", subjects=["probe.>"], num_replicas=3)
                except nats.errors.Error:
                    return False  # no cluster (yet): no meta leader, or too few servers
                return True

            await wait_for(replicated_stream, timeout=120, interval=1, message="a stream on three nodes")
        finally:
            await client.close()
        network = engine.docker("network", "ls", "-q", "--filter",
                                f"label=com.docker.compose.project={directory.name}").stdout.split()[0]
        intruder = engine.docker("run", "-d", "--network", network, NATS_IMAGE, "--cluster", "nats://0.0.0.0:6222",
                                 "--routes", "nats://route:wrong-token@nats:6222,nats://nats-2:6222").stdout.strip()

        def refusals() -> int:
            return engine.docker("logs", intruder).stderr.count("Authorization Violation")

        await wait_for(lambda: refusals() >= 2, timeout=60, interval=1, message="both routes refused")
    finally:
        if intruder:
            engine.docker("rm", "-f", intruder, check=False)
        engine.compose(directory, *files, "down", "-v", check=False, timeout=300)


async def test_scaled_front_ends_take_over(deployment: Deployment) -> None:
    await wait_until_serving()
    deployment.compose("up", "-d", "--no-build", "--scale", "ipmi-lan=2", "--scale", "redfish=2", timeout=600)
    try:
        replicas = {service: deployment.containers(service) for service in ("ipmi-lan", "redfish")}
        for containers in replicas.values():
            assert len(containers) == 2
            await wait_for(lambda containers=containers: all(map(deployment.running, containers)), timeout=60,
                           interval=1, message="both replicas running")
        await wait_until_serving()
        # each replica in turn stopped: the other one serves (IPMI: takes the addresses over;
        # Redfish: the kernel gives the shared port's connections to the replica left)
        for containers in replicas.values():
            for stopped, other in (containers, containers[::-1]):
                deployment.engine.docker("stop", stopped)
                await wait_until_serving()
                assert deployment.running(other) and not deployment.running(stopped)
                deployment.engine.docker("start", stopped)
                await wait_for(lambda stopped=stopped: deployment.running(stopped), timeout=60, interval=1,
                               message="the replica back")
    finally:
        deployment.compose("up", "-d", "--no-build", "--scale", "ipmi-lan=1", "--scale", "redfish=1", timeout=600)
    await wait_until_serving()


async def test_each_container_restarts(deployment: Deployment) -> None:
    await wait_until_serving()
    for service in SERVICES:
        deployment.compose("restart", service, timeout=300)
        await wait_until_serving()
    # the bus works end to end after all the restarts: a power cycle
    code, output = await ipmi(NODE1_IPMI, "power", "on")
    assert code == 0, output
    await wait_for(deployment.qemu_running, timeout=60, interval=0.5, message="QEMU after the restarts")
    code, output = await ipmi(NODE1_IPMI, "power", "off")
    assert code == 0, output
    await wait_for(lambda: not deployment.qemu_running(), timeout=60, interval=0.5, message="QEMU gone")


def server_certificate() -> str:
    return ssl.get_server_certificate(("127.0.0.1", 8443))


async def test_down_and_up_keep_users_and_certificate(deployment: Deployment) -> None:
    await wait_until_serving()
    async with redfish() as client:
        response = await client.post("/redfish/v1/AccountService/Accounts",
                                     json={"UserName": "operator1", "Password": "operator-pass-1",
                                           "RoleId": "Operator"})
        assert response.status_code == 201, response.text
    certificate = server_certificate()
    deployment.compose("down", "--timeout", "40", timeout=300)  # the volumes stay
    deployment.compose("up", "-d", "--no-build", timeout=600)
    await wait_until_serving()
    assert server_certificate() == certificate
    async with redfish(("operator1", "operator-pass-1")) as client:
        response = await client.get("/redfish/v1/Systems/node1")
        assert response.status_code == 200, response.text
    assert json.loads(json.dumps(response.json()))["Id"] == "node1"
