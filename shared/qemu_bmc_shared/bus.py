"""The bus: connecting, typed request/reply, and registering a service with nats.micro.

Every reply is a msgspec JSON body. An error reply carries the nats.micro error headers
(``Nats-Service-Error-Code``: an HTTP-like number, ``Nats-Service-Error``: the text) and an
:class:`~qemu_bmc_shared.messages.ErrorReply` body with a stable error name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Service

from . import subjects
from .messages import ErrorReply, Message

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Message)

#: Error names and the numeric code sent in the nats.micro error header.
ERROR_CODES = {
    "bad_request": 400,
    "not_found": 404,
    "no_display": 404,
    "unknown_machine": 404,
    "conflict": 409,
    "invalid_state": 409,
    "internal": 500,
    "qemu_error": 502,
    "unavailable": 503,
    "timeout": 504,
}


class BusError(Exception):
    """An error that travels over the bus as an :class:`ErrorReply`."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error if error in ERROR_CODES else "internal"
        self.message = message

    def __str__(self) -> str:
        return f"{self.error}: {self.message}"


_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, message_type: type[T]) -> T:
    """Decode a message; an empty body is an empty object (requests with no fields)."""
    return msgspec.json.decode(data or b"{}", type=message_type)


class BusUnreachable(Exception):
    """No NATS server answered at ``address`` (a URL without credentials) in time."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot reach NATS at {address}: {reason}")
        self.address, self.reason = address, reason


def without_credentials(url: str) -> str:
    """``url`` (one or several, comma-separated) with any ``user:password@`` or ``token@`` left out."""
    return re.sub(r"//[^@/,]*@", "//", url)


#: What nats-py reports for each failed attempt to reach a server (one an outage makes every 0.5 s).
CONNECTION_ERRORS = (OSError, TimeoutError, nats.errors.StaleConnectionError, nats.errors.NoServersError,
                     nats.errors.ConnectionClosedError)


def _reason(error: BaseException | None, timeout: float) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, nats.errors.AuthorizationError) or "authorization" in str(error).lower():
        return "authorization refused (wrong or missing token)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    if error is None or isinstance(error, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(error) or type(error).__name__


async def connect(url: str, name: str, *, timeout: float | None = None) -> Client:
    """Connect to NATS.

    A service (no ``timeout``) waits for the server as long as it takes, at the start and whenever
    the server goes away, logging one line when the connection is lost and one when it is back
    (not a traceback per attempt). A client with a ``timeout`` (the CLI) logs nothing and raises
    :class:`BusUnreachable` when no server has taken the connection within ``timeout`` seconds."""
    nc = Client()
    last_error: list[BaseException] = []
    connected, waiting_logged = False, False

    async def error(exc: Exception) -> None:
        nonlocal waiting_logged
        last_error[:] = [exc]
        if timeout is not None:
            return
        if not isinstance(exc, CONNECTION_ERRORS):
            log.warning("bus: %s: %s", type(exc).__name__, exc)
        elif not connected and not waiting_logged:  # the first connection: say once what it waits for
            waiting_logged = True
            log.warning("bus %s: %s; waiting for it", without_credentials(url), _reason(exc, 0))
        else:
            log.debug("bus %s: %s", without_credentials(url), _reason(exc, 0))

    async def disconnected() -> None:
        if timeout is None and not nc.is_closed:
            log.warning("bus connection to %s lost; reconnecting", without_credentials(url))

    async def reconnected() -> None:
        if timeout is None:
            log.info("bus connection back (%s)", without_credentials(str(nc.connected_url.geturl())
                                                                       if nc.connected_url else url))

    options: dict[str, Any] = dict(name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                   connect_timeout=5 if timeout is None else min(5, timeout), allow_reconnect=True,
                                   error_cb=error, disconnected_cb=disconnected, reconnected_cb=reconnected)
    if timeout is None:
        await nc.connect(url, **options)
        connected = True
        return nc
    try:
        await asyncio.wait_for(nc.connect(url, **options), timeout)
    except (TimeoutError, *CONNECTION_ERRORS, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        cause = exc if isinstance(exc, nats.errors.AuthorizationError) or not last_error else last_error[0]
        raise BusUnreachable(without_credentials(url), _reason(cause, timeout)) from None
    return nc


async def request(
    nc: Client,
    machine: str,
    operation: str,
    message: msgspec.Struct | None,
    reply_type: type[T],
    timeout: float = 10.0,
) -> T:
    """Send ``message`` to ``bmc.<machine>.<operation>`` and decode the reply.

    Raises :class:`BusError` for an error reply, no responder and time-out.
    """
    subject = subjects.for_machine(machine, operation)
    payload = encode(message) if message is not None else b""
    try:
        reply = await nc.request(subject, payload, timeout=timeout)
    except nats.errors.NoRespondersError:
        if operation in subjects.MACHINE_ENDPOINTS:
            raise BusError("unknown_machine", f"no machine service owns machine {machine!r}") from None
        raise BusError("unavailable", f"no service answers {subject}") from None
    except nats.errors.TimeoutError:
        raise BusError("timeout", f"no reply on {subject} within {timeout} s") from None
    if reply.headers and ERROR_CODE_HEADER in reply.headers:
        try:
            error = decode(reply.data, ErrorReply)
        except msgspec.DecodeError:
            error = ErrorReply(error="internal", message=reply.headers.get(ERROR_HEADER, ""))
        raise BusError(error.error, error.message)
    return decode(reply.data, reply_type)


Handler = Callable[[str, Any], Awaitable[msgspec.Struct]]


@dataclass(frozen=True)
class Endpoint:
    """One request subject: its nats.micro name, the request type and ``handler(machine, request)``."""

    name: str
    subject: str
    request_type: type[Message]
    handler: Handler


async def _respond_error(request: Request, error: BusError) -> None:
    await request.respond_error(
        str(ERROR_CODES[error.error]),
        error.message,
        data=encode(ErrorReply(error=error.error, message=error.message)),
    )


def _micro_handler(endpoint: Endpoint) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        try:
            machine = subjects.machine_of(request.subject)
            body = decode(request.data, endpoint.request_type)
            reply = await endpoint.handler(machine, body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            await _respond_error(request, BusError("bad_request", f"{endpoint.request_type.__name__}: {exc}"))
        except BusError as exc:
            await _respond_error(request, exc)
        except Exception as exc:
            log.exception("%s on %s failed", endpoint.name, request.subject)
            await _respond_error(request, BusError("internal", f"{type(exc).__name__}: {exc}"))
        else:
            await request.respond(encode(reply))

    return handle


async def serve(
    nc: Client,
    *,
    name: str,
    version: str,
    description: str,
    endpoints: Iterable[Endpoint],
    metadata: dict[str, str] | None = None,
) -> Service:
    """Register a nats.micro service (visible to ``nats micro ls``) with typed endpoints."""
    service = await add_service(nc, name=name, version=version, description=description, metadata=metadata or {})
    for endpoint in endpoints:
        await service.add_endpoint(name=endpoint.name, subject=endpoint.subject, handler=_micro_handler(endpoint))
    return service


async def publish(nc: Client, machine: str, event: str, message: msgspec.Struct) -> None:
    """Publish an event on ``bmc.<machine>.<event>``."""
    await nc.publish(subjects.for_machine(machine, event), encode(message))


def cluster_size(nc: Client) -> int:
    """How many NATS servers the connection knows of (the cluster's nodes, told by the server)."""
    return max(1, len({(url.hostname, url.port) for url in nc.servers}))


async def key_value(nc: Client, bucket: str, description: str, *, history: int = 1, ttl: float | None = None,
                    timeout: float = 30.0) -> KeyValue:
    """A JetStream key-value bucket on file, made when absent: with 3 replicas when the NATS
    cluster has three nodes or more (so it survives the loss of one), and raised to 3 when the
    cluster has grown since. Retried while a new cluster still elects its JetStream leaders."""
    js = nc.jetstream()
    replicas = 3 if cluster_size(nc) >= 3 else 1
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            try:
                kv = await js.key_value(bucket)
            except BucketNotFoundError:
                return await js.create_key_value(KeyValueConfig(
                    bucket=bucket, description=description, history=history, ttl=ttl, storage=StorageType.FILE,
                    replicas=replicas))
            stream = await js.stream_info(f"KV_{bucket}")
            if stream.config.num_replicas is not None and stream.config.num_replicas < replicas:
                await js.update_stream(dataclasses.replace(stream.config, num_replicas=replicas))
                log.info("bucket %s: %d replicas now that the cluster has %d nodes", bucket, replicas,
                         cluster_size(nc))
            return kv
        except (nats.errors.TimeoutError, ServiceUnavailableError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.info("bucket %s: JetStream not ready (%s), trying again", bucket, type(exc).__name__)
            await asyncio.sleep(0.5)


async def watch(kv: KeyValue, keys: str = ">") -> AsyncIterator[KeyValue.Entry | None]:
    """The entries of ``keys`` (a pattern) in ``kv``: the stored ones, then None once they are
    all in, then every change (deletes included), until the caller stops iterating.

    nats-py's own None can come before the last stored entries (the server has sent them, the
    client has not read them yet): this one waits until as many entries have come as the watch's
    consumer had delivered when nats-py said it was done (its consumer sequence: the stream
    sequence may be past the last entry that matches ``keys``)."""
    watcher = await kv.watch(keys)
    try:
        seen, delivered = 0, None
        async for entry in watcher:
            if entry is None:
                try:
                    info = await watcher._sub.consumer_info()  # nats-py keeps its subscription there
                    delivered = info.delivered.consumer_seq if info.delivered else 0
                except Exception as exc:  # take nats-py's word for it
                    log.warning("watching %s: no consumer info (%s)", keys, type(exc).__name__)
                    delivered = 0
            else:
                seen += 1
                yield entry
            if delivered is not None and seen >= delivered:
                delivered = None
                yield None
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()


async def stored_keys(nc: Client, bucket: str, keys: str = ">") -> list[str]:
    """The keys of ``bucket`` matching ``keys`` that hold a message (a value, or a delete
    marker not purged yet), from the stream's subject list."""
    prefix = f"$KV.{bucket}."
    info = await nc.jetstream().stream_info(f"KV_{bucket}", subjects_filter=prefix + keys)
    return [subject[len(prefix):] for subject in (info.state.subjects or {})]
