"""Every NATS subject qemu-bmc uses, in one place.

Subjects carry the machine name as their second token: ``bmc.<machine>.<area>.<verb>``.
``docs/subjects.md`` documents each one; ``tests/test_docs.py`` keeps the two in step.
"""

from __future__ import annotations

import re

PREFIX = "bmc"

#: A machine name is one NATS subject token, a JetStream KV key segment and a file name.
MACHINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")

# Machine service (one endpoint per machine; requests for a machine nobody owns get
# "no responders", which bus.request turns into an unknown_machine error).
POWER_GET = "power.get"
POWER_SET = "power.set"
BOOT_GET = "boot.get"
BOOT_SET = "boot.set"
BOOT_OPTIONS = "boot.options"
MEDIA_GET = "media.get"
MEDIA_INSERT = "media.insert"
MEDIA_EJECT = "media.eject"
INVENTORY_GET = "inventory.get"
HARDWARE_GET = "hardware.get"
NIC_SET = "nic.set"
VOLUME_LIST = "volume.list"
VOLUME_CREATE = "volume.create"
VOLUME_DELETE = "volume.delete"
FIRMWARE_UPDATE = "firmware.update"
FIRMWARE_UPDATES = "firmware.updates"
SYSTEM_GET = "system.get"
WATCHDOG_GET = "watchdog.get"
WATCHDOG_SET = "watchdog.set"
WATCHDOG_RESET = "watchdog.reset"
WATCHDOG_PRETIMEOUT_CLEAR = "watchdog.pretimeout.clear"
CONSOLE_GET = "console.get"
CONSOLE_IN = "console.in"
#: Opens a graphical console stream: one connection to QEMU's VNC server (see kvm.py).
KVM_OPEN = "kvm.open"
DISPLAY_SCREENSHOT = "display.screenshot"
#: Per stream (``bmc.<machine>.kvm.input.<stream>``, see ``for_stream``): bytes to QEMU's VNC server.
KVM_INPUT = "kvm.input"
#: Per stream: the front-end's acknowledgements (flow control), keepalives and close.
KVM_ACK = "kvm.ack"

# VM-wire service: a managed machine's in-band IPMI, which the machine service carries over the
# bus (one endpoint per machine of the service's config, queue group: any replica answers).
VMWIRE_FRAME = "vmwire.frame"
VMWIRE_GREETING = "vmwire.greeting"

# State service (one wildcard endpoint each, queue group, for every machine).
USERS_LIST = "state.users.list"
USERS_GET = "state.users.get"
USERS_SET = "state.users.set"
USERS_ACCESS = "state.users.access"
USERS_PASSWORD = "state.users.password"
USERS_CHECK = "state.users.check"
USERS_CREDENTIALS = "state.users.credentials"
LOGIN_CHECK = "state.login.check"
LOGIN_RESULT = "state.login.result"
LOGIN_UNLOCK = "state.login.unlock"
ACCOUNT_POLICY_GET = "state.policy.get"
ACCOUNT_POLICY_SET = "state.policy.set"
CHANNEL_GET = "state.channel.get"
CHANNEL_SET = "state.channel.set"
LAN_GET = "state.lan.get"
LAN_SET = "state.lan.set"
SOL_GET = "state.sol.get"
SOL_SET = "state.sol.set"
KG_GET = "state.kg.get"
KG_SET = "state.kg.set"
CHASSIS_GET = "state.chassis.get"
CHASSIS_SET = "state.chassis.set"
MANAGER_GET = "state.manager.get"
MANAGER_SET = "state.manager.set"
SEL_GET = "state.sel.get"
SEL_ADD = "state.sel.add"
SEL_CLEAR = "state.sel.clear"

# Events published by the machine service.
EVENT_POWER = "event.power"
EVENT_BOOT = "event.boot"
EVENT_MEDIA = "event.media"
EVENT_WATCHDOG = "event.watchdog"
#: The machine's serial console output, as it comes (not an "event." subject: a byte stream).
CONSOLE_OUT = "console.out"
# Published by the state service after each change of a machine's state.
EVENT_STATE = "event.state"

MACHINE_ENDPOINTS = (POWER_GET, POWER_SET, BOOT_GET, BOOT_SET, BOOT_OPTIONS, MEDIA_GET, MEDIA_INSERT, MEDIA_EJECT,
                     INVENTORY_GET, HARDWARE_GET, NIC_SET, VOLUME_LIST, VOLUME_CREATE, VOLUME_DELETE,
                     FIRMWARE_UPDATE, FIRMWARE_UPDATES, SYSTEM_GET, WATCHDOG_GET, WATCHDOG_SET,
                     WATCHDOG_RESET, WATCHDOG_PRETIMEOUT_CLEAR, CONSOLE_GET, CONSOLE_IN, KVM_OPEN,
                     DISPLAY_SCREENSHOT)
STATE_ENDPOINTS = (USERS_LIST, USERS_GET, USERS_SET, USERS_ACCESS, USERS_PASSWORD, USERS_CHECK,
                   USERS_CREDENTIALS, LOGIN_CHECK, LOGIN_RESULT, LOGIN_UNLOCK, ACCOUNT_POLICY_GET, ACCOUNT_POLICY_SET,
                   CHANNEL_GET, CHANNEL_SET, LAN_GET, LAN_SET, SOL_GET, SOL_SET,
                   KG_GET, KG_SET, CHASSIS_GET, CHASSIS_SET, MANAGER_GET, MANAGER_SET, SEL_GET, SEL_ADD, SEL_CLEAR)
VMWIRE_ENDPOINTS = (VMWIRE_FRAME, VMWIRE_GREETING)
EVENTS = (EVENT_POWER, EVENT_BOOT, EVENT_MEDIA, EVENT_WATCHDOG, EVENT_STATE, CONSOLE_OUT)


def for_machine(machine: str, operation: str) -> str:
    """The subject of ``operation`` (one of the constants above) for one machine."""
    return f"{PREFIX}.{machine}.{operation}"


def for_stream(machine: str, operation: str, stream: str) -> str:
    """The subject of one graphical console stream's ``operation`` (KVM_INPUT, KVM_ACK)."""
    return f"{PREFIX}.{machine}.{operation}.{stream}"


def any_machine(operation: str) -> str:
    """The wildcard subject matching ``operation`` for every machine."""
    return f"{PREFIX}.*.{operation}"


def machine_of(subject: str) -> str:
    """The machine token of a ``bmc.<machine>.…`` subject."""
    parts = subject.split(".", 2)
    if len(parts) < 3 or parts[0] != PREFIX:
        raise ValueError(f"not a qemu-bmc subject: {subject!r}")
    return parts[1]


def valid_machine_name(name: str) -> bool:
    return bool(MACHINE_NAME.match(name))
