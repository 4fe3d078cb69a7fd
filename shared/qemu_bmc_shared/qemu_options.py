"""QEMU's option syntax, for the machine service and the CLI: ``key=value,...`` fields (a comma
in a value written twice), the JSON form of ``-device``/``-blockdev``, and a command line's
(option, value) pairs."""

from __future__ import annotations

import json
import re


def split_option(value: str) -> list[str]:
    """``a=1,b=x,,y`` → ``["a=1", "b=x,y"]`` (a comma inside a value is written twice)."""
    parts = re.split(r",(?!,)", value.replace(",,", "\0"))
    return [part.replace("\0", ",") for part in parts]


def option_fields(value: str, implied: str | None = None) -> dict[str, str]:
    """The ``key=value`` fields of an option; a first field without ``=`` is the ``implied`` key's
    value (``-device e1000,mac=…``: the driver), another one a flag set on."""
    fields: dict[str, str] = {}
    if value.startswith("{"):  # JSON syntax (-device, -blockdev, -object): flattened as keys with dots
        try:
            return flatten(json.loads(value))
        except ValueError:
            return {}
    for index, part in enumerate(split_option(value)):
        key, equals, text = part.partition("=")
        if equals:
            fields[key] = text
        elif index == 0 and implied:
            fields[implied] = key
        elif key:
            fields[key] = "on"
    return fields


def flatten(value: object, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        result: dict[str, str] = {}
        for key, inner in value.items():
            result.update(flatten(inner, f"{prefix}{key}."))
        return result
    text = ("on" if value else "off") if isinstance(value, bool) else str(value)
    return {prefix.rstrip("."): text}


def options(argv: list[str]) -> list[tuple[str, str]]:
    """(option without its dashes, value) for each option of a command line that has a value."""
    pairs = []
    for index, arg in enumerate(argv[1:-1], 1):
        if arg.startswith("-") and len(arg) > 1:
            pairs.append((arg.lstrip("-"), argv[index + 1]))
    return pairs
