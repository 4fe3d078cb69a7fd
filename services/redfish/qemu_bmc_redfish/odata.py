"""The OData layer in front of every route (DSP0266 §7, §8): trailing slashes, OData-Version,
query options, and the Allow and Cache-Control headers."""

from __future__ import annotations

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import RedfishError
from .resources import error_response


class ODataMiddleware:
    """Plain ASGI (no per-request streams), for every request: a trailing slash works on every URI;
    a request for another OData version gets 412 and one with query options (none is supported)
    501; every response says ``OData-Version: 4.0``, and a successful GET or HEAD also its
    ``Allow`` and ``Cache-Control`` (DSP0266 §8.1, §8.2, §7.4)."""

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
        headers = dict(scope["headers"])
        version = headers.get(b"odata-version")
        if version is not None and version.strip() != b"4.0":
            return await error_response(RedfishError(412, "HeaderInvalid", f"OData-Version: {version.decode()}"))(
                scope, receive, send)
        if any(pair.split(b"=", 1)[0].startswith(b"$") for pair in scope["query_string"].split(b"&")):
            return await error_response(RedfishError(501, "QueryNotSupported"))(scope, receive, send)
        reading = scope["method"] in ("GET", "HEAD")
        if scope["method"] == "HEAD":  # the app answers as to GET; the server sends no body for HEAD
            scope = {**scope, "method": "GET"}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"odata-version", b"4.0")]
                if reading and message["status"] < 300:
                    extra += [(b"allow", self.allow(scope)), (b"cache-control", b"no-cache")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

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
