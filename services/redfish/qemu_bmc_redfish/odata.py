"""The OData layer in front of every route (DSP0266 §7, §8): trailing slashes, OData-Version,
query options, the Allow and Cache-Control headers, the security headers of every response, and
503 for what needs the bus while it is down."""

from __future__ import annotations

from nats.aio.client import Client
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import query
from .errors import RedfishError
from .resources import error_response, unavailable

STATIC_PREFIX = "/console/static/"
#: What is served without the bus (every other path needs it: 503 while it is down).
WITHOUT_BUS = {"/redfish", "/redfish/v1", "/redfish/v1/odata", "/redfish/v1/$metadata"}
#: The Content-Security-Policy of a response that gives none: nothing to load or run, never framed
#: (the console page gives its own).
DEFAULT_CSP = b"default-src 'none'; frame-ancestors 'none'"
HSTS = b"max-age=31536000"


def security_headers(scheme: str) -> list[tuple[bytes, bytes]]:
    """The headers every response has (unless it gives its own): never framed, never sniffed as
    another type, no Referer to other sites; over HTTPS, HTTPS only from now on (HSTS)."""
    headers = [(b"content-security-policy", DEFAULT_CSP), (b"x-frame-options", b"DENY"),
               (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
    if scheme == "https":
        headers.append((b"strict-transport-security", HSTS))
    return headers


class ODataMiddleware:
    """Plain ASGI (no per-request streams), for every request: a trailing slash works on every URI;
    a request for another OData version gets 412; query options are applied (``query``: a GET
    without them takes the plain path); every response says ``OData-Version: 4.0``, and a
    successful GET or HEAD also its ``Allow`` (the methods of the path's routes, unless the
    resource gives its own: one volume can be deleted, another not) (DSP0266 §8.1, §8.2, §7.3,
    §7.4). Every response also gets :func:`security_headers` and ``Cache-Control: no-store``
    (``no-cache`` for the console's static files) unless it gives its own."""

    def __init__(self, app: ASGIApp, router: Router, nc: Client) -> None:
        self.app = app
        self.router = router
        self.nc = nc
        self.allowed: dict[str, bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/")}
        reading = scope["method"] in ("GET", "HEAD")
        if scope["method"] == "HEAD":  # the app answers as to GET; the server sends no body for HEAD
            scope = {**scope, "method": "GET"}
        resource = scope  # the resource the answer is (another one for ``only``)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                given = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(b"odata-version", b"4.0")]
                extra += [(name, value) for name, value in security_headers(scope["scheme"]) if name not in given]
                if b"cache-control" not in given:
                    extra.append((b"cache-control", b"no-cache" if path.startswith(STATIC_PREFIX) else b"no-store"))
                if reading and message["status"] < 300 and b"allow" not in given:
                    extra.append((b"allow", self.allow(resource)))  # unless the resource said its own
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if not self.nc.is_connected and scope["path"] not in WITHOUT_BUS and not path.startswith(STATIC_PREFIX):
            return await error_response(unavailable())(scope, receive, send_with_headers)
        try:
            options = self.query_options(scope)
        except RedfishError as error:
            return await error_response(error)(scope, receive, send_with_headers)
        if options is None:
            return await self.app(scope, receive, send_with_headers)
        try:
            response, resource_path = await query.answer(self.app, scope, receive, options)
            resource = {**scope, "path": resource_path}
        except RedfishError as error:
            response = error_response(error)
        await response(scope, receive, send_with_headers)

    @staticmethod
    def query_options(scope: Scope) -> query.Query | None:
        """The request's query options (None: none to apply); 412 for another OData version, 400
        for query options on a method other than GET and HEAD (which is GET here by now)."""
        version = dict(scope["headers"]).get(b"odata-version")
        if version is not None and version.strip() != b"4.0":
            raise RedfishError(412, "HeaderInvalid", f"OData-Version: {version.decode(errors='replace')}")
        try:
            options = query.parse(scope["query_string"]) if scope["query_string"] else None
        except RecursionError:  # a $filter nested deeper than the parser goes
            raise RedfishError(400, "QueryParameterValueFormatError", "(nested too deep)", "$filter") from None
        if options is not None and scope["method"] != "GET":
            raise RedfishError(400, "QueryNotSupportedOnOperation")
        return options

    def allow(self, scope: Scope) -> bytes:
        """The methods the routes of this path take (kept per path)."""
        path = scope["path"]
        allowed = self.allowed.get(path)
        if allowed is None:
            methods: set[str] = set()
            for route in self.router.routes:
                match, _ = route.matches({**scope, "method": "GET"})
                if match is not Match.NONE:
                    methods |= getattr(route, "methods", None) or set()
            allowed = ", ".join(sorted(methods | {"HEAD"} if "GET" in methods else methods)).encode()
            if len(self.allowed) < 4096:
                self.allowed[path] = allowed
        return allowed
