"""LogServices of each Manager and ComputerSystem: the machine's IPMI System Event Log (state service)
as Redfish LogEntries, with ClearLog."""

from __future__ import annotations

from fastapi import FastAPI

from .resources import Redfish


def register(app: FastAPI, redfish: Redfish) -> None:
    pass
