"""CertificateService: where the service's certificates are (the HTTPS certificate of each Manager's
NetworkProtocol)."""

from __future__ import annotations

from fastapi import FastAPI

from .resources import Redfish


def register(app: FastAPI, redfish: Redfish) -> None:
    pass
