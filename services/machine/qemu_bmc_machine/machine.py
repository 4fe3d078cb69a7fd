"""One machine: its QEMU (launched or attached), QMP connection, power, boot override and media."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate
from qemu_bmc_shared import launcher, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import VmConfig
from qemu_bmc_shared.launcher import LaunchError, RuntimeFiles
from qemu_bmc_shared.messages import (
    BootEvent,
    BootOption,
    BootOptions,
    BootOverride,
    BootOverrideUpdate,
    EnvironmentModel,
    Inventory,
    MediaInsert,
    MediaStatus,
    PowerAction,
    PowerEvent,
    PowerState,
    PowerStatus,
)

from . import boot, host_nics
from .console import Console
from .firmware import SystemFirmware
from .hardware import HardwareInventory
from .inband import InbandLink
from .volumes import Volumes
from .watchdog import Watchdog

log = logging.getLogger(__name__)

Publisher = Callable[[str, str, msgspec.Struct], Awaitable[None]]

#: QEMU run states in which the machine counts as powered off.
OFF_RUN_STATES = {"shutdown", "paused", "prelaunch", "not-running", "disconnected"}
#: QMP events after which the run state is read again (every run-state change emits one of them).
LIFECYCLE_EVENTS = {"SHUTDOWN", "RESET", "STOP", "RESUME", "POWERDOWN", "GUEST_PANICKED", "SUSPEND", "WAKEUP"}
QMP_TIMEOUT = 10.0
RECONNECT_INTERVAL = 0.25
QUIT_TIMEOUT = 5.0
LAUNCH_TIMEOUT = 20.0
#: SeaBIOS resets the machine once more by itself (~0.1 s) after a warm reset, before its POST:
#: a guest reset this soon after a reset belongs to the same boot.
FIRMWARE_REBOOT_WINDOW = 2.0


class Machine:
    """A QEMU machine behind QMP. Power actions are serialised; status is kept current from QMP
    events and from the process itself, and read fresh from QEMU on request."""

    def __init__(self, vm: VmConfig, publish: Publisher,
                 restore_policy: Callable[[], Awaitable[int | None]] | None = None) -> None:
        """``restore_policy``: reads the power restore policy (None: not known)."""
        self.vm = vm
        self._restore_policy = restore_policy
        self.name = vm.name
        self.files = RuntimeFiles(vm.runtime_dir)
        self._publish = publish
        self._qmp: QMPClient | None = None
        self._run_state = "not-running" if vm.mode == "managed" else "disconnected"
        self._pid: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._power_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._devices: list[boot.BootDevice] = []
        self._base_order: dict[str, int] = {}
        self._options = self._load_options()
        """The boot options (UefiTarget, UefiBootNext) of the last QEMU seen, and their devices' paths."""
        self._reboot_intercepted = False
        self._pflash = False
        self._next_boot_stale = False
        """What QEMU would do at its next reset (boot order, launch profile) is not what the next boot needs."""
        self._reserved: set[int] = set()
        """Boot indexes held by boot entries that are not devices (see boot.reserved_indexes)."""
        self._launched: launcher.LaunchProfile | None = None
        """The launch profile of the running QEMU (managed mode)."""
        self._between_boots = False
        """QEMU is reset or launched again for the next boot of a machine that is on: it stays On."""
        self._graceful: asyncio.Task[None] | None = None
        self._powered_off = asyncio.Event()
        self._boots = 0
        self._last_reset = -FIRMWARE_REBOOT_WINDOW
        self._override = self._load_override()
        self._media_image: str | None = self._load_media_image()
        self._closing = False
        self.hardware = HardwareInventory(self)
        self.system_firmware = SystemFirmware(self)
        self.volumes = Volumes(self)
        self.watchdog = Watchdog(self, publish)
        if vm.mode == "managed":
            self.console: Console | None = Console(self.name, self.files.serial, publish,
                                                   live=lambda: self._pid is not None)
        else:
            self.console = Console(self.name, vm.serial, publish, socket=True) if vm.serial else None
        self.inband: InbandLink | None = None
        """The in-band IPMI link to QEMU's ipmi-bmc-extern chardev, when the launcher gives the
        machine one (set by the service, which has the bus connection, before start)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.files.prepare()
        if self.vm.mode == "managed":
            self._pid = launcher.running_pid(self.files)
            if self._pid:
                log.info("%s: adopting running QEMU pid %d", self.name, self._pid)
                self._launched = launcher.load_profile(self.files) or launcher.LaunchProfile(
                    launcher.native_firmware(self.vm.argv))
            else:
                await host_nics.detach(self.vm)  # what a crash left of its host interfaces
        self._spawn(self._connection_loop())
        if self.console is not None:
            self._spawn(self.console.run())
        if self.inband is not None:
            self._spawn(self.inband.run())
        if self.vm.autostart and self.vm.mode == "managed":
            self._spawn(self._autostart())
        elif self.vm.mode == "managed" and not self._pid and self._restore_policy is not None:
            self._spawn(self._restore_power(self._restore_policy))

    async def _autostart(self) -> None:
        if self._pid:
            await asyncio.wait_for(self._connected.wait(), LAUNCH_TIMEOUT)
        try:
            await self.power("on")
        except BusError as exc:
            log.error("%s: autostart failed: %s", self.name, exc)

    async def _restore_power(self, restore_policy: Callable[[], Awaitable[int | None]]) -> None:
        """Power restore policy (IPMI v2.0 §28.8) when the machine service starts and the machine's
        QEMU is not running, as after the host lost power: 2 power on, 1 back to the power state it
        last had, 0 stay off."""
        policy = await restore_policy()
        if policy is None or self._pid:
            return
        previous = self.files.power.read_text().strip() if self.files.power.exists() else "Off"
        if policy == 2 or (policy == 1 and previous == "On"):
            log.info("%s: power restore policy %d: powering on", self.name, policy)
            try:
                await self.power("on")
            except BusError as exc:
                log.error("%s: power restore failed: %s", self.name, exc)
        else:
            self.files.power.write_text("Off")

    async def close(self, stop_vm: bool = False) -> None:
        self._closing = True
        self.watchdog.stop()
        if stop_vm and self.vm.mode == "managed" and self._pid:
            with contextlib.suppress(Exception):
                await self._hard_off()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ QMP connection

    @property
    def qmp_path(self) -> Path:
        return self.files.qmp if self.vm.mode == "managed" else Path(self.vm.qmp or "")

    async def _connection_loop(self) -> None:
        """Keep a QMP connection while QEMU is there; notice at once when it goes."""
        while not self._closing:
            if self.vm.mode == "managed" and not self._pid:
                self._wake.clear()
                await self._wake.wait()
                continue
            qmp = QMPClient(self.name)
            try:
                await asyncio.wait_for(qmp.connect(str(self.qmp_path)), QMP_TIMEOUT)
            except (TimeoutError, QMPError, OSError):
                with contextlib.suppress(Exception):
                    await qmp.disconnect()
                if self.vm.mode == "managed" and self._pid and not launcher.pid_alive(self._pid):
                    await self._process_gone()
                await asyncio.sleep(RECONNECT_INTERVAL)
                continue
            try:
                await self._session(qmp)
            except (TimeoutError, QMPError, OSError, EOFError) as exc:  # QEMU went, or is going
                if not self._closing:
                    log.warning("%s: QMP session ended: %s", self.name, str(exc) or type(exc).__name__)
            except Exception:
                log.exception("%s: QMP session failed", self.name)
            finally:
                self._qmp = None
                self._connected.clear()
                with contextlib.suppress(Exception):
                    await qmp.disconnect()
            if self.vm.mode == "attach":
                await self._set_run_state("disconnected", "disconnected")
            elif not self._pid or await launcher.wait_exit(self._pid, 0.5):
                await self._process_gone()
            # else: QEMU lives on without its QMP connection; reconnect

    async def _session(self, qmp: QMPClient) -> None:
        events = self._spawn(self._consume_events(qmp))
        self._qmp = qmp
        self.hardware.forget()
        try:
            self._devices = await boot.discover(self._execute)
            self._base_order = await boot.base_order(self._execute, self._devices)
            await self._read_options()
            self._reboot_intercepted = False
            self._pflash = any(block["device"].startswith("pflash") for block in await self._execute("query-block"))
            self._reserved = boot.reserved_indexes(self.vm.argv, self._launched is None or self._launched.kernel) \
                if self.vm.mode == "managed" else set()
            if not self.files.boot.exists():
                self._override = BootOverride(mode=self.firmware)  # type: ignore[arg-type]
            running = (await self._execute("query-status"))["status"] not in OFF_RUN_STATES
            current = await boot.bootindexes(self._execute, self._devices)
            self._next_boot_stale = running and (current != self._desired_order() or self._relaunch_needed())
            if self._next_boot_stale:
                await self._intercept_reboot(True)  # the running boot used an order that is now stale
            else:
                await self._apply_order_logged()
            if self.vm.mode == "managed" and self._media_image:
                await self._reinsert_media()
            await self.hardware.connected()
            self._connected.set()
            self._spawn(self.volumes.connected())
            await self._refresh_run_state("connected")
            log.info("%s: QMP connected (%s), bootable devices: %s", self.name, self._run_state,
                     ", ".join(f"{d.type}={d.kind}" for d in self._devices) or "none")
            while qmp.runstate == Runstate.RUNNING:
                await qmp.runstate_changed()
        finally:
            events.cancel()

    async def _consume_events(self, qmp: QMPClient) -> None:
        async for event in qmp.events:
            name = event["event"]
            if name == "SHUTDOWN" and event.get("data", {}).get("reason") == "guest-reset" \
                    and self._reboot_intercepted:
                self._between_boots = True
                self._spawn(self._guest_rebooted())  # not here: a relaunch ends this QMP session
                continue
            if name in ("DEVICE_ADDED", "DEVICE_DELETED"):
                self.hardware.forget()
            if name == "RESET":
                await self._reset_seen(event.get("data", {}).get("reason", ""))
            if name in LIFECYCLE_EVENTS:
                await self._refresh_run_state(name)

    async def _process_gone(self) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                await self._process.wait()
        self._process = None
        self._pid = None
        self.files.pid.unlink(missing_ok=True)
        await host_nics.detach(self.vm)
        await self._set_run_state("not-running", "exited")

    async def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        qmp = self._qmp
        if qmp is None:
            raise BusError("invalid_state", f"machine {self.name} has no QEMU connected")
        try:
            async with asyncio.timeout(QMP_TIMEOUT):
                return await qmp.execute(command, arguments)
        except ExecuteError as exc:
            raise BusError("qemu_error", f"QEMU refused {command}: {exc}") from None
        except (TimeoutError, QMPError, OSError) as exc:
            raise BusError("unavailable", f"QMP {command} failed: {type(exc).__name__} {exc}") from None

    # ------------------------------------------------------------------ power

    async def _refresh_run_state(self, cause: str) -> None:
        try:
            status = await self._execute("query-status")
        except BusError:
            return
        await self._set_run_state(status["status"], cause)

    async def _set_run_state(self, run_state: str, cause: str) -> None:
        before = self.power_state
        self._run_state = run_state
        if self.power_state == "Off":
            self._powered_off.set()
        else:
            self._powered_off.clear()
        if before != self.power_state and self.vm.mode == "managed" and not self._closing:
            self.files.power.write_text(self.power_state)
        if before != self.power_state or cause == "RESET":
            self.watchdog.power_changed(self.power_state, cause)
        if cause in LIFECYCLE_EVENTS or cause == "launched" or before != self.power_state:
            await self._publish(self.name, subjects.EVENT_POWER, PowerEvent(
                machine=self.name, state=self.power_state, cause=cause, timestamp=time.time()))

    @property
    def power_state(self) -> PowerState:
        return "On" if self._between_boots or self._run_state not in OFF_RUN_STATES else "Off"

    def status(self) -> PowerStatus:
        return PowerStatus(machine=self.name, state=self.power_state, run_state=self._run_state,
                           mode=self.vm.mode, pid=self._pid)

    async def power_status(self) -> PowerStatus:
        if self._qmp is not None:
            await self._refresh_run_state("query")
        return self.status()

    async def power(self, action: PowerAction, on_if_off: bool = False) -> PowerStatus:
        """A power action (see messages.PowerRequest); it cancels a graceful shutdown or restart
        still waiting for the guest."""
        self._cancel_graceful()
        async with self._power_lock:
            if action == "on":
                if self.power_state == "Off":
                    await self._boot()
            elif action == "off":
                await self._hard_off()
            elif action in ("soft", "graceful_restart"):
                if self.power_state == "On":
                    await self._execute("system_powerdown")
                    self._graceful = self._spawn(self._graceful_wait(restart=action == "graceful_restart"))
                elif action == "graceful_restart":
                    await self._boot()
            elif action == "cycle":
                if self.power_state == "On":
                    await self._hard_off()
                await self._boot()
            elif self.power_state == "Off" and not (action == "reset" and on_if_off):
                raise BusError("invalid_state", f"machine {self.name} is off; {action} needs it on")
            elif action == "reset":
                await self._boot()
            else:
                await self._execute("inject-nmi")
            await self.power_status()
            return self.status()

    # ------------------------------------------------------------------ graceful shutdown and restart

    def _cancel_graceful(self) -> None:
        if self._graceful is not None and self._graceful is not asyncio.current_task():
            self._graceful.cancel()
        self._graceful = None

    async def _graceful_wait(self, restart: bool) -> None:
        """After the ACPI power button: wait for the guest to shut down, for the graceful time-out
        at most; then a restart powers on again (or, the guest having ignored the button, resets
        the machine), a shutdown gives up. Cancelled by any later power request; lives in this
        process only, so a restart of the service never brings a surprise power-on."""
        try:
            await asyncio.wait_for(self._powered_off.wait(), self.vm.graceful_timeout)
        except TimeoutError:
            log.warning("%s: the guest ignored the power button for %g s: %s", self.name, self.vm.graceful_timeout,
                        "resetting it" if restart else "it stays on")
            await self._publish(self.name, subjects.EVENT_POWER, PowerEvent(
                machine=self.name, state=self.power_state, cause="graceful-timeout", timestamp=time.time()))
            if not restart:
                self._graceful = None
                return
        self._graceful = None  # from here on it is done, whatever comes: not cancelled half-way
        if restart:
            async with self._power_lock:
                try:
                    await self._boot()
                except BusError as exc:
                    log.error("%s: graceful restart could not start the next boot: %s", self.name, exc)

    # ------------------------------------------------------------------ boots and launches

    def _next_profile(self) -> launcher.LaunchProfile:
        """What the next boot needs QEMU launched with: the boot mode of the override, with the
        firmware an update installed for it, and QEMU's direct-boot kernel unless an override sends
        the boot to a device the machine has."""
        override = self._override
        mode = override.mode if override.mode in self.firmwares else self.native_firmware
        # devices not known yet (QEMU never connected): the override is taken to have one to go to
        to_device = override.enabled != "Disabled" and override.target not in ("None", "BiosSetup") and (
            not self._devices or bool(self._override_devices()))
        return launcher.LaunchProfile(firmware=mode,  # type: ignore[arg-type]
                                      kernel=not (to_device and launcher.has_kernel(self.vm)),
                                      firmware_image=self.system_firmware.images.get(mode),
                                      volumes=self.volumes.next_disks())

    def _relaunch_needed(self) -> bool:
        return self.vm.mode == "managed" and self._launched is not None and self._launched != self._next_profile()

    async def launch_changed(self, *, firmware: bool = False) -> bool:
        """What QEMU is launched with changed (an update installed or removed the ``firmware`` of a
        boot mode, a volume was made or is to be deleted): the next boot, the guest's own reboot
        included, launches QEMU with it. True when the running QEMU has the old until then."""
        if firmware:
            self.hardware.forget()
        if not self._relaunch_needed():
            return False
        if self._qmp is not None:
            self._next_boot_stale = True
            with contextlib.suppress(BusError):  # QEMU went away: its next launch has the change anyway
                await self._intercept_reboot(True)
        return True

    async def _boot(self) -> None:
        """Start the machine's next boot: launch QEMU (managed, no process), or launch it again when
        the next boot needs another launch profile (a machine that is on stays On meanwhile), or
        else set the boot order and reset; then run. Called with the power lock held."""
        relaunch = self.vm.mode == "managed" and self._pid is not None and self._relaunch_needed()
        held = self._between_boots
        self._between_boots = held or (relaunch and self.power_state == "On")
        try:
            if self.vm.mode == "managed" and (not self._pid or relaunch):
                if self._pid:
                    await self._hard_off()
                await self._launch_next()
                if self.console is not None:  # QEMU waits (-S): connected before the first byte, nothing lost
                    await self.console.attached(1.0)
                if self.inband is not None:  # and the guest's IPMI driver finds its BMC from the start
                    await self.inband.attached(1.0)
            await self._reset_with_boot_order()
            await self._execute("cont")
        finally:
            self._between_boots = held

    async def _guest_rebooted(self) -> None:
        """The guest rebooted while its reboot was intercepted (QEMU stopped instead): start the next
        boot as it must be. The machine stays On from the reboot on."""
        try:
            async with self._power_lock:
                if self._reboot_intercepted and self._qmp is not None:
                    try:
                        await self._boot()
                    except BusError as exc:
                        log.error("%s: could not start the boot after the guest's reboot: %s", self.name, exc)
        finally:
            self._between_boots = False

    async def _launch_next(self) -> None:
        """Launch QEMU for the next boot; when it does not start with the volume changes that boot
        was to apply, those fail (their tasks say why) and it is launched without them."""
        profile = self._next_profile()
        try:
            await self._launch(profile)
        except BusError as exc:
            if not self.volumes.launch_failed(profile, exc.message):
                raise
            log.error("%s: QEMU did not start with the volume changes, launching it without them: %s",
                      self.name, exc.message)
            profile = self._next_profile()
            await self._launch(profile)
        self.volumes.applied(profile)

    async def _launch(self, profile: launcher.LaunchProfile) -> None:
        try:
            nics = await host_nics.attach(self.vm)
        except host_nics.HostNicError as exc:
            raise BusError("qemu_error", f"cannot launch QEMU for {self.name}: {exc}") from None
        try:
            self._process = await launcher.launch(self.vm, self.files, profile, nics)
        except (LaunchError, OSError) as exc:
            await host_nics.detach(self.vm)
            raise BusError("qemu_error", f"cannot launch QEMU for {self.name}: {exc}") from None
        finally:
            host_nics.close(nics)
        self._launched = profile
        self._pid = self._process.pid
        self._wake.set()
        try:
            await self._wait_connected(self._process)
        except LaunchError as exc:
            self._process, self._pid = None, None
            await host_nics.detach(self.vm)
            raise BusError("qemu_error", f"{self.name}: {exc}") from None
        await self._set_run_state(self._run_state, "launched")

    async def _wait_connected(self, process: asyncio.subprocess.Process) -> None:
        exited = asyncio.ensure_future(process.wait())
        connected = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait({exited, connected}, timeout=LAUNCH_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
        if not self._connected.is_set():
            if not exited.done():
                exited.cancel()
                await launcher.terminate(process.pid)
            raise launcher.launch_failure(self.files, process.returncode)

    async def _hard_off(self) -> None:
        if self.vm.mode == "attach":
            if self.power_state == "On":
                await self._execute("stop")
            return
        pid = self._pid
        if not pid:
            return
        with contextlib.suppress(BusError):
            await self._execute("quit")
        if not await launcher.wait_exit(pid, QUIT_TIMEOUT):
            await launcher.terminate(pid)
        await self._process_gone()
        self._launched = None

    # ------------------------------------------------------------------ boot override

    def _load_override(self) -> BootOverride:
        saved = launcher.saved_override(self.files)
        return saved if saved is not None else BootOverride(mode=self.native_firmware)  # type: ignore[arg-type]

    def _save_override(self) -> None:
        self.files.boot.write_bytes(msgspec.json.encode(self._override))

    @property
    def native_firmware(self) -> str:
        """The firmware of the operator's command line (managed), or of the QEMU attached to."""
        if self.vm.mode == "managed":
            return launcher.native_firmware(self.vm.argv)
        return "UEFI" if self._pflash else "Legacy"

    @property
    def firmwares(self) -> list[str]:
        """The boot modes the machine can be switched to (attach mode: its own only)."""
        return list(launcher.firmwares(self.vm)) if self.vm.mode == "managed" else [self.native_firmware]

    @property
    def firmware(self) -> str:
        """The firmware the machine runs, or will run at its next power-on."""
        if self.vm.mode == "attach":
            return self.native_firmware
        return (self._launched or self._next_profile()).firmware

    def _override_devices(self) -> list[boot.BootDevice]:
        """The devices the override puts first: those of its target's kind, or its boot option's."""
        override = self._override
        if override.enabled == "Disabled":
            return []
        if override.target in ("UefiTarget", "UefiBootNext"):
            option = self._option_of(override)
            return [device for device in self._devices if option is not None and device.path == option[1]]
        return [device for device in self._devices if device.kind == override.target]

    def _desired_order(self) -> dict[str, int]:
        return boot.override_order(self._devices, self._base_order, self._override_devices(), self._reserved)

    # ------------------------------------------------------------------ boot options

    def _load_options(self) -> list[tuple[BootOption, str]]:
        try:
            saved = msgspec.json.decode(self.files.boot_options.read_bytes(), type=list[tuple[BootOption, str]])
        except (OSError, msgspec.DecodeError):
            return []
        return saved

    async def _read_options(self) -> None:
        """The boot options of the connected QEMU: its bootable devices in the order of their QOM
        paths (stable for a command line), kept in the runtime directory for while it is off."""
        options = []
        for index, device in enumerate(sorted(self._devices, key=lambda device: device.path)):
            option = BootOption(reference=boot.option_reference(index), kind=device.kind,
                                name=boot.device_name(device), uefi_path=await boot.uefi_device_path(
                                    self._execute, device))
            options.append((option, device.path))
        self._options = options
        self.files.boot_options.write_bytes(msgspec.json.encode(options))

    def boot_options(self) -> BootOptions:
        by_path = {path: option.reference for option, path in self._options}
        order = sorted((index, path) for path, index in self._base_order.items() if index >= 0 and path in by_path)
        return BootOptions(options=[option for option, _ in self._options], order=[by_path[path] for _, path in order])

    def _option_of(self, override: BootOverride) -> tuple[BootOption, str] | None:
        """The boot option (and its device's path) of a UefiTarget or UefiBootNext override."""
        for option, path in self._options:
            if (override.target == "UefiTarget" and option.uefi_path == override.uefi_target) or (
                    override.target == "UefiBootNext" and option.reference == override.boot_next):
                return option, path
        return None

    async def _apply_order(self) -> None:
        """Set the boot order the next boot needs, reserving the indexes QEMU says other boot
        entries hold; on any other failure, the base order back (as far as QEMU takes it)."""
        for _ in range(8):
            try:
                await boot.apply_order(self._execute, self._devices, self._desired_order())
                return
            except boot.IndexTaken as taken:
                log.info("%s: boot index %d is held by a boot entry that is not a device", self.name, taken.index)
                self._reserved.add(taken.index)
            except BusError:
                with contextlib.suppress(BusError, boot.IndexTaken):
                    await boot.apply_order(self._execute, self._devices, self._base_order)
                raise
        raise BusError("qemu_error", f"machine {self.name}: no free boot index for the override")

    async def _apply_order_logged(self) -> None:
        """_apply_order where nothing may stop what goes on (a QMP session, a power-on)."""
        try:
            await self._apply_order()
        except BusError as exc:
            log.error("%s: boot order not set, the machine boots in its own order: %s", self.name, exc.message)

    def boot_override(self) -> BootOverride:
        return self._override

    async def set_boot_override(self, update: BootOverrideUpdate) -> BootOverride:
        """Store the override (mode: a boot mode the machine can be switched to) and prepare the
        next boot: the order in QEMU now when the running QEMU can boot it, else the guest's next
        reboot is intercepted so that the service starts that boot (launching QEMU again)."""
        changes = {key: value for key, value in msgspec.structs.asdict(update).items() if value is not msgspec.UNSET}
        new = msgspec.structs.replace(self._override, **changes)
        if new.mode not in self.firmwares:
            raise BusError("invalid_state", f"machine {self.name} cannot boot in {new.mode} mode (it can in: "
                           f"{', '.join(self.firmwares)}; UEFI needs OVMF, Legacy SeaBIOS)")
        if new.target == "None":
            new = msgspec.structs.replace(new, enabled="Disabled")
        alias = None
        if new.target in ("UefiTarget", "UefiBootNext") and new.enabled != "Disabled":
            option = self._option_of(new)
            if option is None:
                what = (f"UEFI device path {new.uefi_target!r}" if new.target == "UefiTarget"
                        else f"boot option {new.boot_next!r}")
                raise BusError("bad_request", f"machine {self.name} has no {what} (see its boot options)")
            if new.target == "UefiBootNext" and new.enabled == "Continuous":
                raise BusError("bad_request", "UefiBootNext is a one-time boot (UEFI BootNext): Once only")
            alias = option[0].kind
        new = msgspec.structs.replace(new, alias=alias)
        previous, self._override = self._override, new
        if self._qmp is not None:
            try:
                if self._relaunch_needed():
                    self._next_boot_stale = True
                    await self._intercept_reboot(True)
                else:
                    # the firmware of the running boot has read its order already: this is for the next
                    await self._apply_order()
            except BusError:
                self._override = previous
                raise
        self._save_override()
        if new.mode != previous.mode:
            self.hardware.forget()  # the firmware of the next boot changed: what it is, read again
        await self._publish(self.name, subjects.EVENT_BOOT,
                            BootEvent(machine=self.name, override=new, cause="set", timestamp=time.time()))
        return new

    async def _reset_with_boot_order(self) -> None:
        """system_reset, with the boot order of the boot that follows set before it.

        The firmware reads the order from QEMU while it starts, so the order is never changed
        while a boot may be under way: only here, just before a reset, and at launch. An order that
        cannot be set never stops the boot.
        """
        if self._qmp is not None:
            await self._apply_order_logged()
        self._next_boot_stale = False
        await self._intercept_reboot(False)
        await self._execute("system_reset")

    async def _intercept_reboot(self, intercept: bool) -> None:
        """While the order set in QEMU is not the one the next boot must use, a reboot by the guest
        itself stops the machine (``set-action reboot=shutdown``) so that the service can set the
        order, reset and continue."""
        if intercept == self._reboot_intercepted:
            return
        shutdown = "pause" if intercept or self.vm.mode == "managed" else "poweroff"
        await self._execute("set-action", {"reboot": "shutdown" if intercept else "reset", "shutdown": shutdown})
        self._reboot_intercepted = intercept

    async def _reset_seen(self, reason: str) -> None:
        """A RESET event: a boot starts, unless it is the firmware's own reboot of a boot that just
        started. A Once override is now used; while the order in QEMU is not the one the next
        boot must use, the guest's next reboot is intercepted, but not before the firmware of
        this boot is past its own reboot."""
        now = asyncio.get_running_loop().time()
        if reason == "guest-reset" and now - self._last_reset < FIRMWARE_REBOOT_WINDOW:
            return
        self._last_reset = now
        self._boots += 1
        await self._boot_used()
        if self._next_boot_stale:
            await self._intercept_reboot(False)
            self._spawn(self._intercept_when_booted(self._boots))

    async def _intercept_when_booted(self, boot_number: int) -> None:
        await asyncio.sleep(FIRMWARE_REBOOT_WINDOW)
        if self._next_boot_stale and self._boots == boot_number and self._qmp is not None:
            with contextlib.suppress(BusError):
                await self._intercept_reboot(True)

    async def _boot_used(self) -> None:
        """A Once override is used by the boot that starts; the order stays for this boot."""
        if self._override.enabled != "Once":
            return
        self._override = msgspec.structs.replace(self._override, target="None", enabled="Disabled", alias=None)
        self._save_override()
        self._next_boot_stale = True
        log.info("%s: one-time boot override used", self.name)
        await self._publish(self.name, subjects.EVENT_BOOT, BootEvent(
            machine=self.name, override=self._override, cause="used", timestamp=time.time()))

    # ------------------------------------------------------------------ serial console

    async def send_break(self) -> None:
        """A break condition on the serial port (QMP ``chardev-send-break``): the launcher's
        serial chardev, or in attach mode the chardev listening on the ``serial`` socket."""
        chardev = launcher.SERIAL_CHARDEV
        if self.vm.mode != "managed":
            chardevs = await self._execute("query-chardev")
            chardev = next((entry["label"] for entry in chardevs if str(self.vm.serial) in entry["filename"]), "")
            if not chardev:
                raise BusError("not_found", f"machine {self.name}: no QEMU chardev on {self.vm.serial}")
        await self._execute("chardev-send-break", {"id": chardev})

    # ------------------------------------------------------------------ virtual media

    @property
    def media_device(self) -> str:
        device = self.vm.media_device or (launcher.CD_DEVICE if self.vm.mode == "managed" else None)
        if device is None:
            raise BusError("not_found", f"machine {self.name} has no CD drive for virtual media "
                           "(set media_device in its config)")
        return device

    def _load_media_image(self) -> str | None:
        try:
            return self.files.media.read_text().strip() or None
        except OSError:
            return None

    async def media_status(self) -> MediaStatus:
        device = self.media_device
        if self._qmp is None:
            # A managed machine's BMC keeps the media while QEMU is not running; it goes in at launch.
            held = self.vm.mode == "managed" and self._media_image is not None
            return MediaStatus(machine=self.name, device=device, inserted=held, image=self._media_image)
        for block in await self._execute("query-block"):
            if block.get("qdev") in (device, f"/machine/peripheral/{device}") or block.get("device") == device:
                inserted = block.get("inserted")
                if not inserted:
                    return MediaStatus(machine=self.name, device=device, inserted=False)
                return MediaStatus(machine=self.name, device=device, inserted=True,
                                   image=self._media_image or inserted.get("file"),
                                   write_protected=bool(inserted.get("ro", True)))
        raise BusError("not_found", f"machine {self.name} has no block device {device!r}")

    async def insert_media(self, request: MediaInsert) -> MediaStatus:
        device = self.media_device
        image = request.image
        if "://" in image:
            if not image.startswith(("http://", "https://")):
                raise BusError("bad_request", f"media image must be a local path or an http(s) URL: {image!r}")
        elif not Path(image).is_file():
            raise BusError("bad_request", f"no such image file: {image}")
        else:
            image = str(Path(image).absolute())
        if self._qmp is not None or self.vm.mode == "attach":
            await self._change_medium(device, image)
        self._media_image = image
        self.files.media.write_text(image)
        return await self._media_changed()

    async def _change_medium(self, device: str, image: str) -> None:
        await self._execute("blockdev-change-medium",
                            {"id": device, "filename": image, "format": "raw", "read-only-mode": "read-only"})

    async def _reinsert_media(self) -> None:
        """Put the media the BMC holds into a freshly launched QEMU; forget it if QEMU refuses."""
        image = self._media_image or ""
        try:
            await self._change_medium(self.media_device, image)
        except BusError as exc:
            log.error("%s: could not re-insert virtual media %s: %s", self.name, image, exc.message)
            self._media_image = None
            self.files.media.unlink(missing_ok=True)
            await self._media_changed()

    async def eject_media(self) -> MediaStatus:
        device = self.media_device
        if self._qmp is not None or self.vm.mode == "attach":
            await self._execute("blockdev-open-tray", {"id": device, "force": True})
            await self._execute("blockdev-remove-medium", {"id": device})
            await self._execute("blockdev-close-tray", {"id": device})
        self._media_image = None
        self.files.media.unlink(missing_ok=True)
        return await self._media_changed()

    async def _media_changed(self) -> MediaStatus:
        status = await self.media_status()
        await self._publish(self.name, subjects.EVENT_MEDIA, status)
        return status

    # ------------------------------------------------------------------ inventory

    async def inventory(self) -> Inventory:
        argv = self.vm.argv
        if self._qmp is None and not (self.vm.mode == "attach" and self.hardware.known()):
            uuid = launcher.machine_uuid(self.vm, self.files) if self.vm.mode == "managed" else (
                self.vm.uuid or "00000000-0000-0000-0000-000000000000")
            return Inventory(machine=self.name, uuid=uuid, memory_mib=launcher.configured_memory_mib(argv),
                             cpus=launcher.configured_cpus(argv), macs=launcher.configured_macs(argv),
                             firmware=self.firmware, firmwares=self.firmwares,  # type: ignore[arg-type]
                             **self._identity())
        hardware = await self.hardware.read()  # what QEMU has, read once per QEMU instance
        return Inventory(machine=self.name, uuid=await self.hardware.uuid(),
                         memory_mib=sum(module.size_mib for module in hardware.memory),
                         cpus=sum(cpu.threads for cpu in hardware.processors), macs=[nic.mac for nic in hardware.nics],
                         firmware=self.firmware, firmwares=self.firmwares,  # type: ignore[arg-type]
                         **self._identity())

    def _identity(self) -> dict[str, object]:
        """The system strings of a bare-metal identity (what the guest's SMBIOS says), and the
        nominal sensor readings of the config."""
        environment = EnvironmentModel(**dataclasses.asdict(self.vm.environment))
        identity = self.vm.identity
        if identity is None:
            return {"environment": environment}
        return {"manufacturer": identity.vendor, "model": identity.product, "serial": identity.serial,
                "bare_metal": True, "environment": environment}
