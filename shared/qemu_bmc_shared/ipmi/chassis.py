"""IPMI chassis commands (being written)."""

from __future__ import annotations

from .core import registry  # noqa: F401
