"""Processors, Memory, Storage, SimpleStorage and the EthernetInterfaces of each ComputerSystem, from
the machine service's hardware.get (what QEMU really has)."""

from __future__ import annotations

from fastapi import FastAPI

from .resources import Redfish


def register(app: FastAPI, redfish: Redfish) -> None:
    pass
