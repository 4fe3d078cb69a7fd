"""qemu-bmc Redfish service: one HTTPS endpoint for every machine on the bus (DMTF Redfish)."""

__version__ = "0.1.0"
