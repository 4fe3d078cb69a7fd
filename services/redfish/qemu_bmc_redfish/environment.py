"""The Chassis' power and thermal resources: PowerSubsystem, ThermalSubsystem and its ThermalMetrics,
EnvironmentMetrics, Sensors, and the deprecated Power and Thermal (Redfish Sensor, PowerSubsystem,
ThermalSubsystem, ThermalMetrics, EnvironmentMetrics, Power and Thermal schemas).

A VM has no sensors: every reading here is a model, not a measurement. The machine service's
``Inventory.environment`` gives the machine's nominal power draw and CPU, system board and intake
temperatures (``[vm.NAME.environment]`` in its config); they are applied to the machine's power
state: on, the nominal figures; off, 0 W and every temperature the intake's. The sensors say so
(``Implementation`` ``Synthesized``). The temperature thresholds are fixed, typical of a server;
a reading at or above one makes the sensor's health Warning or Critical. A VM has no fans and no
power supplies: those lists are empty and no collection of them is linked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import Inventory, PowerQuery, PowerStatus

from .errors import RedfishError
from .resources import ENABLED, Redfish, collection, json_response, link

SENSOR_TYPE = "#Sensor.v1_12_0.Sensor"
MODEL = ("A model, not a measurement: the machine's nominal reading ([vm.NAME.environment]) while it is on; "
         "off, 0 W and the intake's temperature")


@dataclass(frozen=True)
class Temperature:
    """A modelled temperature sensor: its Id, name, Redfish PhysicalContext, the EnvironmentModel
    field of its nominal reading and its upper thresholds (caution, critical, fatal), in °C."""

    id: str
    name: str
    context: str
    nominal: str
    thresholds: tuple[float, float, float]


TEMPERATURES = (
    Temperature("IntakeTemp", "Intake temperature", "Intake", "intake_celsius", (40.0, 45.0, 50.0)),
    Temperature("CPUTemp", "CPU temperature", "CPU", "cpu_celsius", (85.0, 95.0, 105.0)),
    Temperature("SystemBoardTemp", "System board temperature", "SystemBoard", "board_celsius", (70.0, 80.0, 90.0)),
)
POWER_SENSOR = "TotalPower"
SENSOR_IDS = (POWER_SENSOR, *(temperature.id for temperature in TEMPERATURES))


@dataclass(frozen=True)
class Readings:
    watts: float
    capacity_watts: float
    """The most the model draws: its nominal power."""
    celsius: dict[str, float]
    """By sensor Id."""


def chassis_path(machine: str) -> str:
    return f"/redfish/v1/Chassis/{machine}"


def sensor_path(machine: str, sensor: str) -> str:
    return f"{chassis_path(machine)}/Sensors/{sensor}"


def health(reading: float, thresholds: tuple[float, float, float]) -> str:
    caution, critical, _ = thresholds
    return "Critical" if reading >= critical else "Warning" if reading >= caution else "OK"


async def readings(redfish: Redfish, machine: str) -> Readings:
    """The model applied to the machine's power state now."""
    power, inventory = await asyncio.gather(
        bus.request(redfish.nc, machine, subjects.POWER_GET, PowerQuery(), PowerStatus),
        bus.request(redfish.nc, machine, subjects.INVENTORY_GET, None, Inventory))
    model, on = inventory.environment, power.state == "On"
    return Readings(watts=model.power_watts if on else 0.0, capacity_watts=model.power_watts,
                    celsius={temperature.id: getattr(model, temperature.nominal if on else "intake_celsius")
                             for temperature in TEMPERATURES})


def sensor(machine: str, sensor_id: str, now: Readings) -> dict[str, Any]:
    """A Sensor resource (the power sensor or one of TEMPERATURES)."""
    body: dict[str, Any] = {"@odata.id": sensor_path(machine, sensor_id), "@odata.type": SENSOR_TYPE, "Id": sensor_id,
                            "Description": MODEL, "Implementation": "Synthesized"}
    if sensor_id == POWER_SENSOR:
        return {**body, "Name": "Chassis power", "ReadingType": "Power", "ReadingUnits": "W", "Reading": now.watts,
                "PhysicalContext": "Chassis", "Status": ENABLED}
    temperature = next(temperature for temperature in TEMPERATURES if temperature.id == sensor_id)
    reading = now.celsius[sensor_id]
    caution, critical, fatal = temperature.thresholds
    return {**body, "Name": temperature.name, "ReadingType": "Temperature", "ReadingUnits": "Cel", "Reading": reading,
            "PhysicalContext": temperature.context,
            "Thresholds": {"UpperCaution": {"Reading": caution}, "UpperCritical": {"Reading": critical},
                           "UpperFatal": {"Reading": fatal}},
            "Status": {"State": "Enabled", "Health": health(reading, temperature.thresholds)}}


def excerpt(machine: str, sensor_id: str, reading: float) -> dict[str, Any]:
    """A sensor excerpt (Sensor schema's Redfish.Excerpt properties): its reading and where it is from."""
    return {"DataSourceUri": sensor_path(machine, sensor_id), "Reading": reading}


def power(machine: str, now: Readings) -> dict[str, Any]:
    """The deprecated Power resource: one PowerControl, no power limit, no power supplies."""
    path = f"{chassis_path(machine)}/Power"
    return {
        "@odata.id": path, "@odata.type": "#Power.v1_7_3.Power", "Id": "Power", "Name": f"Power of {machine}",
        "Description": MODEL,
        "PowerControl": [{
            "@odata.id": f"{path}#/PowerControl/0", "MemberId": "0", "Name": "Chassis power",
            "PowerConsumedWatts": now.watts, "PowerCapacityWatts": now.capacity_watts,
            "PowerLimit": {"LimitInWatts": None, "LimitException": "NoAction"},  # no capping
            "PhysicalContext": "Chassis", "Status": ENABLED, "RelatedItem": [link(chassis_path(machine))]}],
        "PowerSupplies": [],
    }


def thermal(machine: str, now: Readings) -> dict[str, Any]:
    """The deprecated Thermal resource: the temperatures with their upper thresholds, no fans."""
    path = f"{chassis_path(machine)}/Thermal"
    temperatures = []
    for index, temperature in enumerate(TEMPERATURES):
        reading = now.celsius[temperature.id]
        caution, critical, fatal = temperature.thresholds
        temperatures.append({
            "@odata.id": f"{path}#/Temperatures/{index}", "MemberId": str(index), "Name": temperature.name,
            "ReadingCelsius": reading, "UpperThresholdNonCritical": caution, "UpperThresholdCritical": critical,
            "UpperThresholdFatal": fatal, "PhysicalContext": temperature.context,
            "Status": {"State": "Enabled", "Health": health(reading, temperature.thresholds)}})
    return {"@odata.id": path, "@odata.type": "#Thermal.v1_7_3.Thermal", "Id": "Thermal",
            "Name": f"Thermal of {machine}", "Description": MODEL, "Temperatures": temperatures, "Fans": []}


def thermal_metrics(machine: str, now: Readings) -> dict[str, Any]:
    return {
        "@odata.id": f"{chassis_path(machine)}/ThermalSubsystem/ThermalMetrics",
        "@odata.type": "#ThermalMetrics.v1_3_2.ThermalMetrics", "Id": "ThermalMetrics",
        "Name": f"Thermal metrics of {machine}",
        "TemperatureSummaryCelsius": {"Intake": excerpt(machine, "IntakeTemp", now.celsius["IntakeTemp"]),
                                      "Internal": excerpt(machine, "SystemBoardTemp", now.celsius["SystemBoardTemp"])},
        "TemperatureReadingsCelsius": [
            {**excerpt(machine, temperature.id, now.celsius[temperature.id]), "PhysicalContext": temperature.context}
            for temperature in TEMPERATURES],
    }


def register(app: FastAPI, redfish: Redfish) -> None:
    async def model(request: Request, machine: str) -> Readings:
        await redfish.login(request, machine)
        return await readings(redfish, machine)

    @app.get("/redfish/v1/Chassis/{machine}/Sensors")
    async def sensors(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        path = f"{chassis_path(machine)}/Sensors"
        return json_response(collection(path, "SensorCollection", f"Sensors of {machine}",
                                        [sensor_path(machine, sensor_id) for sensor_id in SENSOR_IDS]))

    @app.get("/redfish/v1/Chassis/{machine}/Sensors/{sensor_id}")
    async def sensor_of(request: Request, machine: str, sensor_id: str) -> Response:
        now = await model(request, machine)
        if sensor_id not in SENSOR_IDS:
            raise RedfishError(404, "ResourceNotFound", "Sensor", sensor_id)
        return json_response(sensor(machine, sensor_id, now))

    @app.get("/redfish/v1/Chassis/{machine}/PowerSubsystem")
    async def power_subsystem(request: Request, machine: str) -> Response:
        now = await model(request, machine)
        return json_response({
            "@odata.id": f"{chassis_path(machine)}/PowerSubsystem",
            "@odata.type": "#PowerSubsystem.v1_1_3.PowerSubsystem", "Id": "PowerSubsystem",
            "Name": f"Power subsystem of {machine}", "Description": MODEL,
            "CapacityWatts": now.capacity_watts, "Status": ENABLED})

    @app.get("/redfish/v1/Chassis/{machine}/ThermalSubsystem")
    async def thermal_subsystem(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        path = f"{chassis_path(machine)}/ThermalSubsystem"
        return json_response({
            "@odata.id": path, "@odata.type": "#ThermalSubsystem.v1_5_0.ThermalSubsystem", "Id": "ThermalSubsystem",
            "Name": f"Thermal subsystem of {machine}", "Description": MODEL, "Status": ENABLED,
            "ThermalMetrics": link(f"{path}/ThermalMetrics")})

    @app.get("/redfish/v1/Chassis/{machine}/ThermalSubsystem/ThermalMetrics")
    async def thermal_metrics_of(request: Request, machine: str) -> Response:
        return json_response(thermal_metrics(machine, await model(request, machine)))

    @app.get("/redfish/v1/Chassis/{machine}/EnvironmentMetrics")
    async def environment_metrics(request: Request, machine: str) -> Response:
        now = await model(request, machine)
        return json_response({
            "@odata.id": f"{chassis_path(machine)}/EnvironmentMetrics",
            "@odata.type": "#EnvironmentMetrics.v1_5_0.EnvironmentMetrics", "Id": "EnvironmentMetrics",
            "Name": f"Environment metrics of {machine}", "Description": MODEL,
            "PowerWatts": excerpt(machine, POWER_SENSOR, now.watts)})

    @app.get("/redfish/v1/Chassis/{machine}/Power")
    async def power_of(request: Request, machine: str) -> Response:
        return json_response(power(machine, await model(request, machine)))

    @app.get("/redfish/v1/Chassis/{machine}/Thermal")
    async def thermal_of(request: Request, machine: str) -> Response:
        return json_response(thermal(machine, await model(request, machine)))
