"""UpdateService and its FirmwareInventory: the BMC's and each machine's firmware versions."""

from __future__ import annotations

from fastapi import FastAPI

from .resources import Redfish


def register(app: FastAPI, redfish: Redfish) -> None:
    pass
