"""The Chassis' power and thermal resources, the SEL as Redfish LogServices, the CertificateService
and the UpdateService, against the real services, a real QEMU machine and real clients: redfishtool,
DMTF's Redfish Tacklebox (rf_sensor_list.py, rf_logs.py, rf_certificates.py), ipmitool.

The machine has no boot disk: SeaBIOS never arms the ACPI power button, so a graceful shutdown
is ignored (the SEL's "agent not responding" record) as a hung OS would ignore it."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import clients
import httpx
import pytest
from conftest import free_tcp_port, free_udp_port, no_exception_logged, toml_list, wait_for, write_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from guest_images import GuestImages
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import Hardware, PasswordSet, PowerStatus, SelLog, User, UserAccessUpdate, UserUpdate
from test_redfish import PASSWORD, USER
from test_redfish_clients import redfishtool_json

BIN = Path(sys.executable).parent
CHASSIS, SYSTEM, MANAGER = "/redfish/v1/Chassis/n1", "/redfish/v1/Systems/n1", "/redfish/v1/Managers/n1"
SEL = f"{SYSTEM}/LogServices/SEL"
NOMINAL = {"power_watts": 150, "cpu_celsius": 55, "board_celsius": 38, "intake_celsius": 22}
CERTIFICATE = f"{MANAGER}/NetworkProtocol/HTTPS/Certificates/1"


class Bmc:
    def __init__(self, nc, url: str, ipmi_port: int, directory: Path) -> None:
        self.nc, self.url, self.ipmi_port, self.directory = nc, url, ipmi_port, directory

    def client(self, user: str = USER, password: str = PASSWORD) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, auth=(user, password), verify=False, timeout=60)

    async def get(self, path: str) -> Any:
        async with self.client() as client:
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text)
            return response.json()

    async def reset(self, reset_type: str) -> None:
        async with self.client() as client:
            response = await client.post(f"{SYSTEM}/Actions/ComputerSystem.Reset", json={"ResetType": reset_type})
            assert response.status_code == 204, response.text

    async def power(self) -> str:
        return (await bus.request(self.nc, "n1", subjects.POWER_GET, None, PowerStatus)).state

    async def ipmitool(self, *args: str) -> tuple[int, str]:
        return await clients.ipmitool(self.ipmi_port, *args, user=USER, password=PASSWORD)

    async def tacklebox(self, script: str, *args: str) -> str:
        """A Redfish Tacklebox script (session login, no certificate verification); its output."""
        code, output = await clients.run(str(BIN / script), "-u", USER, "-p", PASSWORD, "-r", self.url, *args,
                                         timeout=120)
        assert code == 0, output
        return output

    async def messages(self) -> list[str]:
        return [entry["Message"] for entry in (await self.get(f"{SEL}/Entries"))["Members"]]


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages) -> AsyncIterator[Bmc]:
    port, ipmi_port = free_tcp_port(), free_udp_port()
    environment = "".join(f"{key} = {value}\n" for key, value in NOMINAL.items())
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n'
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args(disk=False, nic=False))}\n'
                                     f'ipmi = "127.0.0.1:{ipmi_port}"\ngraceful_timeout = 1\n'
                                     f'[vm.n1.environment]\n{environment}')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("ipmi-lan", config)
    await services("redfish", config)
    with no_exception_logged(short_dir / "redfish.log"), no_exception_logged(short_dir / "state.log"):
        yield Bmc(nc, f"https://127.0.0.1:{port}", ipmi_port, short_dir)


def message_id(response: httpx.Response) -> str:
    return response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].rsplit(".", 1)[1]


async def add_reader(nc) -> None:
    """A ReadOnly user (IPMI User privilege) in slot 5, straight on the bus."""
    await bus.request(nc, "n1", subjects.USERS_SET, UserUpdate(slot=5, name="reader", enabled=True), User)
    await bus.request(nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=5, password="reader-pass-1"), User)
    await bus.request(nc, "n1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=5, channel=1, privilege=2, ipmi_messaging=True), User)


async def test_power_and_thermal_follow_the_machine(bmc: Bmc):
    chassis = await bmc.get(CHASSIS)
    for name in ("PowerSubsystem", "ThermalSubsystem", "EnvironmentMetrics", "Sensors", "Power", "Thermal"):
        assert chassis[name] == {"@odata.id": f"{CHASSIS}/{name}"}

    # off: 0 W, every temperature the intake's; no fans, no power supplies (redfishtool, DMTF's client)
    power = await redfishtool_json(bmc, "Chassis", "-I", "n1", "Power")
    control = power["PowerControl"][0]
    assert (control["PowerConsumedWatts"], control["PowerCapacityWatts"]) == (0, NOMINAL["power_watts"])
    assert control["PowerLimit"] == {"LimitInWatts": None, "LimitException": "NoAction"}
    assert power["PowerSupplies"] == []
    thermal = await redfishtool_json(bmc, "Chassis", "-I", "n1", "Thermal")
    assert thermal["Fans"] == []
    temperatures = {entry["PhysicalContext"]: entry for entry in thermal["Temperatures"]}
    assert set(temperatures) == {"CPU", "Intake", "SystemBoard"}
    assert {entry["ReadingCelsius"] for entry in temperatures.values()} == {NOMINAL["intake_celsius"]}
    assert all(entry["UpperThresholdNonCritical"] < entry["UpperThresholdCritical"] < entry["UpperThresholdFatal"]
               for entry in temperatures.values())

    # on: the nominal figures, in every model of the same readings
    await bmc.reset("On")

    async def drawing() -> Any:
        control = (await bmc.get(f"{CHASSIS}/Power"))["PowerControl"][0]
        return control["PowerConsumedWatts"] == NOMINAL["power_watts"]

    await wait_for(drawing, timeout=30, message="the nominal power reading")
    thermal = await redfishtool_json(bmc, "Chassis", "-I", "n1", "Thermal")
    assert {entry["PhysicalContext"]: entry["ReadingCelsius"] for entry in thermal["Temperatures"]} == {
        "CPU": NOMINAL["cpu_celsius"], "SystemBoard": NOMINAL["board_celsius"], "Intake": NOMINAL["intake_celsius"]}
    assert {entry["Status"]["Health"] for entry in thermal["Temperatures"]} == {"OK"}
    sensors = await bmc.get(f"{CHASSIS}/Sensors")
    readings = {member["@odata.id"].rsplit("/", 1)[1]: await bmc.get(member["@odata.id"])
                for member in sensors["Members"]}
    assert readings["TotalPower"]["Reading"] == NOMINAL["power_watts"] and readings["TotalPower"]["ReadingUnits"] == "W"
    assert readings["CPUTemp"]["Reading"] == NOMINAL["cpu_celsius"] and readings["CPUTemp"]["ReadingUnits"] == "Cel"
    assert readings["CPUTemp"]["Implementation"] == "Synthesized"  # a model, and it says so
    metrics = await bmc.get(f"{CHASSIS}/ThermalSubsystem/ThermalMetrics")
    assert metrics["TemperatureSummaryCelsius"]["Intake"] == {"DataSourceUri": f"{CHASSIS}/Sensors/IntakeTemp",
                                                              "Reading": NOMINAL["intake_celsius"]}
    assert (await bmc.get(f"{CHASSIS}/EnvironmentMetrics"))["PowerWatts"]["Reading"] == NOMINAL["power_watts"]
    listed = await bmc.tacklebox("rf_sensor_list.py")
    assert "150.00 W" in listed and "55.00 Cel" in listed and "CPU" in listed, listed
    async with bmc.client() as client:
        response = await client.get(f"{CHASSIS}/Sensors/FanSpeed")
        assert response.status_code == 404 and message_id(response) == "ResourceNotFound"

    # off again: 0 W
    await bmc.reset("ForceOff")
    assert (await bmc.get(f"{CHASSIS}/Sensors/TotalPower"))["Reading"] == 0
    assert (await bmc.get(f"{CHASSIS}/Sensors/CPUTemp"))["Reading"] == NOMINAL["intake_celsius"]


async def test_sel_as_log_entries(bmc: Bmc):
    for container in (SYSTEM, MANAGER):
        assert (await bmc.get(container))["LogServices"] == {"@odata.id": f"{container}/LogServices"}
        services = await bmc.get(f"{container}/LogServices")
        assert services["Members"] == [{"@odata.id": f"{container}/LogServices/SEL"}]
        service = await bmc.get(f"{container}/LogServices/SEL")
        assert (service["LogEntryType"], service["OverWritePolicy"], service["MaxNumberOfRecords"]) == (
            "SEL", "WrapsWhenFull", (await bus.request(bmc.nc, "n1", subjects.SEL_GET, None, SelLog)).capacity)

    # power on and off: the SEL feed's records, decoded
    await bmc.reset("On")
    await bmc.reset("ForceOff")
    await wait_for(lambda: _has(bmc, "The machine was powered off."), timeout=30, message="the power-off entry")
    entries = (await bmc.get(f"{SEL}/Entries"))["Members"]
    on, off = (next(entry for entry in entries if entry["Message"] == text)
               for text in ("The machine was powered on.", "The machine was powered off."))
    assert (on["EntryType"], on["SensorType"], on["SensorNumber"], on["EntryCode"], on["MessageId"]) == (
        "SEL", "PowerUnit", 1, "Deassert", "0xEF00FFFF")
    assert (off["EntryCode"], off["MessageId"], off["GeneratorId"], off["Severity"]) == (
        "Assert", "0x6F00FFFF", "0x0020", "OK")
    assert int(off["Id"]) > int(on["Id"])
    created = datetime.datetime.fromisoformat(off["Created"])
    assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 3600
    assert {key: value for key, value in (await bmc.get(off["@odata.id"])).items() if key != "@odata.etag"} == off
    output = await bmc.tacklebox("rf_logs.py", "-s", "n1", "-details")
    assert "The machine was powered on." in output and "SensorType: PowerUnit" in output, output

    # a graceful shutdown the guest ignores: OS Stop / Shutdown, agent not responding; still on
    await bmc.reset("On")
    await bmc.reset("GracefulShutdown")
    await wait_for(lambda: _has(bmc, "agent not responding"), timeout=30, message="the graceful time-out entry")
    assert await bmc.power() == "On"
    timeout_entry = next(entry for entry in (await bmc.get(f"{SEL}/Entries"))["Members"]
                         if "agent not responding" in entry["Message"])
    assert (timeout_entry["SensorType"], timeout_entry["MessageId"], timeout_entry["Severity"]) == (
        "OS Stop/Shutdown", "0x6F05FFFF", "Warning")
    await bmc.reset("ForceOff")

    # user changes, from IPMI and from Redfish, are logged by the state service
    code, output = await bmc.ipmitool("user", "set", "name", "3", "operator1")
    assert code == 0, output
    await wait_for(lambda: _has(bmc, "User 3: name set."), message="the IPMI user change entry")
    async with bmc.client() as client:
        response = await client.post("/redfish/v1/AccountService/Accounts",
                                     json={"UserName": "viewer", "Password": "viewer-pass-1", "RoleId": "ReadOnly"})
        assert response.status_code == 201, response.text
    messages = await bmc.messages()
    assert any(message.endswith("name set.") and not message.startswith("User 3") for message in messages), messages
    assert any("access on channel 1: User with IPMI messaging" in message for message in messages), messages
    code, output = await bmc.ipmitool("sel", "list")
    assert code == 0 and "Power Unit" in output and "OEM" in output, output  # IPMI reads the same log

    # ClearLog: errors, privileges, the entries' ETag; then IPMI's SEL is empty too
    clear = f"{SEL}/Actions/LogService.ClearLog"
    async with bmc.client() as client:
        response = await client.post(clear, json={"Everything": True})
        assert response.status_code == 400 and message_id(response) == "ActionParameterUnknown"
        response = await client.post(clear, json={"LogEntriesETag": 'W/"0000"'})
        assert response.status_code == 428, response.text
    await add_reader(bmc.nc)
    async with bmc.client("reader", "reader-pass-1") as reader:
        assert (await reader.get(f"{SEL}/Entries")).status_code == 200
        response = await reader.post(clear, json={})
        assert response.status_code == 403 and message_id(response) == "InsufficientPrivilege"
    assert await bmc.messages()
    output = await bmc.tacklebox("rf_logs.py", "-s", "n1", "-clear")
    assert "Clearing the log" in output
    code, output = await bmc.ipmitool("sel", "list")
    assert code == 0 and "SEL has no entries" in output, output
    assert await bmc.messages() == []


async def _has(bmc: Bmc, text: str) -> bool:
    return any(text in message for message in await bmc.messages())


def self_signed(name: str) -> tuple[x509.Certificate, str]:
    """A new certificate for 127.0.0.1 and the PEM of it and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                   .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return certificate, certificate.public_bytes(serialization.Encoding.PEM).decode() + key_pem


def signed_by(signing_request: x509.CertificateSigningRequest, authority: x509.Certificate,
              authority_pem: str) -> x509.Certificate:
    """The certificate a certificate authority makes for a CSR."""
    key = serialization.load_pem_private_key(authority_pem.encode(), password=None)
    now = datetime.datetime.now(datetime.UTC)
    alternative = signing_request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (x509.CertificateBuilder().subject_name(signing_request.subject).issuer_name(authority.subject)
            .public_key(signing_request.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(alternative, critical=False).sign(key, hashes.SHA256()))


async def served_certificate(bmc: Bmc) -> x509.Certificate:
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", int(bmc.url.rsplit(":", 1)[1])))
    return x509.load_pem_x509_certificate(pem.encode())


async def test_certificates_and_firmware_inventory(bmc: Bmc):
    root = await bmc.get("/redfish/v1")
    assert root["CertificateService"] == {"@odata.id": "/redfish/v1/CertificateService"}
    locations = await bmc.get("/redfish/v1/CertificateService/CertificateLocations")
    assert locations["Links"]["Certificates"] == [{"@odata.id": CERTIFICATE}]
    protocol = await bmc.get(f"{MANAGER}/NetworkProtocol")
    assert protocol["HTTPS"]["Certificates"] == {"@odata.id": f"{MANAGER}/NetworkProtocol/HTTPS/Certificates"}
    shown = await bmc.get(CERTIFICATE)
    served = await served_certificate(bmc)
    assert x509.load_pem_x509_certificate(shown["CertificateString"].encode()) == served
    assert shown["CertificateType"] == "PEM" and "PRIVATE KEY" not in shown["CertificateString"]
    assert shown["Fingerprint"] == ":".join(f"{byte:02X}" for byte in served.fingerprint(hashes.SHA256()))
    assert "ServerAuthentication" in shown["KeyUsage"] and shown["Subject"]["Organization"] == "qemu-bmc"
    output = await bmc.tacklebox("rf_certificates.py", "info")
    assert CERTIFICATE in output and "qemu-bmc" in output, output

    # ReplaceCertificate: refused with a key of another certificate, and below ConfigureManager
    replace = "/redfish/v1/CertificateService/Actions/CertificateService.ReplaceCertificate"
    new, pem = self_signed("replaced.example")
    _, other = self_signed("other.example")
    mismatched = pem.split("-----BEGIN PRIVATE KEY-----")[0] + "-----BEGIN PRIVATE KEY-----" + other.split(
        "-----BEGIN PRIVATE KEY-----")[1]
    body = {"CertificateString": mismatched, "CertificateType": "PEM", "CertificateUri": {"@odata.id": CERTIFICATE}}
    async with bmc.client() as client:
        response = await client.post(replace, json=body)
        assert response.status_code == 400 and message_id(response) == "ActionParameterValueError", response.text
        assert "does not belong" in response.text
        response = await client.post(replace, json={**body, "CertificateUri": {"@odata.id": "/redfish/v1"}})
        assert response.status_code == 400 and message_id(response) == "ActionParameterValueNotInList"
    await add_reader(bmc.nc)
    async with bmc.client("reader", "reader-pass-1") as reader:
        response = await reader.post(replace, json={**body, "CertificateString": pem})
        assert response.status_code == 403
    assert await served_certificate(bmc) == served

    # replaced: served from the next connection on, and shown
    async with bmc.client() as client:
        response = await client.post(replace, json={**body, "CertificateString": pem})
        assert response.status_code == 200, response.text
        assert response.headers["Location"] == CERTIFICATE
    await wait_for(lambda: _serves(bmc, new), message="the new certificate served")
    shown = await bmc.get(CERTIFICATE)
    assert shown["Subject"]["CommonName"] == "replaced.example" and shown["Subject"]["Country"] == "FR"
    assert "PRIVATE KEY" not in shown["CertificateString"]

    # GenerateCSR, signed by a certificate authority, installed without its key (which never left the service)
    service = await bmc.get("/redfish/v1/CertificateService")
    generate = service["Actions"]["#CertificateService.GenerateCSR"]
    info = await bmc.get(generate["@Redfish.ActionInfo"])
    assert {parameter["Name"] for parameter in info["Parameters"] if parameter["Required"]} == {
        "CommonName", "CertificateCollection"}
    collection = {"@odata.id": f"{MANAGER}/NetworkProtocol/HTTPS/Certificates"}
    async with bmc.client() as client:
        response = await client.post(generate["target"], json={"CertificateCollection": collection})
        assert response.status_code == 400 and message_id(response) == "ActionParameterMissing"
        response = await client.post(generate["target"], json={"CertificateCollection": collection, "CommonName": "x",
                                                               "ChallengePassword": "secret"})
        assert response.status_code == 400 and message_id(response) == "ActionParameterNotSupported"
        response = await client.post(generate["target"], json={
            "CertificateCollection": collection, "CommonName": "bmc.example", "Organization": "Lab", "Country": "FR",
            "AlternativeNames": ["localhost", "127.0.0.1"]})
        assert response.status_code == 200, response.text
        assert response.json()["CertificateCollection"] == collection
    signing_request = x509.load_pem_x509_csr(response.json()["CSRString"].encode())
    assert signing_request.is_signature_valid
    assert signing_request.subject.rfc4514_string() == "C=FR,O=Lab,CN=bmc.example"
    authority, authority_pem = self_signed("Lab CA")
    signed = signed_by(signing_request, authority, authority_pem)
    async with bmc.client() as client:
        response = await client.post(replace, json={
            "CertificateString": signed.public_bytes(serialization.Encoding.PEM).decode() + authority_pem.split(
                "-----BEGIN PRIVATE KEY-----")[0], "CertificateType": "PEMchain",
            "CertificateUri": {"@odata.id": CERTIFICATE}})
        assert response.status_code == 200, response.text
    await wait_for(lambda: _serves(bmc, signed), message="the certificate of the CSR served")
    shown = await bmc.get(CERTIFICATE)
    assert (shown["CertificateType"], shown["Issuer"]["CommonName"]) == ("PEMchain", "Lab CA")

    # the firmware inventory: the BMC and the machine's system firmware, which SimpleUpdate can replace
    service = await bmc.get("/redfish/v1/UpdateService")
    assert service["ServiceEnabled"] is True and "#UpdateService.SimpleUpdate" in service["Actions"]
    inventory = await bmc.get(service["FirmwareInventory"]["@odata.id"])
    items = {member["@odata.id"].rsplit("/", 1)[1]: await bmc.get(member["@odata.id"])
             for member in inventory["Members"]}
    assert set(items) == {"BMC", "BIOS-n1"}
    assert items["BMC"]["Version"] == (await bmc.get(MANAGER))["FirmwareVersion"]
    hardware = await bus.request(bmc.nc, "n1", subjects.HARDWARE_GET, None, Hardware)
    assert items["BIOS-n1"]["Version"] == hardware.bios_version
    assert items["BIOS-n1"]["Manufacturer"] == hardware.bios_manufacturer == "SeaBIOS"
    assert items["BIOS-n1"]["RelatedItem"] == [{"@odata.id": SYSTEM}]
    assert (items["BMC"]["Updateable"], items["BIOS-n1"]["Updateable"]) == (False, True)
    output = await bmc.tacklebox("rf_firmware_inventory.py")
    assert "qemu-bmc" in output and "System firmware of n1" in output, output


async def _serves(bmc: Bmc, certificate: x509.Certificate) -> bool:
    return await served_certificate(bmc) == certificate
