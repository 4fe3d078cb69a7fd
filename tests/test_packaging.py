"""The files around the code: compose validates, every subject is documented."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from qemu_bmc_shared import subjects

REPO = Path(__file__).resolve().parent.parent


def compose_config(env_file: Path, *files: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of ``files`` with only ``env_file`` and ``env`` (not a .env of the checkout)."""
    arguments = [argument for name in files for argument in ("-f", str(REPO / name))]
    return subprocess.run(["docker-compose", "--env-file", str(env_file), *arguments, "config"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_compose_files_validate(tmp_path):
    from qemu_bmc.compose import init

    assert init(tmp_path) == 0  # the .env `qemu-bmc compose init` writes
    env_file = tmp_path / ".env"
    token = re.search(r"^NATS_TOKEN=(\S+)$", env_file.read_text(), re.M)[1]
    overrides = ["compose.kvm.yaml", "examples/compose.shards.yaml", "examples/compose.nats-cluster.yaml"]
    for files in (["compose.yaml"], *(["compose.yaml", override] for override in overrides)):
        result = compose_config(env_file, *files)
        assert result.returncode == 0, result.stderr
        for service in ("nats:", "state:", "machine:", "ipmi-lan:", "vmwire:", "redfish:"):
            assert service in result.stdout
        # every service on the bus gives the token; what listens is on loopback
        assert f"NATS_TOKEN: {token}" in result.stdout
        urls = re.findall(r"NATS_URL: (\S+)", result.stdout)
        assert urls and all(url.startswith(f"nats://{token}@") for url in urls), urls
        assert "127.0.0.1:4222:4222" in result.stdout
    # the host port and address of NATS are the operator's
    result = compose_config(env_file, "compose.yaml", env={"NATS_HOST": "127.0.0.2", "NATS_PORT": "14222"})
    assert "127.0.0.2:14222:4222" in result.stdout and "@127.0.0.2:14222" in result.stdout, result.stderr
    # a second host: its machine service and endpoints on the first host's bus
    result = compose_config(env_file, "examples/compose.host-b.yaml", env={"NATS_URL": "nats://t@host-a:4222"})
    assert result.returncode == 0 and "nats://t@host-a:4222" in result.stdout, result.stderr


def test_compose_refuses_to_start_without_a_nats_token(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    for files in (["compose.yaml"], ["compose.yaml", "examples/compose.nats-cluster.yaml"]):
        result = compose_config(empty, *files)
        assert result.returncode != 0
        assert "NATS_TOKEN" in result.stderr and "qemu-bmc compose init" in result.stderr, result.stderr


def test_compose_init_makes_a_secret_env_once(tmp_path, capsys):
    from qemu_bmc.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["compose", "init", "--directory", str(tmp_path)])
    assert exited.value.code == 0
    env_file = tmp_path / ".env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    first = env_file.read_text()
    token = re.search(r"^NATS_TOKEN=([A-Za-z0-9_-]{40,})$", first, re.M)
    assert token, first
    assert "# NATS_HOST=127.0.0.1" in first and "# NATS_PORT=4222" in first
    assert str(env_file) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:  # never overwritten
        main(["compose", "init", "--directory", str(tmp_path)])
    assert exited.value.code == 0 and env_file.read_text() == first
    assert "exists" in capsys.readouterr().out


def test_lock_covers_every_runtime_dependency():
    """requirements.lock (what the image installs) pins each dependency of pyproject.toml at a
    version its specifier accepts, with hashes."""
    pinned: dict[str, Version] = {}
    text = (REPO / "requirements.lock").read_text()
    for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M):
        pinned[canonicalize_name(name)] = Version(version)
    for block in re.split(r"\n(?=[A-Za-z])", text):  # one block per pinned package
        if "==" in block:
            assert "--hash=sha256:" in block, block
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in map(Requirement, dependencies):
        name = canonicalize_name(dependency.name)
        assert name in pinned, f"{dependency.name} is not in requirements.lock"
        assert dependency.specifier.contains(pinned[name], prereleases=True), \
            f"requirements.lock has {dependency.name} {pinned[name]}, pyproject asks {dependency.specifier}"


def test_every_subject_is_documented():
    text = (REPO / "docs" / "subjects.md").read_text()
    for operation in (*subjects.MACHINE_ENDPOINTS, *subjects.STATE_ENDPOINTS, *subjects.VMWIRE_ENDPOINTS,
                      *subjects.EVENTS):
        assert f"`bmc.<m>.{operation}`" in text, operation


def test_example_config_loads():
    from qemu_bmc_shared.config import load

    config = load(REPO / "examples" / "qemu-bmc.toml")
    assert config.vms
