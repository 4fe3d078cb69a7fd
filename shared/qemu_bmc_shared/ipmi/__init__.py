"""The transport-independent IPMI command layer (IPMI v2.0).

A registry maps (netfn, cmd) to a small async handler that declares its minimum privilege;
one module per netfn family fills it (``app``, ``chassis``, ``transport``, ``storage``; and
``watchdog``, the App netfn's watchdog timer commands), as OpenIPMI's lanserv splits bmc_app.c,
bmc_chassis.c, bmc_transport.c. Handlers reach the machine and the BMC state only through the
bus. Nothing here knows about RMCP, sessions or the VM wire: the front-ends frame requests,
build a :class:`Context` and call :func:`dispatch`.
"""

from .core import (
    Command,
    Completion,
    Context,
    IpmiError,
    NetFn,
    Privilege,
    Registry,
    Request,
    Response,
    registry,
)


def load() -> Registry:
    """The shared registry with every netfn module's commands registered."""
    from . import app, chassis, storage, transport, watchdog  # noqa: F401  (registration on import)

    return registry


__all__ = [
    "Command",
    "Completion",
    "Context",
    "IpmiError",
    "NetFn",
    "Privilege",
    "Registry",
    "Request",
    "Response",
    "load",
    "registry",
]
