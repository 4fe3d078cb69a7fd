"""The suite stands on its own: a copy of the repository with no ../shared beside it and no network
says in one line how to give it the DMTF data (and runs once given it), and the user cache is
filled only with what matches the digests pinned in tests/redfish_data.py: a real download from a
local HTTP server, extracted and checked, of a good and of a tampered bundle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redfish_data
from conftest import REPO
from http_server import FileServer

CSDL_NOT_FOUND = ("DMTF Redfish CSDL schemas not found and not downloadable: set REDFISH_CSDL_DIR to the csdl folder "
                  "of DSP8010 2025.4, published at "
                  "https://www.dmtf.org/sites/default/files/standards/documents/DSP8010_2025.4.zip")


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files (tracked and new, as git lists them) in a folder with nothing beside it."""
    into = tmp_path_factory.mktemp("alone") / "qemu-bmc"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not name.startswith((".venv/", ".git/")):
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    assert not (into.parent / "shared").exists()
    return into


def offline(copy: Path, kind: str, home: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """``python tests/redfish_data.py KIND`` in ``copy``, in a network namespace of its own (no network),
    with ``home`` as HOME, no XDG_CACHE_HOME and no REDFISH_* but ``variables``."""
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    probe = subprocess.run([*unshare, "true"], capture_output=True, text=True)
    assert probe.returncode == 0, f"this test needs a network namespace of its own (unshare --net): {probe.stderr}"
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("REDFISH_") and name != "XDG_CACHE_HOME"}
    env.update(HOME=str(home), **variables)
    return subprocess.run([*unshare, sys.executable, str(copy / "tests" / "redfish_data.py"), kind], cwd=copy,
                          env=env, capture_output=True, text=True, timeout=120)


def test_alone_and_offline_the_lookup_says_in_one_line_what_to_set(copy: Path, tmp_path: Path):
    result = offline(copy, "csdl", tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", CSDL_NOT_FOUND + "\n")
    result = offline(copy, "profiles", tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "set REDFISH_PROFILES_DIR" in result.stderr
    assert "raw.githubusercontent.com/opencomputeproject/HWMgmt-OCP-Profiles" in result.stderr
    assert "opendev.org/openstack/ironic" in result.stderr
    # the failed downloads left nothing in the cache
    assert os.listdir(tmp_path / ".cache" / "qemu-bmc" / "redfish") == []


def test_alone_and_offline_the_lookup_takes_the_folder_it_is_given(copy: Path, tmp_path: Path):
    csdl, profiles = redfish_data.directory("csdl"), redfish_data.directory("profiles")
    result = offline(copy, "csdl", tmp_path, REDFISH_CSDL_DIR=str(csdl))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{csdl}\n", "")
    result = offline(copy, "profiles", tmp_path, REDFISH_PROFILES_DIR=str(profiles))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{profiles}\n", "")
    result = offline(copy, "csdl", tmp_path, REDFISH_CSDL_DIR=str(tmp_path))
    assert (result.returncode, result.stderr) == (1, f"REDFISH_CSDL_DIR={tmp_path} has no ServiceRoot_v1.xml\n")


def test_alone_and_offline_the_cache_is_used_only_when_its_digest_matches(copy: Path, tmp_path: Path):
    cache = tmp_path / ".cache" / "qemu-bmc" / "redfish" / "csdl"
    shutil.copytree(redfish_data.directory("csdl"), cache)
    result = offline(copy, "csdl", tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{cache}\n", "")
    tamper(cache / "ServiceRoot_v1.xml")
    assert not redfish_data.verified("csdl", cache)
    result = offline(copy, "csdl", tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", CSDL_NOT_FOUND + "\n")


def tamper(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b"ServiceRoot", b"ServiceRooT", 1))


def bundle(into: Path, csdl: Path) -> Path:
    """A zip laid out as DSP8010's (csdl/, json-schema/, ...) with the files of ``csdl``."""
    with zipfile.ZipFile(into, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(csdl.glob("*.xml")):
            archive.write(path, f"csdl/{path.name}")
        archive.writestr("json-schema/ServiceRoot.v1_0_0.json", "{}")
        archive.writestr("README.md", "not a schema")
    return into


def test_a_downloaded_bundle_becomes_the_cache_only_when_it_matches_the_digest(tmp_path: Path):
    csdl = redfish_data.directory("csdl")
    served = tmp_path / "served"
    served.mkdir()
    bundle(served / "good.zip", csdl)
    tampered = tmp_path / "tampered"
    shutil.copytree(csdl, tampered)
    tamper(tampered / "ServiceRoot_v1.xml")
    bundle(served / "tampered.zip", tampered)
    cache = tmp_path / "cache" / "qemu-bmc" / "redfish" / "csdl"
    with FileServer(served) as files:
        with pytest.raises(redfish_data.Missing, match=r"do not match the digest .*: refused; set REDFISH_CSDL_DIR"):
            redfish_data.fetch_csdl(cache, files.url("tampered.zip"))
        assert os.listdir(cache.parent) == []  # nothing half made is left to be taken for a cache
        assert redfish_data.fetch_csdl(cache, files.url("good.zip")) == cache
    assert os.listdir(cache.parent) == ["csdl"]
    assert sorted(path.name for path in cache.iterdir()) == sorted(path.name for path in csdl.glob("*.xml"))
    assert redfish_data.verified("csdl", cache)


def test_downloaded_profiles_become_the_cache_only_when_each_matches_its_sha256(tmp_path: Path):
    profiles = redfish_data.directory("profiles")
    served = tmp_path / "served"
    shutil.copytree(profiles, served)
    cache = tmp_path / "cache" / "profiles"
    with FileServer(served) as files:
        urls = {name: files.url(name) for name in redfish_data.PROFILE_SHA256}
        tamper_json = served / "OCPServiceBaseline.v1_0_0.json"
        original = tamper_json.read_bytes()
        tamper_json.write_bytes(original + b"\n")
        with pytest.raises(redfish_data.Missing, match=r"OCPServiceBaseline.v1_0_0.json does not match the sha256"):
            redfish_data.fetch_profiles(cache, urls)
        assert os.listdir(cache.parent) == []
        tamper_json.write_bytes(original)
        assert redfish_data.fetch_profiles(cache, urls) == cache
    assert sorted(path.name for path in cache.iterdir()) == sorted(redfish_data.PROFILE_SHA256)
    assert redfish_data.verified("profiles", cache)
