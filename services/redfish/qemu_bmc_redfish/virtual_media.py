"""Virtual media: the machine's CD drive (Redfish VirtualMedia schema; DSP0266 §9.8 actions).

One resource, ``Cd``, served at two URIs: under the Manager (where Redfish put virtual media
first) and under the ComputerSystem (where newer clients, sushy and Metal3 among them, look);
each URI answers with its own ``@odata.id`` and action targets. Every answer is built from the
machine service's ``media.get``: what QEMU holds is the truth, never what a client asked for.

Decisions:

* Privilege ConfigureManager for InsertMedia, EjectMedia and PATCH (the DMTF privilege
  registry maps every write of VirtualMedia to ConfigureManager), so an IPMI Operator can see
  the media but not change it; Login to read.
* ``Image`` must be an absolute http(s) URL (the machine service also takes paths on the BMC
  host, which a Redfish client must not reach) whose host is not an internal address (loopback,
  link-local, the BMC's own …: see outbound.py; 400 ActionParameterValueError or
  PropertyValueError naming ``Image``, unless ``[redfish] allow_internal_targets``); the machine
  service, then QEMU, refuse what they cannot open (400 naming the image).
* A CD is read-only and the drive cannot hold an image without inserting it: ``Inserted:
  false`` and ``WriteProtected: false`` are refused with 400 (not in the list of acceptable
  values) rather than accepted and silently not honoured. ``TransferMethod`` can only be
  ``Stream``, ``TransferProtocolType`` only the URL's own scheme; ``UserName``/``Password``
  are not supported (empty values are accepted).
* InsertMedia over an inserted image replaces it; EjectMedia of an empty drive is a no-op.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec
from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import MediaInsert, MediaStatus

from .errors import BASE_REGISTRY, RedfishError, message
from .outbound import TargetRefused
from .resources import (
    ENABLED,
    Redfish,
    check_if_match,
    collection,
    etag_of,
    json_body,
    json_response,
    patch_body,
    writable,
)

VIRTUAL_MEDIA_TYPE = "#VirtualMedia.v1_6_5.VirtualMedia"
MEDIA_ID = "Cd"
INSERT = "#VirtualMedia.InsertMedia"
EJECT = "#VirtualMedia.EjectMedia"
PRIVILEGE = "ConfigureManager"
#: URL schemes → TransferProtocolType (what QEMU's curl block driver streams from).
PROTOCOLS = {"http": "HTTP", "https": "HTTPS"}
TRANSFER_METHODS = ["Stream"]
#: The parents the resource is served under.
PARENTS = ("Managers", "Systems")
INSERT_TIMEOUT = 30.0
#: What InsertMedia takes (the schema's parameters) and what PATCH may write.
PARAMETERS = ("Image", "Inserted", "WriteProtected", "TransferProtocolType", "TransferMethod", "UserName",
              "Password")

#: Base registry messages (ids and arguments the registry's, wording ours) that errors.py does not list.
EXTRA_MESSAGES: dict[str, str] = {
    "ActionParameterValueError": "The value of parameter %1 of action %2 was refused.",
    "ActionParameterValueFormatError": "The value %1 of parameter %2 of action %3 is not in an accepted format.",
    "ActionParameterNotSupported": "The parameter %1 of action %2 is not supported here.",
    "PropertyValueError": "The value of the property %1 was refused.",
    "PropertyValueFormatError": "The value %1 of the property %2 is not in an accepted format.",
}


class ParameterError(RedfishError):
    """A 400 with one of :data:`EXTRA_MESSAGES`, and the reason (e.g. QEMU's) as a GeneralError."""

    def __init__(self, message_id: str, *args: Any, reason: str | None = None) -> None:
        super().__init__(400, message_id, *args)
        self.reason = reason

    def body(self) -> dict[str, Any]:
        text = EXTRA_MESSAGES[self.message_id]
        for number, arg in enumerate(self.args_, 1):
            text = text.replace(f"%{number}", str(arg))
        info = {"@odata.type": "#Message.v1_1_2.Message", "MessageId": f"{BASE_REGISTRY}.{self.message_id}",
                "Message": text, "MessageArgs": [str(arg) for arg in self.args_], "MessageSeverity": "Warning",
                "Resolution": "Correct the value and resubmit the request."}
        details = [message("GeneralError", self.reason)] if self.reason else []
        return {"error": {"code": info["MessageId"], "message": text, "@Message.ExtendedInfo": [info, *details]}}


class Parameters:
    """The errors of one request's parameters: an action's (``action`` set) or a PATCH's properties."""

    def __init__(self, action: str | None) -> None:
        self.action = action

    def unknown(self, key: str) -> RedfishError:
        return (RedfishError(400, "ActionParameterUnknown", self.action, key) if self.action
                else RedfishError(400, "PropertyUnknown", key))

    def type_error(self, value: Any, key: str) -> RedfishError:
        value = shown(value)
        return (RedfishError(400, "ActionParameterValueTypeError", value, key, self.action) if self.action
                else RedfishError(400, "PropertyValueTypeError", value, key))

    def not_in_list(self, value: Any, key: str) -> RedfishError:
        value = shown(value)
        return (RedfishError(400, "ActionParameterValueNotInList", value, key, self.action) if self.action
                else RedfishError(400, "PropertyValueNotInList", value, key))

    def format_error(self, value: Any, key: str) -> RedfishError:
        return (ParameterError("ActionParameterValueFormatError", value, key, self.action) if self.action
                else ParameterError("PropertyValueFormatError", value, key))

    def not_supported(self, key: str) -> RedfishError:
        return (ParameterError("ActionParameterNotSupported", key, self.action) if self.action
                else RedfishError(400, "PropertyNotWritable", key))

    def refused(self, key: str, reason: str) -> RedfishError:
        return (ParameterError("ActionParameterValueError", key, self.action, reason=reason) if self.action
                else ParameterError("PropertyValueError", key, reason=reason))


def shown(value: Any) -> str:
    """A request value as a message argument (JSON spelling: false, null)."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def collection_path(parent: str, machine: str) -> str:
    return f"/redfish/v1/{parent}/{machine}/VirtualMedia"


def image_uri(image: str) -> str:
    """The machine service's image as a URI (a path on the BMC host, inserted over the bus, as file:)."""
    return image if "://" in image else Path(image).as_uri()


def virtual_media(path: str, status: MediaStatus) -> dict[str, Any]:
    image = image_uri(status.image) if status.inserted and status.image else None
    parts = urlsplit(image) if image else None
    body: dict[str, Any] = {
        "@odata.id": path, "@odata.type": VIRTUAL_MEDIA_TYPE, "Id": MEDIA_ID, "Name": "Virtual CD/DVD",
        "Description": f"The CD drive {status.device} of {status.machine}",
        "MediaTypes": ["CD", "DVD"],
        "Image": image,
        "ImageName": (unquote(PurePosixPath(parts.path).name) or None) if parts else None,
        "Inserted": status.inserted,
        "WriteProtected": status.write_protected,
        **writable("Image", "Inserted"),
        "ConnectedVia": "URI" if status.inserted else "NotConnected",
        "TransferProtocolType": PROTOCOLS.get(parts.scheme) if parts else None,
        "TransferMethod": "Stream" if status.inserted else None,
        "Status": ENABLED,
        "Actions": {
            INSERT: {"target": f"{path}/Actions/VirtualMedia.InsertMedia",
                     "TransferProtocolType@Redfish.AllowableValues": list(PROTOCOLS.values()),
                     "TransferMethod@Redfish.AllowableValues": TRANSFER_METHODS},
            EJECT: {"target": f"{path}/Actions/VirtualMedia.EjectMedia"},
        },
    }
    body["@odata.etag"] = etag_of(body)
    return body


def image_url_ok(uri: str) -> bool:
    """An absolute http(s) URL with a host, printable."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return parts.scheme.lower() in PROTOCOLS and bool(parts.hostname) and uri.isprintable()


async def check_image_target(redfish: Redfish, uri: str, params: Parameters, name: str) -> None:
    """The rest of the image URL check (after :func:`image_url_ok`, when the image is to be
    fetched): its host is no internal address (outbound.py), else 400 naming parameter ``name``."""
    try:
        await redfish.targets.check(uri)
    except TargetRefused as exc:
        raise params.refused(name, str(exc)) from None


def checked_image(value: Any, params: Parameters) -> str:
    """An absolute http(s) URL, else 400."""
    if not isinstance(value, str):
        raise params.type_error(value, "Image")
    if not image_url_ok(value):
        raise params.format_error(value, "Image")
    return value


def check_options(body: dict[str, Any], image: str | None, params: Parameters) -> None:
    """The parameters beside Image and Inserted: only what this drive can do is accepted."""
    for key in ("Inserted", "WriteProtected"):
        if key in body and not isinstance(body[key], bool):
            raise params.type_error(body[key], key)
    if body.get("WriteProtected") is False:
        raise params.not_in_list(False, "WriteProtected")
    if "TransferMethod" in body:
        method = body["TransferMethod"]
        if not isinstance(method, str):
            raise params.type_error(method, "TransferMethod")
        if method not in TRANSFER_METHODS:
            raise params.not_in_list(method, "TransferMethod")
    if "TransferProtocolType" in body:
        protocol = body["TransferProtocolType"]
        if not isinstance(protocol, str):
            raise params.type_error(protocol, "TransferProtocolType")
        scheme = urlsplit(image).scheme.lower() if image else None
        if protocol not in PROTOCOLS.values() or (scheme and protocol != PROTOCOLS[scheme]):
            raise params.not_in_list(protocol, "TransferProtocolType")
    for key in ("UserName", "Password"):
        if key in body and body[key] not in (None, ""):
            if not isinstance(body[key], str):
                raise params.type_error(body[key], key)
            raise params.not_supported(key)


def insert_request(body: dict[str, Any]) -> str:
    """The image an InsertMedia request asks for (400 naming what is wrong)."""
    params = Parameters(INSERT)
    for key in body:
        if key not in PARAMETERS:
            raise params.unknown(key)
    if "Image" not in body:
        raise RedfishError(400, "ActionParameterMissing", INSERT, "Image")
    image = checked_image(body["Image"], params)
    check_options(body, image, params)
    if body.get("Inserted") is False:
        raise params.not_in_list(False, "Inserted")
    return image


KEEP = object()


def patch_request(body: dict[str, Any], current: dict[str, Any]) -> str | object | None:
    """What a PATCH asks for: an image to insert, None to eject, or :data:`KEEP`."""
    params = Parameters(None)
    for key in body:
        if key not in PARAMETERS:
            raise RedfishError(400, "PropertyNotWritable" if key in current else "PropertyUnknown", key)
    image = body.get("Image")
    if image == "":
        image = None
    if image is not None:
        image = checked_image(image, params)
    check_options(body, image, params)
    inserted = body.get("Inserted")
    if "Image" in body:
        if image is None and inserted is True:
            raise params.not_in_list(True, "Inserted")
        if image is not None and inserted is False:
            raise params.not_in_list(False, "Inserted")
        if image is None:
            return None if current["Inserted"] else KEEP
        return KEEP if current["Inserted"] and image == current["Image"] else image
    if inserted is False:
        return None if current["Inserted"] else KEEP
    if inserted is True and not current["Inserted"]:
        raise RedfishError(400, "PropertyMissing", "Image")
    return KEEP


async def action_body(request: Request) -> dict[str, Any]:
    """An action's parameters; an empty body is no parameters (as several clients send EjectMedia)."""
    if not (await request.body()).strip():
        return {}
    return await json_body(request)


def register(app: FastAPI, redfish: Redfish) -> None:
    async def media_status(machine: str) -> MediaStatus | None:
        """The drive's status, None for a machine without a CD drive for virtual media."""
        try:
            return await bus.request(redfish.nc, machine, subjects.MEDIA_GET, None, MediaStatus)
        except BusError as exc:
            if exc.error == "not_found":
                return None
            raise

    async def drive(machine: str, media_id: str) -> MediaStatus:
        status = await media_status(machine) if media_id == MEDIA_ID else None
        if status is None:
            raise RedfishError(404, "ResourceNotFound", "VirtualMedia", media_id)
        return status

    async def insert(machine: str, image: str, params: Parameters) -> None:
        await check_image_target(redfish, image, params, "Image")
        try:
            await bus.request(redfish.nc, machine, subjects.MEDIA_INSERT, MediaInsert(image=image), MediaStatus,
                              timeout=INSERT_TIMEOUT)
        except BusError as exc:
            if exc.error in ("bad_request", "qemu_error"):
                raise params.refused("Image", f"{image}: {exc.message}") from exc
            raise

    async def eject(machine: str) -> None:
        await bus.request(redfish.nc, machine, subjects.MEDIA_EJECT, None, MediaStatus)

    def routes(parent: str) -> None:
        base = f"/redfish/v1/{parent}/{{machine}}/VirtualMedia"

        @app.get(base)
        async def media_collection(request: Request, machine: str) -> Response:
            await redfish.login(request, machine)
            status = await media_status(machine)
            members = [f"{collection_path(parent, machine)}/{MEDIA_ID}"] if status else []
            return json_response(collection(collection_path(parent, machine), "VirtualMediaCollection",
                                            "Virtual media", members))

        @app.get(f"{base}/{{media_id}}")
        async def resource(request: Request, machine: str, media_id: str) -> Response:
            await redfish.login(request, machine)
            path = f"{collection_path(parent, machine)}/{media_id}"
            return json_response(virtual_media(path, await drive(machine, media_id)))

        @app.patch(f"{base}/{{media_id}}")
        async def patch(request: Request, machine: str, media_id: str) -> Response:
            """Image, Inserted, WriteProtected by PATCH, as clients without the actions change them;
            with If-Match, 412 unless it is the current ETag."""
            await redfish.login(request, machine, PRIVILEGE)
            body = await patch_body(request)
            path = f"{collection_path(parent, machine)}/{media_id}"
            current = virtual_media(path, await drive(machine, media_id))
            check_if_match(request, current)
            change = patch_request(body, current)
            if change is None:
                await eject(machine)
            elif isinstance(change, str):
                await insert(machine, change, Parameters(None))
            return json_response(virtual_media(path, await drive(machine, media_id)))

        @app.post(f"{base}/{{media_id}}/Actions/VirtualMedia.InsertMedia")
        async def insert_media(request: Request, machine: str, media_id: str) -> Response:
            await redfish.login(request, machine, PRIVILEGE)
            body = await json_body(request)
            await drive(machine, media_id)
            await insert(machine, insert_request(body), Parameters(INSERT))
            return Response(status_code=204)

        @app.post(f"{base}/{{media_id}}/Actions/VirtualMedia.EjectMedia")
        async def eject_media(request: Request, machine: str, media_id: str) -> Response:
            await redfish.login(request, machine, PRIVILEGE)
            body = await action_body(request)
            if body:
                raise RedfishError(400, "ActionParameterUnknown", EJECT, next(iter(body)))
            if (await drive(machine, media_id)).inserted:
                await eject(machine)
            return Response(status_code=204)

    for parent in PARENTS:
        routes(parent)
