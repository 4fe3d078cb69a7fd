"""Where the DMTF data of the Redfish conformance tests is: the CSDL schema bundle (DSP8010 2025.4)
and the interoperability profiles. Each is looked for at its variable ($REDFISH_CSDL_DIR,
$REDFISH_PROFILES_DIR), then in ../shared/redfish beside the repository, then in the user cache
(${XDG_CACHE_HOME:-~/.cache}/qemu-bmc/redfish), which is filled from where DMTF, OCP and OpenStack
publish the files when the network allows, and only with content matching the digests pinned here.

    python tests/redfish_data.py csdl|profiles    # prints the folder, or in one line why there is none
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CSDL_ZIP = "https://www.dmtf.org/sites/default/files/standards/documents/DSP8010_2025.4.zip"
#: The sha256 of what ``cd csdl && LC_ALL=C sha256sum *.xml`` prints, for the 277 csdl/*.xml of
#: DSP8010 2025.4 (the zip itself is not pinned: the files in it are what the validators read).
CSDL_DIGEST = "d7cf7fc6de9b971e007a97372bfc6878a9cf916377052e5375bcb880a92e1579"
OCP = "https://raw.githubusercontent.com/opencomputeproject/HWMgmt-OCP-Profiles/master/"
IRONIC = "https://opendev.org/openstack/ironic/raw/branch/master/redfish-interop-profiles/"
PROFILE_URLS = {
    "OCPBaselineHardwareManagement.v1_1_1.json": OCP + "OCPBaselineHardwareManagement.v1_1_1.json",
    "OCPServerHardwareManagement.v1_1_0.json": OCP + "Server/OCPServerHardwareManagement.v1_1_0.json",
    "OCPServiceBaseline.v1_0_0.json": OCP + "HWMgmt/OCPServiceBaseline.v1_0_0.json",
    "OpenStackIronicProfile.v1_2_0.json": IRONIC + "OpenStackIronicProfile.v1_2_0.json",
}
PROFILE_SHA256 = {
    "OCPBaselineHardwareManagement.v1_1_1.json": "269bf3e044fd10fbd19cda9e303357cdc78a7aab968bbe4a64b7a1cd21e64cbd",
    "OCPServerHardwareManagement.v1_1_0.json": "ba791385a0981dc1a7cfed227a78a1d3a3cf82e709904ab5ce429d477e75f8e8",
    "OCPServiceBaseline.v1_0_0.json": "429ba94a54cbad3345a3c484f64dbd9e0ce1fe97b2707793f066af0fd945f389",
    "OpenStackIronicProfile.v1_2_0.json": "161f5f296dde04ce7eea5bc0a16eeb26d03a68936dda377aefac71c2ed22ddc8",
}
VARIABLES = {"csdl": ("REDFISH_CSDL_DIR", "REDFISH_CSDL"), "profiles": ("REDFISH_PROFILES_DIR", "REDFISH_PROFILES")}
MARKERS = {"csdl": "ServiceRoot_v1.xml", "profiles": "OCPBaselineHardwareManagement.v1_1_1.json"}
NOT_FOUND = {
    "csdl": "DMTF Redfish CSDL schemas not found and not downloadable: set REDFISH_CSDL_DIR to the csdl folder "
            f"of DSP8010 2025.4, published at {CSDL_ZIP}",
    "profiles": "Redfish interoperability profiles not found and not downloadable: set REDFISH_PROFILES_DIR to a "
                f"folder with {', '.join(PROFILE_URLS)}, published at {OCP} and {IRONIC}",
}


class Missing(Exception):
    """Neither found nor downloaded; the message is one line saying what to do."""


def csdl_digest(directory: Path) -> str:
    listing = "".join(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
                      for path in sorted(directory.glob("*.xml")))
    return hashlib.sha256(listing.encode()).hexdigest()


def verified(kind: str, directory: Path) -> bool:
    """Whether ``directory`` holds exactly the pinned content."""
    if kind == "csdl":
        return csdl_digest(directory) == CSDL_DIGEST
    return all((directory / name).is_file() and hashlib.sha256((directory / name).read_bytes()).hexdigest() == sha
               for name, sha in PROFILE_SHA256.items())


def cache_directory(kind: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qemu-bmc" / "redfish" / kind


def find(kind: str) -> Path:
    """The folder of ``kind`` ("csdl" or "profiles"), downloading it into the cache if need be."""
    for variable in VARIABLES[kind]:
        if chosen := os.environ.get(variable):
            if not (Path(chosen) / MARKERS[kind]).is_file():
                raise Missing(f"{variable}={chosen} has no {MARKERS[kind]}")
            return Path(chosen)
    beside = REPO.parent / "shared" / "redfish" / kind
    if (beside / MARKERS[kind]).is_file():
        return beside
    cache = cache_directory(kind)
    if cache.is_dir() and verified(kind, cache):
        return cache
    if kind == "csdl":
        return fetch_csdl(cache)
    return fetch_profiles(cache)


def fetch_csdl(cache: Path, url: str = CSDL_ZIP) -> Path:
    """Download the bundle at ``url``, keep its csdl/*.xml and make them ``cache`` if they match the digest."""
    with _staging(cache) as staging:
        bundle = staging / "bundle.zip"
        _download(url, bundle, "csdl")
        files = staging / "csdl"
        files.mkdir()
        try:
            with zipfile.ZipFile(bundle) as archive:
                for member in archive.namelist():
                    path = Path(member)
                    if path.parent.name == "csdl" and path.suffix == ".xml":
                        (files / path.name).write_bytes(archive.read(member))
        except zipfile.BadZipFile as error:
            raise Missing(f"{url} is not a zip ({error}): refused; set REDFISH_CSDL_DIR instead") from None
        if (digest := csdl_digest(files)) != CSDL_DIGEST:
            raise Missing(f"the csdl/*.xml of {url} do not match the digest pinned in tests/redfish_data.py "
                          f"({digest}, not {CSDL_DIGEST}): refused; set REDFISH_CSDL_DIR instead")
        return _install(files, cache, "csdl")


def fetch_profiles(cache: Path, urls: dict[str, str] = PROFILE_URLS) -> Path:
    """Download each profile from ``urls`` and make them ``cache`` if each matches its pinned sha256."""
    with _staging(cache) as staging:
        files = staging / "profiles"
        files.mkdir()
        for name, url in urls.items():
            _download(url, files / name, "profiles")
            if (sha := hashlib.sha256((files / name).read_bytes()).hexdigest()) != PROFILE_SHA256[name]:
                raise Missing(f"{url} does not match the sha256 pinned in tests/redfish_data.py ({sha}, not "
                              f"{PROFILE_SHA256[name]}): refused; set REDFISH_PROFILES_DIR instead")
        return _install(files, cache, "profiles")


def _download(url: str, into: Path, kind: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, into.open("wb") as file:
            shutil.copyfileobj(response, file)
    except (OSError, http.client.HTTPException):
        raise Missing(NOT_FOUND[kind]) from None


@contextlib.contextmanager
def _staging(cache: Path) -> Iterator[Path]:
    """A temporary folder beside ``cache`` (the same file system, so the rename is atomic), always removed."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(files: Path, cache: Path, kind: str) -> Path:
    """Rename ``files`` to ``cache``, replacing a cache that failed its check."""
    shutil.rmtree(cache, ignore_errors=True)
    try:
        files.rename(cache)
    except OSError:  # another run installed it meanwhile
        if not verified(kind, cache):
            raise
    return cache


def directory(kind: str) -> Path:
    """:func:`find` for a test: the test fails with the one-line reason when there is none."""
    try:
        return find(kind)
    except Missing as missing:
        import pytest

        pytest.fail(str(missing), pytrace=False)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in VARIABLES:
        sys.exit(f"usage: {sys.argv[0]} csdl|profiles")
    try:
        print(find(sys.argv[1]))
    except Missing as missing:
        sys.exit(str(missing))
