"""A machine's system firmware: what a firmware file is (SeaBIOS or OVMF, its version and who made
it), and its update (``firmware.update``, what Redfish UpdateService SimpleUpdate asks for).

An update downloads an http(s) image into the runtime directory (streamed, at most
:data:`MAX_IMAGE_BYTES`, :data:`DOWNLOAD_TIMEOUT` seconds in all, redirects followed only to
http(s) URLs and the credentials sent only to the server named), checks that QEMU can boot it as
the firmware of the boot mode the machine runs in (or boots in next), and keeps it as
``firmware/<mode>-<digest>.fd``; the machine's launches in that mode use it from then on (the
launch profile names it, so the next reset or power-on launches QEMU again with it, as a flashed
BIOS takes effect at the next boot). An image identical to the firmware the machine is configured
with removes the update: the way back to the distribution's firmware (which then follows the
distribution's package again). The last updates are kept (``firmware/updates.json``,
``firmware.updates``): each is a Redfish Task, completed.

The checks, on what QEMU and the CPU do with the file:

* SeaBIOS (Legacy boot): a ROM of 128 or 256 KiB (the sizes SeaBIOS is built in: ``bios.bin``,
  ``bios-256k.bin``) whose 16 last bytes, the x86 reset vector (the first instruction the CPU runs,
  at 0xFFFFFFF0), are a far jump (opcode EA) into the ROM's copy below 1 MiB (QEMU maps its last
  128 KiB at 0xE0000-0xFFFFF). Its version is the one it embeds, which its SMBIOS type 0 tells the
  guest (``1.16.2-debian-1.16.2-1``); a ROM without the SeaBIOS banner has no known version.
* OVMF code (UEFI boot): a size that is a multiple of QEMU's 4 KiB flash sector; a UEFI firmware
  volume at offset 0 (PI specification vol. 3 §3.2.1, EFI_FIRMWARE_VOLUME_HEADER): 16 zero bytes,
  a firmware file system GUID (FFS2 or FFS3: code, not the variable store a combined ``OVMF.fd``
  starts with), a volume length within the file, ``_FVH`` at 0x28, and a header whose 16-bit words
  sum to zero; and, with the machine's variables file, a flash device of 1, 2 or 4 MiB (OVMF's
  layouts, where the build fixed the variables' address at the bottom of the device: code for
  another layout would not find them). OVMF tells no version of its own (its SMBIOS type 0 says
  ``0.0.0``): its version is ``EDK II``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import struct
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import httpx
import msgspec
from qemu_bmc_shared import launcher
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import BootMode, FirmwareUpdate, FirmwareUpdated, FirmwareUpdates

from . import command_line

if TYPE_CHECKING:
    from .machine import Machine

KIB = 1 << 10
MIB = 1 << 20
#: QEMU maps at most 8 MiB of system flash on x86 (hw/i386/pc_sysfw.c); SeaBIOS is 256 KiB.
MAX_IMAGE_BYTES = 8 * MIB
DOWNLOAD_TIMEOUT = 120.0
MAX_REDIRECTS = 5
SCHEMES = ("http", "https")
SEABIOS_SIZES = (128 * KIB, 256 * KIB)
#: The real-mode addresses QEMU maps the BIOS ROM's last 128 KiB at.
LOW_BIOS_WINDOW = range(0xE0000, 0x100000)
FAR_JUMP = 0xEA
FLASH_SECTOR = 4 * KIB
OVMF_DEVICE_SIZES = (1 * MIB, 2 * MIB, 4 * MIB)
#: EFI_FIRMWARE_FILE_SYSTEM2_GUID and EFI_FIRMWARE_FILE_SYSTEM3_GUID, as a volume header stores them.
FIRMWARE_FILE_SYSTEMS = {uuid.UUID("8c8ce578-8a3d-4f1c-9935-896185c32dd3").bytes_le,
                         uuid.UUID("5473c07a-3dcb-4dca-bd6f-1e9689e7349a").bytes_le}
#: EFI_FIRMWARE_VOLUME_HEADER up to its block map: ZeroVector, FileSystemGuid, FvLength,
#: Signature, Attributes, HeaderLength, Checksum, ExtHeaderOffset, Reserved, Revision.
FV_HEADER = struct.Struct("<16s16sQ4sIHHHBB")
FV_SIGNATURE = b"_FVH"
KEPT_UPDATES = 16
"""Updates kept per machine, as the Redfish Tasks they are (the oldest go first)."""
OVMF_VERSION = "EDK II"
OVMF_MANUFACTURER = "TianoCore"
SEABIOS_MANUFACTURER = "SeaBIOS"


class FirmwareImage(NamedTuple):
    """What a firmware file is: the boot mode it is firmware for, its version and who made it."""

    mode: BootMode
    version: str | None
    manufacturer: str | None


def refused(uri: str, reason: str) -> BusError:
    return BusError("bad_request", f"{uri}: {reason}")


def seabios_image(path: Path) -> FirmwareImage:
    """A BIOS ROM's version and maker, when it is SeaBIOS (None for another BIOS)."""
    version = command_line.seabios_version(path)
    return FirmwareImage("Legacy", version, SEABIOS_MANUFACTURER if version else None)


def identify(path: Path, uri: str, variables_size: int | None) -> FirmwareImage:
    """What the image at ``path`` (downloaded from ``uri``) is firmware for; ``bad_request`` unless
    QEMU can boot it as a BIOS ROM, or as OVMF code beside ``variables_size`` bytes of variables."""
    size = path.stat().st_size
    with path.open("rb") as image:
        header = image.read(FV_HEADER.size)
        image.seek(max(size - 16, 0))
        reset_vector = image.read(16)
    if size in SEABIOS_SIZES and reset_vector[0] == FAR_JUMP:
        offset, segment = struct.unpack_from("<HH", reset_vector, 1)
        if segment * 16 + offset in LOW_BIOS_WINDOW:
            return seabios_image(path)
    if len(header) == FV_HEADER.size and FV_HEADER.unpack(header)[3] == FV_SIGNATURE:
        return ovmf_code(path, uri, size, variables_size)
    raise refused(uri, f"not a firmware image ({size} bytes): neither a BIOS ROM of 128 or 256 KiB ending in the "
                  "x86 reset vector, nor OVMF code starting with a UEFI firmware volume")


def ovmf_code(path: Path, uri: str, size: int, variables_size: int | None) -> FirmwareImage:
    """OVMF code, once its first firmware volume's header and its size fit (see the module's docstring)."""
    with path.open("rb") as image:
        zero, file_system, volume_length, _, _, header_length, *_ = FV_HEADER.unpack(image.read(FV_HEADER.size))
        image.seek(0)
        header = image.read(header_length)
    if zero != bytes(16) or file_system not in FIRMWARE_FILE_SYSTEMS:
        raise refused(uri, "its first firmware volume is not code (a variable store? give the OVMF CODE image)")
    if not FV_HEADER.size <= header_length <= volume_length <= size or len(header) != header_length \
            or header_length % 2 or sum(struct.unpack(f"<{header_length // 2}H", header)) % 0x10000:
        raise refused(uri, "its firmware volume header is damaged (a length or the checksum is wrong)")
    if size % FLASH_SECTOR:
        raise refused(uri, f"{size} bytes are not a whole number of 4 KiB flash sectors")
    if variables_size is not None and size + variables_size not in OVMF_DEVICE_SIZES:
        raise refused(uri, f"OVMF code of {size} bytes does not fit the machine's UEFI variables of {variables_size} "
                      "bytes (together they make OVMF's 1, 2 or 4 MiB flash device)")
    return FirmwareImage("UEFI", OVMF_VERSION, OVMF_MANUFACTURER)


class Download(NamedTuple):
    path: Path
    digest: str
    """SHA-256, hex."""


def http_url(uri: str) -> bool:
    try:
        url = httpx.URL(uri)
    except httpx.InvalidURL:
        return False
    return url.scheme in SCHEMES and bool(url.host) and uri.isprintable()


def too_big(uri: str) -> BusError:
    return refused(uri, f"larger than {MAX_IMAGE_BYTES // MIB} MiB, the most x86 system flash QEMU maps")


async def download(uri: str, directory: Path, credentials: httpx.BasicAuth | None) -> Download:
    """Stream ``uri`` into a new file of ``directory`` (see the module's docstring for the bounds);
    ``bad_request`` naming what went wrong."""
    target = directory / f".download-{secrets.token_hex(8)}"
    try:
        async with asyncio.timeout(DOWNLOAD_TIMEOUT), \
                httpx.AsyncClient(timeout=30.0, follow_redirects=False) as client:
            url = httpx.URL(uri)
            origin = (url.scheme, url.host, url.port)
            for _ in range(MAX_REDIRECTS + 1):
                auth = credentials if (url.scheme, url.host, url.port) == origin else None
                async with client.stream("GET", url, auth=auth) as response:
                    if not response.is_redirect:
                        return await _receive(uri, response, target)
                    url = url.join(response.headers["location"])
                    if url.scheme not in SCHEMES:
                        raise refused(uri, f"redirected to {url}: only http(s) URLs are followed")
            raise refused(uri, f"more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        target.unlink(missing_ok=True)
        raise refused(uri, f"the download took more than {DOWNLOAD_TIMEOUT:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        target.unlink(missing_ok=True)
        raise refused(uri, f"the download failed: {type(exc).__name__}: {exc}") from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise


async def _receive(uri: str, response: httpx.Response, target: Path) -> Download:
    """The body of a 200 answer into ``target``, never more than MAX_IMAGE_BYTES of it."""
    if response.status_code != 200:
        raise refused(uri, f"the server answered HTTP {response.status_code} {response.reason_phrase}")
    if int(response.headers.get("content-length") or 0) > MAX_IMAGE_BYTES:
        raise too_big(uri)
    digest = hashlib.sha256()
    received = 0
    with target.open("wb") as file:
        async for chunk in response.aiter_bytes(64 * KIB):
            received += len(chunk)
            if received > MAX_IMAGE_BYTES:
                raise too_big(uri)
            digest.update(chunk)
            file.write(chunk)
    if not received:
        raise refused(uri, "the image is empty")
    return Download(target, digest.hexdigest())


def replace_file(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def file_digest(path: Path) -> str | None:
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError:
        return None


def without_credentials(uri: str) -> str:
    url = httpx.URL(uri)
    return str(url.copy_with(username=None, password=None)) if url.userinfo else uri


class SystemFirmware:
    """One machine's installed firmware images and its last updates (the runtime directory's
    ``firmware/``: ``installed.json``, the images, ``updates.json``)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.images: dict[BootMode, str] = launcher.installed_firmware(machine.files)
        """Boot mode → the image an update installed for it (what the machine's launches in it use)."""
        self._lock = asyncio.Lock()
        self._updates_file = machine.files.firmware / "updates.json"
        for stale in machine.files.firmware.glob(".download-*"):  # the machine service stopped during a download
            stale.unlink(missing_ok=True)
        try:
            self._updates = msgspec.json.decode(self._updates_file.read_bytes(), type=FirmwareUpdates)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            self._updates = FirmwareUpdates(updates=[])

    def updates(self) -> FirmwareUpdates:
        return self._updates

    def updateable(self, mode: str) -> bool:
        """An image can be installed for boot mode ``mode``: a managed machine that can boot in it,
        for UEFI with OVMF variables to give it, and not firmware given as ``-machine pflash0=``."""
        vm = self.machine.vm
        if vm.mode != "managed" or mode not in self.machine.firmwares:
            return False
        return mode == "Legacy" or (vm.ovmf is not None and not any(
            option in ("machine", "M") and "pflash0=" in value for option, value in command_line.options(vm.argv)))

    async def update(self, request: FirmwareUpdate) -> FirmwareUpdated:
        """Download, check and install an image for the boot mode the machine runs in (or boots in next)."""
        machine = self.machine
        modes = [mode for mode in dict.fromkeys((machine.firmware, machine._next_profile().firmware))
                 if self.updateable(mode)]
        if not modes:
            raise BusError("invalid_state", f"machine {machine.name}: its firmware cannot be replaced " + (
                "(attach mode: it is the attached QEMU's own)" if machine.vm.mode != "managed" else
                "(UEFI firmware given as -machine pflash0=, or no OVMF variables: [qemu] ovmf_vars)"))
        uri = request.image_uri
        if not http_url(uri):
            raise refused(uri, "not an http(s) URL")
        requested = time.time()
        credentials = httpx.BasicAuth(request.username or "", request.password or "") \
            if request.username or request.password else None
        async with self._lock:
            directory = machine.files.firmware
            directory.mkdir(mode=0o700, exist_ok=True)
            fetched = await download(uri, directory, credentials)
            try:
                image = identify(fetched.path, uri, self._variables_size())
                if image.mode not in modes:
                    raise refused(uri, f"firmware for {image.mode} boot, and machine {machine.name} boots in "
                                  f"{' or '.join(modes)} mode")
                restored = fetched.digest == await self._configured_digest(image.mode)
                self._install(image.mode, None if restored else fetched)
            finally:
                fetched.path.unlink(missing_ok=True)
            updates = self._updates.updates
            update = FirmwareUpdated(
                number=max((update.number for update in updates), default=0) + 1, image_uri=without_credentials(uri),
                mode=image.mode, version=image.version, manufacturer=image.manufacturer, requested=requested,
                finished=time.time(), restored=restored, next_boot=await machine.launch_changed(firmware=True))
            self._updates = FirmwareUpdates(updates=[*updates, update][-KEPT_UPDATES:])
            replace_file(self._updates_file, msgspec.json.encode(self._updates))
        return update

    def _variables_size(self) -> int | None:
        """The size of the UEFI variables the machine's OVMF gets: its own file, else the template's."""
        vm, files = self.machine.vm, self.machine.files
        variables = files.ovmf_vars if files.ovmf_vars.exists() else vm.ovmf[1] if vm.ovmf else None
        try:
            return variables.stat().st_size if variables else None
        except OSError:
            return None

    async def _configured_digest(self, mode: BootMode) -> str | None:
        """The digest of the firmware file the machine's configuration gives it for ``mode``: the
        operator's ``-bios`` or first pflash drive, else QEMU's SeaBIOS, or ``[qemu] ovmf_code``."""
        vm = self.machine.vm
        name: str | None = None
        if launcher.native_firmware(vm.argv) == mode:
            for option, value in command_line.options(vm.argv):
                if option == "bios":
                    name = value
                elif option == "drive" and "if=pflash" in value.replace(" ", ""):
                    name = command_line.option_fields(value).get("file")
                if name:
                    break
        if mode == "UEFI" and name is None:
            return file_digest(vm.ovmf[0]) if vm.ovmf else None
        qemu = await command_line.qemu_binary(vm.argv[0] if vm.argv else "qemu-system-x86_64")
        path = command_line.find_firmware(name or "bios-256k.bin", qemu.data_dirs)
        return file_digest(path) if path else None

    def _install(self, mode: BootMode, fetched: Download | None) -> None:
        """Keep ``fetched`` as the image of ``mode`` (None: no image, the configured firmware), in
        the index before the image it replaces is removed."""
        files = self.machine.files
        images = dict(self.images)
        if fetched is None:
            images.pop(mode, None)
        else:
            path = files.firmware / f"{mode.lower()}-{fetched.digest[:16]}.fd"
            fetched.path.chmod(0o600)
            os.replace(fetched.path, path)
            images[mode] = str(path)
        names = {key: Path(value).name for key, value in images.items()}
        replace_file(files.firmware_index, msgspec.json.encode(names))
        previous, self.images = self.images.get(mode), images
        if previous and previous not in images.values():
            with contextlib.suppress(OSError):
                Path(previous).unlink()
