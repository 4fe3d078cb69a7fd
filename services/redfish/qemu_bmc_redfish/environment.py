"""The Chassis' power and thermal resources: PowerSubsystem, ThermalSubsystem, Sensors, and the
deprecated Power and Thermal."""

from __future__ import annotations

from fastapi import FastAPI

from .resources import Redfish


def register(app: FastAPI, redfish: Redfish) -> None:
    pass
