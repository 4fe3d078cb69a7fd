"""Redfish replicas behind one port (compose.yaml: `--scale redfish=N` on the host's network):
with --reuse-port, replicas bind the same address (SO_REUSEPORT), each serves it alone when the
other stops, and all serve the one self-signed certificate made in their shared runtime
directory, with [redfish] host_name among its names."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from conftest import write_config
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from ports import free_tcp_port
from qemu_bmc_shared.discovery import metadata, service_infos
from waiting import wait_for

HOST_NAME = "bmc.example.test"


def fetch_root(port: int, ca: Path, server_name: str) -> tuple[bytes, bytes] | None:
    """GET /redfish/v1 over TLS verified against ``ca`` for ``server_name``: the certificate served
    (DER) and the status line; None when the connection is refused or reset."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET /redfish/v1 HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
            status = tls.recv(64).split(b"\r\n")[0]
            return tls.getpeercert(binary_form=True), status
    except (ConnectionError, TimeoutError):
        return None


async def answers(port: int, ca: Path, der: bytes) -> bool:
    """The service answers 200 with the one certificate, verified for each of its names."""
    for name in (HOST_NAME, "localhost", "127.0.0.1"):
        reply = await asyncio.to_thread(fetch_root, port, ca, name)
        if reply is None:
            return False
        assert reply == (der, b"HTTP/1.1 200 OK"), reply
    return True


async def replicas_serving(nc, count: int) -> bool:
    infos = await service_infos(nc, "qemu-bmc-redfish")
    served = [info for info in infos if "url" in metadata(info) and not any(
        key.startswith("unserved.") for key in metadata(info))]
    return len(served) == count


async def test_replicas_share_one_port_and_one_certificate(services, nc, short_dir):
    port = free_tcp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\nhost_name = "{HOST_NAME}"\n')
    # started together, on the same runtime directory (compose: the shared volume)
    first, second = await asyncio.gather(services("redfish", config, "--reuse-port"),
                                         services("redfish", config, "--reuse-port"))
    await wait_for(lambda: replicas_serving(nc, 2), timeout=30, message="two Redfish replicas serving")

    directory = short_dir / "rt" / "redfish"
    ca = directory / "cert.pem"
    certificate = x509.load_pem_x509_certificate(ca.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert HOST_NAME in names.get_values_for_type(x509.DNSName)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(address) for address in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    der = certificate.public_bytes(Encoding.DER)
    assert sorted(path.name for path in directory.glob("*.pem")) == ["cert.pem", "key.pem"]  # one pair made
    for _ in range(10):  # whichever replica the kernel picks
        assert await answers(port, ca, der)

    # each replica serves the port alone: the first stops, the second answers; the first comes
    # back beside it (binding the port the second holds), then the second stops
    await first.stop()
    await wait_for(lambda: answers(port, ca, der), timeout=30, message="the second replica answering alone")
    again = await services("redfish", config, "--reuse-port")
    await wait_for(lambda: replicas_serving(nc, 2), timeout=30, message="the first replica back beside the second")
    await second.stop()
    await wait_for(lambda: answers(port, ca, der), timeout=30, message="the first replica answering alone")
    for _ in range(5):
        assert await answers(port, ca, der)
    await again.stop()


async def test_without_reuse_port_a_second_replica_is_not_served(services, nc, short_dir):
    """The default stays: a port another process holds is reported, not silently shared."""
    port = free_tcp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n')
    await services("redfish", config, "--reuse-port")
    await wait_for(lambda: replicas_serving(nc, 1), timeout=30, message="one Redfish replica serving")
    await services("redfish", config)

    async def second_unserved() -> bool:
        infos = await service_infos(nc, "qemu-bmc-redfish")
        return any("address in use" in metadata(info).get("unserved.redfish", "") for info in infos)

    await wait_for(second_unserved, timeout=30, message="the second replica reporting the port in use")
