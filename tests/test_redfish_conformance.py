"""DMTF's validators against the Redfish service, offline, authenticated: redfish-service-validator
(every resource against the DMTF CSDL schemas), redfish-protocol-validator (DSP0266 protocol
assertions) and redfish-interop-validator (the OCP and OpenStack Ironic interoperability profiles).
tests/redfish_data.py finds the schemas and the profiles ($REDFISH_CSDL_DIR, $REDFISH_PROFILES_DIR,
../shared/redfish, or the user cache it downloads them into). Zero failures; each warning and what
was not tested is listed in docs/conformance.md. The accounts made over Redfish must change their
password first (``[redfish] password_change_required``), so the protocol validator tests its
password change required handling."""

from __future__ import annotations

import asyncio
import csv
import os
import re
import sys
from pathlib import Path

import pytest
import redfish_data
from conftest import INTERNAL_TARGETS, REPO, free_tcp_port, toml_list, wait_for, write_config
from guest_images import GuestImages
from http_server import FileServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import FirmwareUpdate, FirmwareUpdated, PowerRequest, PowerStatus, SelLog
from test_redfish import PASSWORD, USER

#: The interoperability profiles the service must pass, and what each requires (found beside it).
INTEROP_PROFILES = ("OCPBaselineHardwareManagement.v1_1_1", "OCPServerHardwareManagement.v1_1_0",
                    "OCPServiceBaseline.v1_0_0", "OpenStackIronicProfile.v1_2_0")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def csdl() -> Path:
    """The DMTF CSDL bundle, found (or downloaded) before a service starts: a test that lists it first."""
    return redfish_data.directory("csdl")


@pytest.fixture(scope="module")
def profiles() -> Path:
    return redfish_data.directory("profiles")


@pytest.fixture
async def service(nc, services, short_dir: Path, images: GuestImages) -> tuple[str, dict[str, str]]:
    port = free_tcp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\npassword_change_required = true\n'
                                     f'{INTERNAL_TARGETS}'
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args())}\nipmi = "127.0.0.1:6230"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    # a firmware update (the distribution's own SeaBIOS: nothing changes) makes a Task to validate,
    # and the machine's power-on the first record of its log (OCP's baseline requires a LogEntry)
    with FileServer(Path("/usr/share/seabios")) as files:
        await bus.request(nc, "n1", subjects.FIRMWARE_UPDATE, FirmwareUpdate(image_uri=files.url("bios-256k.bin")),
                          FirmwareUpdated, timeout=60)
    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
    await wait_for(lambda: _logged(nc), timeout=30, message="the power-on in the SEL")
    certificate = short_dir / "rt" / "redfish" / "cert.pem"
    # requests lets REQUESTS_CA_BUNDLE override a session's verify: the service's own certificate is the CA
    return f"https://127.0.0.1:{port}", {**os.environ, "REQUESTS_CA_BUNDLE": str(certificate),
                                         "SSL_CERT_FILE": str(certificate)}


async def _logged(nc) -> bool:
    return bool((await bus.request(nc, "n1", subjects.SEL_GET, None, SelLog)).entries)


async def run(*argv: str, env: dict[str, str], cwd: Path) -> str:
    process = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 600)
    return output.decode(errors="replace")


def summary(output: str) -> tuple[int, int, int, int]:
    """PASS, WARN, FAIL and NOT TESTED from the table DMTF's tools print last (colours left out)."""
    counts = re.search(r"PASS\s*\|\s*WARN\s*\|\s*FAIL\s*\|\s*NOT TESTED\s*\|\s*\n[+-]+\n\|"
                       + r"\s*(\d+)\s*\|" * 4, re.sub(r"\x1b\[[0-9;]*m", "", output))
    assert counts, output[-3000:]
    passed, warned, failed, skipped = (int(count) for count in counts.groups())
    return passed, warned, failed, skipped


def documented() -> str:
    return (REPO / "docs" / "conformance.md").read_text()


async def test_service_validator(csdl: Path, service: tuple[str, dict[str, str]], short_dir: Path):
    url, env = service
    logs = short_dir / "service-validator"
    output = await run(str(BIN / "rf_service_validator"), "--rhost", url, "--user", USER, "--password", PASSWORD,
                       "--authtype", "Session", "--schema_directory", str(csdl), "--logdir", str(logs), env=env,
                       cwd=short_dir)
    passed, _, failed, _ = summary(output)
    debug = "\n".join(path.read_text() for path in logs.rglob("RedfishServiceValidatorDebug*.log"))
    failures = sorted(set(re.findall(r" - ERROR - (FAIL - .*)", debug)))
    assert failed == 0 and passed > 300, "\n".join(failures) or output[-3000:]
    warnings = sorted(set(re.findall(r" - WARN - (/\S+) \(.*?\): ([A-Za-z ]+Warning)", debug)))
    text = documented()
    undocumented = [warning for warning in warnings if f"`{warning[0]}`" not in text]
    assert not undocumented, f"warnings not explained in docs/conformance.md: {undocumented}"


async def test_protocol_validator(service: tuple[str, dict[str, str]], short_dir: Path):
    url, env = service
    reports = short_dir / "protocol-validator"
    output = await run(str(BIN / "rf_protocol_validator"), "--rhost", url, "--user", USER, "--password", PASSWORD,
                       "--ca-bundle", env["REQUESTS_CA_BUNDLE"], "--report-dir", str(reports), "--report-type", "tsv",
                       env=env, cwd=short_dir)
    rows = [row for path in reports.glob("*.tsv") for row in csv.DictReader(path.open(), delimiter="\t")]
    assert rows, output[-3000:]
    failures = [f"{row['Assertion']} {row['Method']} {row['URI']}: {row['Message']}" for row in rows
                if row["Result"] == "FAIL"]
    assert not failures, "\n".join(failures)
    assert sum(row["Result"] == "PASS" for row in rows) > 300
    password_change = [(row["Assertion"], row["Result"]) for row in rows
                       if row["Assertion"].startswith("SEC_PWD_CHANGE_REQ_")]
    assert len(password_change) == 4 and all(result == "PASS" for _, result in password_change), password_change
    listed = re.findall(r"`([A-Z0-9_]+\*?)`", documented())
    undocumented = sorted({row["Assertion"] for row in rows if row["Result"] in ("WARN", "NOT_TESTED")
                           and not any(row["Assertion"] == name or (name.endswith("*")
                                       and row["Assertion"].startswith(name[:-1])) for name in listed)})
    assert not undocumented, f"warnings and untested assertions not listed in docs/conformance.md: {undocumented}"


def profile_directory(profiles: Path, into: Path) -> Path:
    """The profiles, linked into ``into``. The validator (3.0.4) looks for a required profile under
    the file name of the version the requiring profile names (OCPBaselineHardwareManagement.v1_1_0
    for OCPServerHardwareManagement), even when it found a newer one: each profile is linked under
    the names of the older versions of its major version too."""
    into.mkdir()
    for profile in profiles.glob("*.json"):
        (into / profile.name).symlink_to(profile)
        name, major, minor, patch = re.match(r"(.+)\.v(\d+)_(\d+)_(\d+)\.json$", profile.name).groups()
        for older in range(int(patch)):
            alias = into / f"{name}.v{major}_{minor}_{older}.json"
            if not alias.exists():
                alias.symlink_to(profile)
    return into


@pytest.mark.parametrize("profile", INTEROP_PROFILES)
async def test_interop_validator(profiles: Path, service: tuple[str, dict[str, str]], short_dir: Path, profile: str):
    url, env = service
    linked = profile_directory(profiles, short_dir / "profiles")
    logs = short_dir / "interop-validator"
    output = await run(str(BIN / "rf_interop_validator"), "--rhost", url, "--user", USER, "--password", PASSWORD,
                       "--authtype", "Session", "--logdir", str(logs), str(linked / f"{profile}.json"), env=env,
                       cwd=short_dir)
    passed, _, failed, _ = summary(output)
    debug = "\n".join(path.read_text() for path in logs.rglob("RedfishInteropValidatorDebug*.log"))
    failures = sorted(set(re.findall(r" - ERROR - (FAIL - .*)", debug)))
    assert failed == 0 and passed > 0, "\n".join(failures) or output[-3000:]
    report = "\n".join(path.read_text() for path in logs.rglob("RedfishInteropValidatorReport*.html"))
    section = documented().partition("## Interop validator: not tested")[2].partition("\n## ")[0]
    undocumented = sorted({name for name in not_tested(report) if f"`{name}`" not in section})
    assert not undocumented, f"not tested, and not listed in docs/conformance.md: {undocumented}"


def not_tested(report: str) -> set[str]:
    """What the interop validator's HTML report marks SKIP (not tested): each property (its path,
    array indexes left out) or, under "Service Resource Requirements", resource."""
    names = set()
    for body in re.split(r'<div class="resource-uri">.*?</div>', report)[1:]:
        for name in re.findall(r"<tr><td>([^<]*)</td><td>(?:(?!</tr>).)*?<td class=\"res-skip\">SKIP</td></tr>",
                               body, re.S):
            names.add("/".join(part for part in name.removesuffix(" (Write)").split("/") if not part.isdigit()))
    return names


async def test_use_case_checkers(service: tuple[str, dict[str, str]], short_dir: Path):
    """Every category of DMTF's redfish-use-case-checkers (power control, boot override, account
    management, manager Ethernet interfaces, query parameters) on a real machine: every check
    passes; the only one skipped is "Enable User", because a new account is enabled at once."""
    url, env = service
    reports = short_dir / "use-cases"
    output = await run(str(BIN / "rf_use_case_checkers"), "--rhost", url, "--user", USER, "--password", PASSWORD,
                       "--report-dir", str(reports), env=env, cwd=short_dir)
    passed, warned, failed, skipped = summary(output)
    log = "\n".join(path.read_text() for path in reports.rglob("RedfishUseCaseCheckersDebug*.log"))
    problems = re.findall(r" - (?:ERROR|WARNING) - (.*)", log)
    assert (warned, failed) == (0, 0), "\n".join(problems) or output[-3000:]
    skips = re.findall(r" - INFO - Skipping the (.*) test\.\.\.\n.* - INFO - (.*)", log)
    assert [test for test, _ in skips] == ["Enable User"] and "already enabled" in skips[0][1], skips
    assert skipped == 1 and passed > 80, output[-3000:]
