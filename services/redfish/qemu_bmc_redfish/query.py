"""Redfish query parameters (DSP0266 §7.3): ``$expand``, ``$select``, ``$filter``, ``$top``, ``$skip``
and ``only``, parsed here and applied by the OData middleware to the JSON resource a GET built.

What a query needs besides the resource asked for (the members ``$filter`` tests, the links
``$expand`` embeds, the member ``only`` answers) is read through the application itself: GETs
with the caller's own headers, so the caller's privileges and 404s hold for each of them. A
resource the caller may not read stays a plain link (``$expand``) or is no match (``$filter``).
One request reads and embeds at most :data:`MAX_RESOURCES` resources: more is 400
QueryParameterOutOfRange, so that no query makes the service hold unbounded memory.

``excerpt`` is not supported: the properties it keeps are marked in the CSDL, which the service
does not ship. Like every parameter without ``$`` the service does not support, it is ignored
(§7.3.1); ``ExcerptQuery`` says so."""

from __future__ import annotations

import asyncio
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import msgspec
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope

from .errors import RedfishError

MAX_LEVELS = 6
"""The largest ``$levels`` of ``$expand`` (ProtocolFeaturesSupported.ExpandQuery.MaxLevels)."""
MAX_RESOURCES = 1000
"""The most resources one request reads (for ``$filter``, ``$expand``) and embeds (``$expand``)."""
CONCURRENT_READS = 8
QUERY_SAFE = "$*()~.,/'"
"""Characters Members@odata.nextLink leaves as they are in query values."""

PROTOCOL_FEATURES: dict[str, Any] = {
    "ExpandQuery": {"ExpandAll": True, "NoLinks": True, "Links": True, "Levels": True, "MaxLevels": MAX_LEVELS},
    "SelectQuery": True, "FilterQuery": True, "FilterQueryComparisonOperations": True,
    "FilterQueryCompoundOperations": True, "OnlyMemberQuery": True, "TopSkipQuery": True, "ExcerptQuery": False,
    "IncludeOriginOfConditionQuery": False, "DeepOperations": {"DeepPATCH": False, "DeepPOST": False},
    "MultipleHTTPRequests": True,
}
"""The service root's ProtocolFeaturesSupported: what this module does, and nothing else."""

Selection = dict[str, "Selection | None"]
"""``$select`` as a tree: property name → the properties kept inside it (None: all of it)."""
Node = tuple[Any, ...]
"""A ``$filter`` expression: ("or"|"and", [nodes]), ("not", node), (comparison, left, right),
("is", operand) for a Boolean property alone; an operand is ("path", names) or ("value", literal)."""


@dataclass(frozen=True)
class Query:
    """The supported query options of one request, validated."""

    options: dict[str, str]
    """The options as the client sent them (for ``Members@odata.nextLink``)."""
    expand: tuple[str, int] | None = None
    select: Selection | None = None
    filter: Node | None = None
    top: int | None = None
    skip: int = 0
    only: bool = False

    @property
    def on_members(self) -> bool:
        """Whether an option that applies only to resource collections is there (§7.3.1)."""
        return self.only or self.filter is not None or self.top is not None or "$skip" in self.options


def parse(query_string: bytes) -> Query | None:
    """The query options of a request, or None when it has none this module applies. Unsupported
    options that start with ``$`` are 501 QueryParameterUnsupported, others are ignored; an
    invalid value is 400 (§7.3.1); ``only`` goes with no other option (QueryCombinationInvalid)."""
    options: dict[str, str] = {}
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name not in _PARSERS:
            if name.startswith("$"):
                raise RedfishError(501, "QueryParameterUnsupported", name)
            continue
        if name in options:
            raise RedfishError(400, "QueryCombinationInvalid")
        options[name] = value
    if not options:
        return None
    if "only" in options and len(options) > 1:
        raise RedfishError(400, "QueryCombinationInvalid")
    return Query(options, **{_PARSERS[name][0]: _PARSERS[name][1](value) for name, value in options.items()})


def _parse_expand(value: str) -> tuple[str, int]:
    """``*`` (every link), ``.`` (links not in Links properties), ``~`` (links in Links properties),
    each with an optional ``($levels=n)`` (§7.3.2); other $expand forms are not supported."""
    match = re.fullmatch(r"([*.~])(?:\(\$levels=([^)]*)\))?", value)
    if match is None:
        raise RedfishError(400, "QueryParameterValueFormatError", value, "$expand")
    if match[2] is None:
        return match[1], 1
    return match[1], _integer(match[2], "$levels", 1, MAX_LEVELS)


def _integer(value: str, parameter: str, low: int, high: int | None = None) -> int:
    """``value`` as an integer from ``low`` to ``high``: 400 QueryParameterValueTypeError when it is
    not an integer, QueryParameterOutOfRange when out of the range (or of 18 digits)."""
    number = value.strip()
    if re.fullmatch(r"-?[0-9]+", number) is None:
        raise RedfishError(400, "QueryParameterValueTypeError", value, parameter)
    if len(number) > 18 or int(number) < low or (high is not None and int(number) > high):
        raise RedfishError(400, "QueryParameterOutOfRange", value, parameter,
                           f"{low} or more" if high is None else f"{low} to {high}")
    return int(number)


_SELECT_NAME = re.compile(r"[A-Za-z_]\w*(?:@[A-Za-z_][\w.]*)?|@[A-Za-z_][\w.]*|\*")


def _parse_select(value: str) -> Selection:
    """Comma-separated properties, ``/`` into nested objects (§7.3.4)."""
    selection: Selection = {}
    for item in value.split(","):
        names = item.strip().split("/")
        if not all(_SELECT_NAME.fullmatch(name) for name in names):
            raise RedfishError(400, "QueryParameterValueFormatError", value, "$select")
        level: Selection = selection
        for name in names[:-1]:
            inner = level.setdefault(name, {})
            if inner is None:
                break  # all of this property is selected already
            level = inner
        else:
            level[names[-1]] = None
    return selection


def _parse_count(parameter: str) -> Callable[[str], int]:
    """A number of members, 0 or more (§7.3.5)."""
    return lambda value: _integer(value, parameter, 0)


def _parse_only(value: str) -> bool:
    """``only`` takes no value (§7.3.1: a value is 400)."""
    if value:
        raise RedfishError(400, "QueryParameterValueFormatError", value, "only")
    return True


def _parse_filter(value: str) -> Node:
    return _FilterParser(value).parse()


_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "$expand": ("expand", _parse_expand), "$select": ("select", _parse_select), "$filter": ("filter", _parse_filter),
    "$top": ("top", _parse_count("$top")), "$skip": ("skip", _parse_count("$skip")), "only": ("only", _parse_only),
}

# ------------------------------------------------------------------------------------------ $filter

_FILTER_TOKEN = re.compile(r"\s*(?:'((?:[^']|'')*)'|(-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(?![\w.])|([()])"
                           r"|([A-Za-z_]\w*(?:/[A-Za-z_]\w*)*)(?![\w/]))")
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}
_LITERALS = {"true": True, "false": False, "null": None}
_MAX_NESTING = 32


class _FilterParser:
    """$filter (§7.3.3): comparisons ``eq ne gt ge lt le`` between a property (``/`` into nested
    objects) and a string, number, Boolean or null literal, combined with ``and``, ``or``, ``not``
    and parentheses; precedence not > and > or."""

    def __init__(self, text: str) -> None:
        self.text, self.position, self.nesting = text, 0, 0
        self.tokens = self._tokens(text)

    def _tokens(self, text: str) -> list[tuple[str, Any]]:
        tokens: list[tuple[str, Any]] = []
        position, end = 0, len(text.rstrip())
        while position < end:
            match = _FILTER_TOKEN.match(text, position)
            if match is None:
                raise self.error()
            string, number, parenthesis, word = match.groups()
            if string is not None:
                tokens.append(("value", string.replace("''", "'")))
            elif number is not None:
                integer = re.fullmatch(r"-?[0-9]{1,18}", number) is not None
                tokens.append(("value", int(number) if integer else float(number)))
            elif parenthesis is not None:
                tokens.append((parenthesis, parenthesis))
            elif word in _LITERALS:
                tokens.append(("value", _LITERALS[word]))
            else:
                tokens.append(("word", word))
            position = match.end()
        return tokens

    def error(self) -> RedfishError:
        return RedfishError(400, "QueryParameterValueFormatError", self.text, "$filter")

    def peek(self) -> tuple[str, Any]:
        return self.tokens[self.position] if self.position < len(self.tokens) else ("end", None)

    def take(self, kind: str, word: str | None = None) -> bool:
        if self.peek()[0] == kind and (word is None or self.peek()[1] == word):
            self.position += 1
            return True
        return False

    def parse(self) -> Node:
        node = self.disjunction()
        if self.position != len(self.tokens):
            raise self.error()
        return node

    def disjunction(self) -> Node:
        nodes = [self.conjunction()]
        while self.take("word", "or"):
            nodes.append(self.conjunction())
        return ("or", nodes) if len(nodes) > 1 else nodes[0]

    def conjunction(self) -> Node:
        nodes = [self.unary()]
        while self.take("word", "and"):
            nodes.append(self.unary())
        return ("and", nodes) if len(nodes) > 1 else nodes[0]

    def unary(self) -> Node:
        if self.take("word", "not"):
            return ("not", self.nested(self.unary))
        if self.take("("):
            node = self.nested(self.disjunction)
            if not self.take(")"):
                raise self.error()
            return node
        left = self.operand()
        kind, word = self.peek()
        if kind == "word" and word in ("eq", "ne", *_COMPARISONS):
            self.position += 1
            return (word, left, self.operand())
        if left[0] == "path":
            return ("is", left)
        raise self.error()

    def nested(self, parse: Callable[[], Node]) -> Node:
        self.nesting += 1
        if self.nesting > _MAX_NESTING:
            raise self.error()
        node = parse()
        self.nesting -= 1
        return node

    def operand(self) -> Node:
        kind, content = self.peek()
        if kind == "value":
            self.position += 1
            return ("value", content)
        if kind == "word" and content not in ("and", "or", "not", "eq", "ne", *_COMPARISONS):
            self.position += 1
            return ("path", tuple(content.split("/")))
        raise self.error()


class _TypeMismatch(Exception):
    """A literal compared with a property of another type."""


def matches(node: Node, resource: dict[str, Any]) -> bool:
    """Whether ``resource`` passes the $filter expression ``node``. A missing property is null,
    which equals only null; a literal compared with a property of another type (not null) is
    :class:`_TypeMismatch`; objects and arrays have no order."""
    kind = node[0]
    if kind == "or":
        return any(matches(term, resource) for term in node[1])
    if kind == "and":
        return all(matches(term, resource) for term in node[1])
    if kind == "not":
        return not matches(node[1], resource)
    if kind == "is":
        return _operand(node[1], resource) is True
    left, right = _operand(node[1], resource), _operand(node[2], resource)
    if _type(left) != _type(right):
        if None not in (left, right) and "value" in (node[1][0], node[2][0]):
            raise _TypeMismatch  # e.g. a number compared with a string literal
        return kind == "ne"
    if kind in ("eq", "ne"):
        return (left == right) == (kind == "eq")
    return _type(left) in ("number", "string") and _COMPARISONS[kind](left, right)


def _operand(operand: Node, resource: dict[str, Any]) -> Any:
    if operand[0] == "value":
        return operand[1]
    value: Any = resource
    for name in operand[1]:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "other"


# ------------------------------------------------------------------------------------------ $select


def select(value: Any, selection: Selection) -> Any:
    """The selected properties of ``value`` (of each object, for an array), with every ``@odata.``
    property and the annotations of the selected ones (``Members@odata.count``) (§7.3.4)."""
    if isinstance(value, list):
        return [select(item, selection) for item in value]
    if not isinstance(value, dict) or "*" in selection:
        return value
    kept: dict[str, Any] = {}
    for key, item in value.items():
        name = key if key in selection else key.partition("@")[0]
        if key.startswith("@odata.") or (name in selection and (selection[name] is None or name != key)):
            kept[key] = item
        elif name in selection:
            kept[key] = select(item, selection[name])
    return kept


# ------------------------------------------------------------------------------------------ $expand


def reference(value: Any) -> str | None:
    """The path of a link to another resource of this service (an object with only
    ``@odata.id``), else None."""
    if isinstance(value, dict) and len(value) == 1:
        path = value.get("@odata.id")
        if isinstance(path, str) and path.startswith("/redfish/v1/") and not any(c in path for c in "#?"):
            return path
    return None


def _expands(kind: str, in_links: bool) -> bool:
    return kind == "*" or (kind == "~") == in_links


def _links(value: Any, kind: str, in_links: bool = False) -> Iterator[str]:
    """The paths of the links in ``value`` that $expand ``kind`` expands."""
    if isinstance(value, dict):
        path = reference(value)
        if path is not None:
            if _expands(kind, in_links):
                yield path
            return
        for key, item in value.items():
            yield from _links(item, kind, in_links or key == "Links")
    elif isinstance(value, list):
        for item in value:
            yield from _links(item, kind, in_links)


# ------------------------------------------------------------------------------------------ reading


class _NotJson(Exception):
    """A successful response that is not JSON (a stream, XML, a page): not read."""


@dataclass
class Captured:
    """A response of the application, held."""

    status: int = 500
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    json: bool = True

    def response(self, body: dict[str, Any] | None = None) -> Response:
        """This response, with ``body`` in place of its own."""
        content = bytes(self.body) if body is None else msgspec.json.encode(body)
        response = Response(content, self.status)
        response.raw_headers = [(*header,) for header in self.headers if header[0] != b"content-length"]
        response.raw_headers.append((b"content-length", str(len(content)).encode()))
        return response


async def capture(app: ASGIApp, scope: Scope, receive: Receive) -> Captured:
    """What ``app`` answers to ``scope``. A successful answer that is not JSON is cut off at its
    start (``json`` False), so that an event stream does not hold the request."""
    captured = Captured()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            captured.status, captured.headers = message["status"], list(message.get("headers", []))
            content_type = next((value for name, value in captured.headers if name.lower() == b"content-type"), b"")
            if not content_type.startswith(b"application/json"):
                captured.json = False
                if captured.status < 300:
                    raise _NotJson
        elif message["type"] == "http.response.body":
            captured.body += message.get("body", b"")

    try:
        await app(scope, receive, send)
    except _NotJson:
        pass
    return captured


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Resources:
    """The resources of this service one request's query reads: GETs through the application with
    the caller's headers, each path once, at most :data:`MAX_RESOURCES` of them."""

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self.app = app
        self.scope = {**scope, "method": "GET", "query_string": b"", "headers": [
            (name, value) for name, value in scope["headers"]
            if name not in (b"content-length", b"content-type", b"if-match", b"if-none-match", b"expect")]}
        self.bodies: dict[str, dict[str, Any] | None] = {}
        """Path → the resource (None: the caller may not read it, or it is not there)."""
        self.failure: Captured | None = None
        """The first read that failed with a server error (5xx), e.g. the bus being down."""
        self.embedded = 0
        self.slots = asyncio.Semaphore(CONCURRENT_READS)

    async def get(self, path: str) -> Captured:
        async with self.slots:
            return await capture(self.app, {**self.scope, "path": unquote(path), "raw_path": path.encode()},
                                 _no_body)

    async def read(self, paths: list[str], parameter: str, value: str) -> None:
        """Reads the ``paths`` not read yet, concurrently; past the limit 400 QueryParameterOutOfRange."""
        new = list(dict.fromkeys(path for path in paths if path not in self.bodies))
        if len(self.bodies) + len(new) > MAX_RESOURCES:
            raise too_many(parameter, value)
        for path, captured in zip(new, await asyncio.gather(*(self.get(path) for path in new)), strict=True):
            body = msgspec.json.decode(captured.body) if captured.status == 200 and captured.json else None
            self.bodies[path] = body if isinstance(body, dict) else None
            if captured.status >= 500 and self.failure is None:
                self.failure = captured

    async def read_links(self, resource: dict[str, Any], kind: str, levels: int, value: str) -> None:
        """Reads what $expand embeds, level by level (each path once, however often it is linked)."""
        explored: set[str] = set()
        frontier = [resource]
        for _ in range(levels):
            paths = sorted({path for body in frontier for path in _links(body, kind)} - explored)
            explored.update(paths)
            await self.read(paths, "$expand", value)
            frontier = [body for path in paths if (body := self.bodies[path]) is not None]

    def embed(self, value: Any, kind: str, levels: int, expand: str, in_links: bool = False) -> Any:
        """``value`` with the links $expand ``kind`` expands replaced by the resources read, down to
        ``levels``; at most :data:`MAX_RESOURCES` embedded."""
        if isinstance(value, list):
            return [self.embed(item, kind, levels, expand, in_links) for item in value]
        if not isinstance(value, dict):
            return value
        path = reference(value)
        if path is None:
            return {key: self.embed(item, kind, levels, expand, in_links or key == "Links")
                    for key, item in value.items()}
        body = self.bodies.get(path) if levels > 0 and _expands(kind, in_links) else None
        if body is None:
            return value
        self.embedded += 1
        if self.embedded > MAX_RESOURCES:
            raise too_many("$expand", expand)
        return self.embed(body, kind, levels - 1, expand)


def too_many(parameter: str, value: str) -> RedfishError:
    return RedfishError(400, "QueryParameterOutOfRange", value, parameter,
                        f"at most {MAX_RESOURCES} resources a request")


# ------------------------------------------------------------------------------------------ answering


async def answer(app: ASGIApp, scope: Scope, receive: Receive, query: Query) -> tuple[Response, str]:
    """The answer to a GET with query options, and the path of the resource it is. The options
    apply in DSP0266's order (§7.3.1): $filter, $skip, $top, $expand, $select. Errors of the
    resource itself (401, 404 …) are answered as they are.

    A view keeps the resource's ``@odata.etag`` and ``ETag``: they name the version of the resource
    the view was taken from, so an If-Match with them succeeds exactly while the resource is
    unchanged (§9.7.4; a tag of the view itself would never match the resource, and DMTF's
    use-case checker wants a $select view's ``@odata.etag`` to be the resource's). No cache can
    mistake a view for the resource: responses are ``no-cache`` and If-None-Match is not answered."""
    path = scope["path"]
    resources = Resources(app, scope)
    captured = await capture(app, scope, receive)
    if captured.status < 300 and not captured.json:
        raise RedfishError(400, "QueryNotSupportedOnResource")
    if captured.status != 200:
        return captured.response(), path
    body = msgspec.json.decode(captured.body)
    if not isinstance(body, dict):
        raise RedfishError(400, "QueryNotSupportedOnResource")
    if query.on_members:
        members = body.get("Members")
        if not isinstance(members, list):
            raise RedfishError(400, "QueryNotSupportedOnResource")
        if query.only:
            member = reference(members[0]) if len(members) == 1 else None
            return ((await resources.get(member)).response(), member) if member else (captured.response(), path)
        members = await _members(resources, members, query)
        if resources.failure is not None:
            return resources.failure.response(), path
        body = _page(body, members, query, path)
    if query.expand is not None:
        kind, levels = query.expand
        await resources.read_links(body, kind, levels, query.options["$expand"])
        body = resources.embed(body, kind, levels, query.options["$expand"])
    if query.select is not None:
        body = select(body, query.select)
    return captured.response(body), path


async def _members(resources: Resources, members: list[Any], query: Query) -> list[Any]:
    """The members that pass $filter (all without it): each read with the caller's credentials."""
    if query.filter is None:
        return members
    paths = [path for member in members if (path := reference(member)) is not None]
    await resources.read(paths, "$filter", query.options["$filter"])
    try:
        return [member for member in members if (path := reference(member)) is not None
                and (resource := resources.bodies[path]) is not None and matches(query.filter, resource)]
    except _TypeMismatch:
        raise RedfishError(400, "QueryParameterValueTypeError", query.options["$filter"], "$filter") from None


def _page(body: dict[str, Any], members: list[Any], query: Query, path: str) -> dict[str, Any]:
    """The collection with the page $skip and $top ask for; ``Members@odata.count`` counts every
    member that passes $filter, ``Members@odata.nextLink`` asks for the next page (§7.3.5)."""
    body = {**body, "Members@odata.count": len(members)}
    end = len(members) if query.top is None else query.skip + query.top
    body["Members"] = members[query.skip:end]
    if query.top and end < len(members):
        options = {**query.options, "$skip": str(end)}
        body["Members@odata.nextLink"] = f"{path}?" + "&".join(
            f"{quote(name, safe='$')}={quote(value, safe=QUERY_SAFE)}" for name, value in options.items())
    return body

