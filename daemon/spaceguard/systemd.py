"""systemd over D-Bus (dbus-next): watch the migration units, freeze/thaw/stop/start them.

The guard acts on units, on their whole cgroup, and never on processes by name. Only
units named in the config are loaded, watched or touched. A lost connection is retried
with backoff; while it is down `connected` is False (the policy then holds its actions,
and acts as soon as the view is rebuilt after reconnecting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from .freezer import FreezerClient, FreezerError, choose_path, is_refusal
from .model import UnitView

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
CALL_TIMEOUT = 30.0
JOB_TIMEOUT = 180.0  # longer than systemd's default TimeoutStopSec (90 s)
CLD_CODES = {1: "exited", 2: "killed", 3: "dumped"}
USEC_INFINITY = 2**64 - 1  # systemd's "no limit" for a time span
MATCH_RULES = (
    f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',member='PropertiesChanged',"
    "path_namespace='/org/freedesktop/systemd1/unit'",
    f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='JobRemoved'",
)


class SystemdError(Exception):
    """A D-Bus call failed; the text is systemd's own error name and message."""


class OutcomeUnknown(Exception):
    """A call went out and no answer came (a timeout, the connection lost mid-call): it
    may or may not have taken effect; only reading the unit can tell."""


class SystemdClient:
    """One connection to the system bus, rebuilt after a loss, and the units' live view."""

    def __init__(
        self,
        address: str,
        units: Iterable[str],
        on_unit: Callable[[str, UnitView], None],
        on_connection: Callable[[bool], None],
        freezer_socket: Path | None = None,
    ) -> None:
        self.address = address
        # How freeze/thaw go out: "direct" (FreezeUnit ourselves) or "helper" (through
        # spaceguard-freezer), decided by a probe at each connect (_probe_freezing).
        self.freeze_path = "direct"
        self.freezer = FreezerClient(freezer_socket) if freezer_socket else None
        self.units = set(units)
        self.on_unit = on_unit
        self.on_connection = on_connection
        self.bus: MessageBus | None = None
        self.connected = False
        self.paths: dict[str, str] = {}  # object path → unit name
        self.properties: dict[str, dict[str, Any]] = {}
        # JobRemoved results by job path; a job can end before its caller sees the reply
        self.job_results: OrderedDict[str, str] = OrderedDict()
        self.job_waiters: dict[str, asyncio.Future[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # -- connection ---------------------------------------------------------------------

    def launch(self) -> None:
        """Connect in the background, and reconnect whenever the connection is lost."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="systemd-bus")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.bus is not None:
            self.bus.disconnect()
        if self.freezer is not None:
            await self.freezer.close()

    def set_units(self, units: Iterable[str]) -> None:
        """After a reload: watch the new set (loading new units if connected)."""
        new = set(units) - self.units
        self.units = set(units)
        if new and self.connected:
            task = asyncio.get_running_loop().create_task(self._load_units(sorted(new)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._connect()
                delay = 0.1
                assert self.bus is not None
                await self.bus.wait_for_disconnect()
                log.error("D-Bus connection lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure to (re)connect: retry with backoff
                log.error("D-Bus: %s; retrying in %.1fs", _describe(error), delay)
            self._set_connected(False)
            for waiter in self.job_waiters.values():  # their JobRemoved will never come
                if not waiter.done():
                    waiter.set_exception(OutcomeUnknown("connection lost while the job ran"))
            self.bus = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        if self.address:
            bus = MessageBus(bus_address=self.address)
        else:
            bus = MessageBus(bus_type=BusType.SYSTEM)
        await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
        self.bus = bus
        bus.add_message_handler(self._on_message)
        for rule in MATCH_RULES:
            await self._call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                "s",
                [rule],
            )
        await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "Subscribe")
        await self._probe_freezing()
        self.paths.clear()
        await self._load_units(sorted(self.units))
        self._set_connected(True)
        log.info(
            "D-Bus connected (%s); watching %d units", self.address or "system bus", len(self.units)
        )

    async def _probe_freezing(self) -> None:
        """May this process freeze? Ask systemd to freeze a unit that cannot exist (a fresh
        random name: no side effect). "not loaded" means yes; AccessDenied (systemd 252's
        bus policy lets only root) means freezes go through the helper."""
        probe = f"spaceguard-probe-{uuid.uuid4().hex}.service"
        try:
            await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "FreezeUnit", "s", [probe])
            error = None
        except SystemdError as refused:
            error = str(refused)
        self.freeze_path, why = choose_path(error, self.freezer is not None)
        if self.freeze_path == "helper" and self.freezer is not None:
            log.info("freezing through the helper at %s: %s", self.freezer.path, why)
            try:  # connect now (socket activation starts it): the first freeze must not wait
                await self.freezer.connect()
            except FreezerError as problem:
                log.error("%s", problem)
        else:
            log.info("freezing directly over D-Bus: %s", why)

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.on_connection(connected)

    async def _load_units(self, units: Iterable[str]) -> None:
        for unit in units:
            reply = await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "LoadUnit", "s", [unit])
            path = str(reply[0])
            self.paths[path] = unit
            self.properties[unit] = {}
            await self._refresh(unit, path)

    async def reread(self, unit: str) -> None:
        """Read a unit's properties again and report them (as a change, even if none)."""
        path = next((path for path, name in self.paths.items() if name == unit), None)
        if path is None or not self.connected:
            return  # the next connection reads every unit anyway
        await self._refresh(unit, path)

    async def _refresh(self, unit: str, path: str) -> None:
        for interface in (UNIT, SERVICE):
            try:
                reply = await self._call(SYSTEMD, path, PROPERTIES, "GetAll", "s", [interface])
            except SystemdError:
                if interface == UNIT:
                    raise
                continue  # a unit that is not found has no Service interface
            values = {key: value.value for key, value in reply[0].items() if key in _WATCHED}
            self.properties.setdefault(unit, {}).update(values)
        self._emit(unit)

    # -- signals --------------------------------------------------------------------------

    def _on_message(self, message: Message) -> bool:
        if message.message_type != MessageType.SIGNAL:
            return False
        if message.member == "PropertiesChanged" and message.path in self.paths:
            unit = self.paths[message.path]
            interface, changed, invalidated = message.body
            if interface not in (UNIT, SERVICE):
                return False
            values = {key: value.value for key, value in changed.items() if key in _WATCHED}
            props = self.properties.setdefault(unit, {})
            old_state = props.get("ActiveState")
            props.update(values)
            stale = [key for key in invalidated if key in _WATCHED]
            ended = values.get("ActiveState") in ("inactive", "failed") and old_state != values.get(
                "ActiveState"
            )
            if stale or ended:
                # Result and the exit status must be current when a unit ends: fetch them
                # before anyone decides on it.
                self._spawn(self._refresh(unit, message.path))
            else:
                self._emit(unit)
                if values.get("ActiveState") == "active" and old_state != "active":
                    # systemd publishes WatchdogUSec once a run begins, with no signal
                    self._spawn(self.reread(unit))
        elif message.member == "JobRemoved" and message.interface == MANAGER:
            _job_id, job_path, _unit, result = message.body
            waiter = self.job_waiters.pop(job_path, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(result)
            else:
                self.job_results[job_path] = result
                while len(self.job_results) > 256:
                    self.job_results.popitem(last=False)
        return False

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("D-Bus property refresh failed: %s", _describe(task.exception()))

    def _emit(self, unit: str) -> None:
        props = self.properties.get(unit, {})
        self.on_unit(
            unit,
            UnitView(
                active_state=str(props.get("ActiveState", "unknown")),
                sub_state=str(props.get("SubState", "")),
                freezer_state=str(props.get("FreezerState", "running")),
                result=str(props.get("Result", "")),
                exec_code=CLD_CODES.get(int(props.get("ExecMainCode", 0) or 0), ""),
                exec_status=int(props.get("ExecMainStatus", 0) or 0),
                started_at=int(props.get("InactiveExitTimestamp", 0) or 0) / 1_000_000,
                service_type=str(props.get("Type", "")),
                # 0 and infinity (2^64-1, what an inactive unit shows) both mean none
                watchdog_usec=_finite_usec(props.get("WatchdogUSec", 0)),
            ),
        )

    # -- calls ------------------------------------------------------------------------------

    async def _call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> list[Any]:
        bus = self.bus
        if bus is None or not bus.connected:
            raise SystemdError("not connected to D-Bus")
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
        try:
            reply = await asyncio.wait_for(bus.call(message), CALL_TIMEOUT)
        except TimeoutError:
            raise OutcomeUnknown(f"{member}: no reply within {CALL_TIMEOUT:g}s") from None
        except (OSError, EOFError, ConnectionError) as error:
            raise OutcomeUnknown(f"{member}: connection lost mid-call ({error})") from None
        if reply is None:
            return []
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise SystemdError(f"{reply.error_name}: {text}")
        return list(reply.body)

    async def freeze(self, unit: str) -> None:
        """FreezeUnit: systemd replies once the cgroup is frozen."""
        self._check(unit)
        await self._freezer_call("FreezeUnit", "freeze", unit)

    async def thaw(self, unit: str) -> None:
        self._check(unit)
        await self._freezer_call("ThawUnit", "thaw", unit)

    async def _freezer_call(self, method: str, verb: str, unit: str) -> None:
        if self.freeze_path == "direct" or self.freezer is None:
            try:
                await self._call(SYSTEMD, MANAGER_PATH, MANAGER, method, "s", [unit])
                return
            except SystemdError as error:
                if self.freezer is None or not is_refusal(str(error)):
                    raise
                # e.g. a newer systemd whose polkit check refuses what the probe let through
                log.warning("%s %s refused (%s): using the helper from now on", verb, unit, error)
                self.freeze_path = "helper"
        try:
            await self.freezer.request(verb, unit)
        except FreezerError as error:
            if error.unknown:
                raise OutcomeUnknown(f"freezer helper: {error}") from None
            raise SystemdError(f"freezer helper: {error}") from None

    async def stop(self, unit: str) -> None:
        self._check(unit)
        await self._job("StopUnit", unit)

    async def start(self, unit: str) -> None:
        self._check(unit)
        if self.properties.get(unit, {}).get("Type") == "oneshot":
            # A oneshot's start job lasts as long as its ExecStart= (a wrapper: the whole
            # migration). Waiting for it would keep this start in flight for days, and the
            # guard, one action per unit, could neither pause nor stop the unit meanwhile.
            # The job is queued; the unit's state changes tell the rest (a failed start
            # ends the unit failed).
            await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "StartUnit", "ss", [unit, "replace"])
            return
        await self._job("StartUnit", unit)

    async def _job(self, method: str, unit: str) -> None:
        """Queue a job and wait for it to finish (JobRemoved), not just to be queued."""
        reply = await self._call(SYSTEMD, MANAGER_PATH, MANAGER, method, "ss", [unit, "replace"])
        await self._wait_job(str(reply[0]), f"{method} {unit}")

    async def _wait_job(self, job: str, what: str, timeout: float = JOB_TIMEOUT) -> None:
        result = self.job_results.pop(job, None)
        if result is None:
            waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self.job_waiters[job] = waiter
            try:
                result = await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                raise OutcomeUnknown(f"{what}: job not finished in {timeout:g}s") from None
            finally:
                self.job_waiters.pop(job, None)
        if result != "done":
            raise SystemdError(f"{what}: job {result}")

    async def run_transient(self, name: str, command: tuple[str, ...], timeout: float) -> None:
        """Run `command` as a transient oneshot service (its own cgroup, journal output)
        and wait for it; raises SystemdError unless it exits 0."""
        program = command[0] if command[0].startswith("/") else shutil.which(command[0])
        if program is None:
            raise SystemdError(f"{command[0]}: not found in PATH")
        # dbus-next takes D-Bus structs as lists only (a tuple fails its signature check)
        properties: list[list[Any]] = [
            ["Description", Variant("s", f"spaceguard verification: {' '.join(command)}")],
            ["Type", Variant("s", "oneshot")],
            ["ExecStart", Variant("a(sasb)", [[program, list(command), False]])],
            # a oneshot's run is its start job: TimeoutStartSec bounds it (RuntimeMaxSec
            # does not apply to oneshot services)
            ["TimeoutStartUSec", Variant("t", int(timeout * 1_000_000))],
            ["CollectMode", Variant("s", "inactive-or-failed")],
        ]
        reply = await self._call(
            SYSTEMD,
            MANAGER_PATH,
            MANAGER,
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            [name, "fail", properties, []],
        )
        await self._wait_job(str(reply[0]), f"verification {name}", timeout + JOB_TIMEOUT)

    async def run_unit(self, unit: str, timeout: float) -> None:
        """Start a configured oneshot unit and wait until it has run; raises SystemdError
        unless it succeeded (its own TimeoutStartSec bounds it; `timeout` is our limit)."""
        self._check(unit)
        reply = await self._call(
            SYSTEMD, MANAGER_PATH, MANAGER, "StartUnit", "ss", [unit, "replace"]
        )
        await self._wait_job(str(reply[0]), f"verification {unit}", timeout + JOB_TIMEOUT)

    def _check(self, unit: str) -> None:
        # Defence in depth: the policy only names configured units, but an adapter that
        # can freeze arbitrary units must refuse to.
        if unit not in self.units:
            raise SystemdError(f"refusing to act on {unit}: not a configured migration unit")


_WATCHED = frozenset(
    {
        "ActiveState",
        "SubState",
        "FreezerState",
        "Result",
        "ExecMainCode",
        "ExecMainStatus",
        # when the latest run began (only its log lines act), and whether it can be frozen
        "InactiveExitTimestamp",
        "Type",
        "WatchdogUSec",  # a unit with its own watchdog must not be frozen (systemd#38517)
    }
)


def _finite_usec(value: Any) -> int:
    usec = int(value or 0)
    return usec if 0 < usec < USEC_INFINITY else 0


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}" if not str(error) else str(error)
