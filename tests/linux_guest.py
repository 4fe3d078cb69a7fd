"""A tiny Linux test guest for in-band IPMI, built at test time from Debian packages only.

The kernel and its IPMI modules come from Debian's ``linux-image-amd64`` (the real
``linux-image-<abi>-amd64`` package it depends on, fetched with ``apt-get download`` and unpacked,
never installed); the userland is the host's ``busybox-static``, ``ipmitool`` and FreeIPMI's tools
with the shared libraries they load. Together they make an initramfs whose init (busybox sh):

* mounts proc, sysfs and devtmpfs;
* loads ``ipmi_msghandler``, ``ipmi_devintf`` and ``ipmi_si`` (which finds the KCS interface that
  QEMU's ``isa-ipmi-kcs`` describes in ACPI and SMBIOS);
* waits up to 20 s for ``/dev/ipmi0`` and prints ``GUEST-IPMI-READY`` (or ``GUEST-IPMI-MISSING``);
* runs ``/guest.sh``, the test's script, prints ``GUEST-DONE rc=<its exit code>`` and powers off.

Everything goes to the first serial port (``console=ttyS0``). The kernel and the base initramfs
are cached (``$XDG_CACHE_HOME/qemu-bmc-tests``, by default ``~/.cache/qemu-bmc-tests``) under a key
made of the kernel package's version and a hash of the recipe (this file and the host files
copied in), so a second run neither downloads nor rebuilds; a test's script is a second cpio
archive appended to the cached one.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-amd64"
IPMI_MODULES = ("ipmi_msghandler", "ipmi_devintf", "ipmi_si")
# Host programs copied in, with the shared libraries ``ldd`` lists for them.
PROGRAMS = (
    "/usr/bin/ipmitool",
    "/usr/sbin/ipmi-config",
    "/usr/sbin/bmc-info",
    "/usr/sbin/bmc-device",
    "/usr/sbin/ipmi-chassis",
    "/usr/sbin/ipmi-raw",
    "/usr/sbin/ipmi-sel",
    "/usr/sbin/ipmi-sensors",
    "/usr/sbin/ipmi-fru",
    "/usr/sbin/ipmi-locate",
    "/usr/sbin/bmc-watchdog",
)
# FreeIPMI's /bin/sh wrappers around ipmi-config.
WRAPPERS = ("/usr/sbin/bmc-config", "/usr/sbin/ipmi-chassis-config", "/usr/sbin/ipmi-sensors-config",
            "/usr/sbin/ipmi-pef-config")
# Data files read at run time: ipmitool's IANA enterprise numbers (manufacturer names).
DATA_FILES = ("/usr/share/misc/enterprise-numbers.txt",)
BUSYBOX = "/bin/busybox"
LOADER = "/lib64/ld-linux-x86-64.so.2"
UNUSED_ENTRY_LIFETIME = 7 * 24 * 3600  # seconds after which a cache entry not used is removed

READY = "GUEST-IPMI-READY"
MISSING = "GUEST-IPMI-MISSING"
DONE = "GUEST-DONE"

INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
i=0
for module in %(modules)s; do
    # ipmi_si fails with "No such device" when it finds no interface: then there is nothing to wait for.
    insmod /lib/modules/guest/$module.ko || { echo "GUEST: insmod $module failed"; i=200; }
done
while [ ! -c /dev/ipmi0 ] && [ $i -lt 200 ]; do
    sleep 0.1
    i=$((i + 1))
done
if [ -c /dev/ipmi0 ]; then echo %(ready)s; else echo %(missing)s; fi
if [ -f /guest.sh ]; then
    sh /guest.sh
    rc=$?
else
    echo "GUEST: no /guest.sh"
    rc=127
fi
echo "%(done)s rc=$rc"
poweroff -f
sleep 5
echo "GUEST: poweroff failed"
while true; do sleep 60; done
"""

FREEIPMI_CONF = """\
# The guest's only in-band interface is the kernel's (ipmi_si + ipmi_devintf: /dev/ipmi0).
driver-type OPENIPMI
"""


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/qemu-bmc-tests``, by default ``~/.cache/qemu-bmc-tests``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qemu-bmc-tests"


class Cpio:
    """Writes a newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.inode = 1000
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self.names:
            return
        self.names.add(name)
        self.inode += 1
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self.buffer.write(header + encoded)
        self.buffer.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buffer.write(data)
        self.buffer.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            self._entry("/".join(parts[:depth]), 0o040755, nlink=2)

    def _parent(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.directory(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(name)
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buffer.getvalue()
        return data + b"\0" * (-len(data) % 512)


class DownloadError(RuntimeError):
    pass


def _package_lists_fingerprint() -> str:
    lists = Path("/var/lib/apt/lists")
    fingerprint = hashlib.sha256()
    for path in sorted(lists.glob("*_Packages*")) if lists.is_dir() else []:
        stat = path.stat()
        fingerprint.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return fingerprint.hexdigest()


def _run(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout


def _shared_libraries(program: str) -> list[str]:
    """The shared libraries ``ldd`` lists for ``program`` (the dynamic loader included)."""
    libraries = []
    for line in _run("ldd", program).splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libraries.append(match.group(1))
    return libraries


def _module_dependencies(data: bytes) -> list[str]:
    """The ``depends=`` field of a kernel module's .modinfo section."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not match or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def _decompress_module(name: str, data: bytes) -> bytes:
    """busybox insmod reads plain .ko files only: decompress .ko.xz / .ko.zst / .ko.gz."""
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def _module_name(path: str) -> str:
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", path.rsplit("/", 1)[-1]).replace("-", "_")


class LinuxGuest:
    """The kernel and the base initramfs of the test guest, cached in ``cache``."""

    def __init__(self, cache: Path) -> None:
        self.cache = Path(cache)
        self.kernel: Path | None = None
        self.base: Path | None = None
        self.kernel_package = ""
        self.kernel_version = ""
        self.downloaded = False  # whether the last build() downloaded (and built) anything

    # -- the cache ------------------------------------------------------------------------------

    def build(self) -> LinuxGuest:
        """Download (apt-get download) and unpack what is needed, build the base initramfs; cached."""
        self.downloaded = False
        host_files = self._host_files()
        recipe = hashlib.sha256(Path(__file__).read_bytes())
        for path in sorted(host_files):
            stat = Path(path).stat()
            recipe.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        self.cache.mkdir(parents=True, exist_ok=True)
        with self._locked():
            for attempt in range(2):
                self.kernel_package, self.kernel_version = self._kernel_package(refresh=attempt > 0)
                key = f"{self.kernel_package}_{self.kernel_version}_{recipe.hexdigest()[:16]}"
                entry = self.cache / key
                if (entry / "manifest.json").exists():
                    break
                for stale in self.cache.glob(".build-*"):  # left by a build that was killed
                    shutil.rmtree(stale, ignore_errors=True)
                try:
                    self._build_into(entry, host_files)
                except DownloadError:
                    if attempt or os.geteuid() != 0:
                        raise
                    _run("apt-get", "update", "-qq")  # stale package lists: that version is gone
                    continue
                self.downloaded = True
                break
            os.utime(entry / "manifest.json")  # last used: another checkout may still use an older entry
            for old in self.cache.glob("linux-image-*/manifest.json"):
                if time.time() - old.stat().st_mtime > UNUSED_ENTRY_LIFETIME:
                    shutil.rmtree(old.parent, ignore_errors=True)
        self.kernel = entry / "vmlinuz"
        self.base = entry / "base.cpio.gz"
        return self

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.cache / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _kernel_package(self, refresh: bool = False) -> tuple[str, str]:
        """The real ``linux-image-<abi>-amd64`` the metapackage depends on, and its candidate version.

        apt-cache takes about a second to load its cache: the answer is kept beside the builds, valid
        while apt's package lists are unchanged."""
        resolved = self.cache / "kernel-package.json"
        if not refresh:
            with contextlib.suppress(OSError, ValueError, KeyError):
                known = json.loads(resolved.read_text())
                if known["lists"] == _package_lists_fingerprint():
                    return known["package"], known["version"]
        package, version = self._ask_apt()
        temporary = resolved.with_suffix(f".{os.getpid()}")
        temporary.write_text(json.dumps({"lists": _package_lists_fingerprint(), "package": package,
                                         "version": version}))
        temporary.replace(resolved)
        return package, version

    @staticmethod
    def _ask_apt() -> tuple[str, str]:
        for attempt in range(2):
            depends = subprocess.run(["apt-cache", "depends", KERNEL_METAPACKAGE], capture_output=True, text=True,
                                     check=False).stdout
            match = re.search(r"Depends:\s*(linux-image-\S+-amd64)\b", depends)
            if match:
                package = match.group(1)
                policy = _run("apt-cache", "policy", package)
                candidate = re.search(r"Candidate:\s*(\S+)", policy)
                if candidate and candidate.group(1) != "(none)":
                    return package, candidate.group(1)
            if attempt == 0 and os.geteuid() == 0:
                _run("apt-get", "update", "-qq")  # a fresh machine may have no package lists yet
        raise RuntimeError(f"apt-cache knows no {KERNEL_METAPACKAGE}: run 'apt-get update' (as root) first")

    def _host_files(self) -> dict[str, str]:
        """Host path -> path in the guest for every program, library and data file copied in."""
        files = {BUSYBOX: "/bin/busybox"}
        for program in PROGRAMS + WRAPPERS + DATA_FILES:
            if Path(program).exists():
                files[program] = program
        for program in PROGRAMS:
            if Path(program).exists():
                for library in _shared_libraries(program):
                    files.setdefault(library, library)
        missing = [path for path in ("/usr/bin/ipmitool", "/usr/sbin/ipmi-config", "/usr/sbin/bmc-config", BUSYBOX)
                   if path not in files]
        if missing:
            raise RuntimeError(f"missing on the host: {missing} (scripts/setup.sh installs them)")
        return files

    def _build_into(self, entry: Path, host_files: dict[str, str]) -> None:
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=self.cache))
        try:
            sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
            try:
                _run("apt-get", "download", "-qq", *sandbox, f"{self.kernel_package}={self.kernel_version}",
                     cwd=staging)
            except RuntimeError as error:
                raise DownloadError(str(error)) from error
            (deb,) = staging.glob("*.deb")
            kernel, modules = self._unpack(deb)
            deb.unlink()
            (staging / "vmlinuz").write_bytes(kernel)
            order = self._load_order(modules)
            archive = self._base_archive(host_files, {name: modules[name] for name in order}, order)
            compressed = gzip.compress(archive, compresslevel=6, mtime=0)
            # Pad to 4 bytes so that an archive appended later starts where the kernel expects a header.
            (staging / "base.cpio.gz").write_bytes(compressed + b"\0" * (-len(compressed) % 4))
            manifest = {"package": self.kernel_package, "version": self.kernel_version, "modules": order,
                        "files": sorted(host_files.values())}
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            shutil.rmtree(entry, ignore_errors=True)
            staging.chmod(0o755)
            staging.rename(entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _unpack(deb: Path) -> tuple[bytes, dict[str, bytes]]:
        """vmlinuz and the IPMI modules (with what they depend on, from each module's ``depends=``:
        the package ships no modules.dep, depmod makes it on install), decompressed."""
        wanted = set(IPMI_MODULES)
        modules: dict[str, bytes] = {}
        kernel = b""
        seen: set[str] = set()
        for _ in range(5):
            with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as unpacker:
                assert unpacker.stdout is not None
                with tarfile.open(fileobj=unpacker.stdout, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        path = member.name.lstrip("./")
                        if re.fullmatch(r"boot/vmlinuz-\S+", path):
                            kernel = tar.extractfile(member).read()  # type: ignore[union-attr]
                        elif re.search(r"/kernel/.*\.ko(\.(xz|gz|zst))?$", path):
                            name = _module_name(path)
                            seen.add(name)
                            if name in wanted and name not in modules:
                                data = _decompress_module(path, tar.extractfile(member).read())  # type: ignore[union-attr]
                                modules[name] = data
                                wanted.update(_module_dependencies(data))
            if unpacker.returncode != 0:
                raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} exited {unpacker.returncode}")
            missing = wanted - set(modules)
            if not missing:
                break
            if missing - seen:
                raise RuntimeError(f"{deb.name} has no modules {sorted(missing - seen)}")
        if not kernel:
            raise RuntimeError(f"{deb.name} has no boot/vmlinuz-*")
        return kernel, modules

    @staticmethod
    def _load_order(modules: dict[str, bytes]) -> list[str]:
        """The modules, each after those it depends on."""
        order: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in order:
                return
            if name in path:
                raise RuntimeError(f"module dependency loop: {path}")
            for dependency in _module_dependencies(modules[name]):
                visit(dependency, (*path, name))
            order.append(name)

        for name in IPMI_MODULES:
            visit(name, ())
        return order

    @staticmethod
    def _base_archive(host_files: dict[str, str], modules: dict[str, bytes], order: list[str]) -> bytes:
        cpio = Cpio()
        for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root",
                          "var/lib/freeipmi", "var/log/freeipmi", "var/cache/ipmimonitoringsdrcache"):
            cpio.directory(directory)
        # The kernel opens /dev/console for init before anything is mounted.
        cpio.char_device("dev/console", 5, 1)
        cpio.char_device("dev/null", 1, 3, 0o666)
        init = INIT % {"modules": " ".join(order), "ready": READY, "missing": MISSING, "done": DONE}
        cpio.file("init", init.encode(), 0o755)
        for host, guest in sorted(host_files.items(), key=lambda item: item[1]):
            path = Path(host)
            cpio.file(guest, path.read_bytes(), path.stat().st_mode & 0o777)
        for applet in _run(BUSYBOX, "--list-full").split():
            cpio.symlink(applet, "/bin/busybox")
        if LOADER not in host_files.values():
            raise RuntimeError(f"ldd listed no {LOADER}")
        for name in order:
            cpio.file(f"lib/modules/guest/{name}.ko", modules[name])
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.file("etc/hostname", b"guest\n")
        cpio.file("etc/freeipmi/freeipmi.conf", FREEIPMI_CONF.encode())
        cpio.file("var/lib/freeipmi/ipckey", b"")
        return cpio.finish()

    # -- per test -------------------------------------------------------------------------------

    def initrd(self, script: str, directory: Path) -> Path:
        """The base initramfs with `script` (a /bin/sh script) appended as /guest.sh (a second
        cpio archive concatenated to the cached base, so nothing is rebuilt); written in `directory`."""
        if self.base is None:
            raise RuntimeError("LinuxGuest.build() first")
        extra = Cpio()
        extra.file("guest.sh", script.encode(), 0o755)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "initrd.img"
        with path.open("wb") as output, self.base.open("rb") as base:
            shutil.copyfileobj(base, output)
            output.write(extra.finish())
        return path

    def qemu_args(self, initrd: Path, *, memory: int = 256, cmdline: str = "") -> list[str]:
        """QEMU arguments for a q35 TCG machine booting this kernel with `initrd`, console on the first
        serial port (ttyS0) — WITHOUT any -serial/-chardev option and without the IPMI devices: the
        caller adds those (the project's machine service adds its own serial chardev as COM1)."""
        if self.kernel is None:
            raise RuntimeError("LinuxGuest.build() first")
        append = f"console=ttyS0,115200 loglevel=4 rdinit=/init {cmdline}".strip()
        return ["-machine", "q35", "-accel", "tcg", "-m", str(memory), "-nodefaults", "-display", "none",
                "-kernel", str(self.kernel), "-initrd", str(initrd), "-append", append]
