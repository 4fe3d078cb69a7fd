"""The OData layer in front of every route (DSP0266 §7, §8): trailing slashes, OData-Version,
query options, and the Allow and Cache-Control headers."""

from __future__ import annotations

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import query
from .errors import RedfishError
from .resources import error_response


class ODataMiddleware:
    """Plain ASGI (no per-request streams), for every request: a trailing slash works on every URI;
    a request for another OData version gets 412; query options are applied (``query``: a GET
    without them takes the plain path); every response says ``OData-Version: 4.0``, and a
    successful GET or HEAD also its ``Allow`` (the methods of the path's routes, unless the
    resource gives its own: one volume can be deleted, another not) and ``Cache-Control``
    (DSP0266 §8.1, §8.2, §7.3, §7.4)."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router
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
                extra = [(b"odata-version", b"4.0")]
                if reading and message["status"] < 300:
                    extra.append((b"cache-control", b"no-cache"))
                    if not any(name.lower() == b"allow" for name, _ in message.get("headers", [])):
                        extra.append((b"allow", self.allow(resource)))  # unless the resource said its own
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

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
        options = query.parse(scope["query_string"]) if scope["query_string"] else None
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
