"""The files around the code: compose validates, every subject is documented."""

from __future__ import annotations

import subprocess
from pathlib import Path

from qemu_bmc_shared import subjects

REPO = Path(__file__).resolve().parent.parent


def test_compose_files_validate():
    overrides = ["compose.kvm.yaml", "examples/compose.shards.yaml", "examples/compose.nats-cluster.yaml"]
    for files in (["compose.yaml"], *(["compose.yaml", override] for override in overrides)):
        arguments = [argument for name in files for argument in ("-f", str(REPO / name))]
        result = subprocess.run(["docker-compose", *arguments, "config"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        for service in ("nats:", "state:", "machine:", "ipmi-lan:", "vmwire:", "redfish:"):
            assert service in result.stdout
    # a second host: its machine service and endpoints on the first host's bus
    result = subprocess.run(["docker-compose", "-f", str(REPO / "examples/compose.host-b.yaml"), "config"],
                            capture_output=True, text=True, env={"NATS_URL": "nats://host-a:4222", "PATH": "/usr/bin"})
    assert result.returncode == 0 and "nats://host-a:4222" in result.stdout, result.stderr


def test_every_subject_is_documented():
    text = (REPO / "docs" / "subjects.md").read_text()
    for operation in (*subjects.MACHINE_ENDPOINTS, *subjects.STATE_ENDPOINTS, *subjects.VMWIRE_ENDPOINTS,
                      *subjects.EVENTS):
        assert f"`bmc.<m>.{operation}`" in text, operation


def test_example_config_loads():
    from qemu_bmc_shared.config import load

    config = load(REPO / "examples" / "qemu-bmc.toml")
    assert config.vms
