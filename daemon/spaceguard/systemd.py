"""systemd over D-Bus (dbus-next): watch the migration units, freeze/thaw/stop/start them.

The guard acts on units, on their whole cgroup, and never on processes by name. Only
units named in the config are loaded, watched or touched. A lost connection is retried
with backoff; while it is down `connected` is False (the policy then holds its actions,
and acts as soon as the view is rebuilt after reconnecting).

systemd is the truth: every unit is read in full at each connect, again after systemd's
daemon-reload (the Manager's `Reloading` signal) and daemon-reexec (its bus name changes
owner), and a cheap check every `resync_interval` compares every unit's ActiveState,
SubState and FreezerState with the last reading (systemd 252 sends no PropertiesChanged
when only FreezerState changes: an outside freeze or thaw shows up here).

dbus-next 0.2.3 is made sound for bursts in `_Bus` (see its docstring): a full socket
buffer waits for the socket to become writable instead of failing every call and the
whole connection; queued messages go out in one write; a connection is always closed with
its socket. At most MAX_IN_FLIGHT calls wait for their replies at once: dbus-daemon
refuses a connection's 129th pending call (max_replies_per_connection, 128 by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Coroutine, Iterable
from pathlib import Path
from typing import Any

from dbus_next.aio.message_bus import MessageBus, _future_set_exception, _future_set_result
from dbus_next.aio.message_bus import _MessageWriter as _DbusNextWriter
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
SLICE = "org.freedesktop.systemd1.Slice"
PROPERTIES = "org.freedesktop.DBus.Properties"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_UNIFIED = CGROUP_ROOT / "unified"  # a hybrid hierarchy's cgroup v2
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
CALL_TIMEOUT = 30.0
JOB_TIMEOUT = 180.0  # longer than systemd's default TimeoutStopSec (90 s)
# Calls waiting for a reply at once, over the one connection: dbus-daemon refuses more
# than max_replies_per_connection (128) with LimitsExceeded. 64 leaves room for the
# property reads that signals trigger; 200 raw FreezeUnit calls in the sandbox were all
# answered in 36-47 ms with 64 in flight, 42-53 with 120, 57-68 with 16.
MAX_IN_FLIGHT = 64
READ_IN_FLIGHT = 8  # of those, re-reads of units (resync): freezes never queue behind many
RESYNC_INTERVAL = 60.0
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0
REFRESH_ATTEMPTS = 3
COALESCE_BYTES = 64 * 1024  # queued messages sent with one send() (one skb, one wakeup)
CLD_CODES = {1: "exited", 2: "killed", 3: "dumped"}
USEC_INFINITY = 2**64 - 1  # systemd's "no limit" for a time span
MATCH_RULES = (
    f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',member='PropertiesChanged',"
    "path_namespace='/org/freedesktop/systemd1/unit'",
    f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='JobRemoved'",
    # daemon-reload (and the start of a daemon-reexec): re-read every unit when it ends
    f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='Reloading'",
    # daemon-reexec: the new systemd takes the bus name again
    f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',arg0='{SYSTEMD}'",
)
# Error replies that do not say the call was refused: the bus gave up waiting for the
# reply (or systemd left the bus, e.g. a daemon-reexec, while the call was pending).
UNKNOWN_OUTCOME_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Timeout",
        "org.freedesktop.DBus.Error.TimedOut",
        "org.freedesktop.DBus.Error.Disconnected",
    }
)


class SystemdError(Exception):
    """A D-Bus call failed; the text is systemd's own error name and message."""


class SliceUnusable(SystemdError):
    """A slice's freeze refused before anything was sent (another unit runs in it, a
    member is not in it, the freezer helper refused it): freeze the members one by one."""


class OutcomeUnknown(Exception):
    """A call went out and no answer came (a timeout, the connection lost mid-call): it
    may or may not have taken effect; only reading the unit can tell."""


# --- dbus-next, made sound -----------------------------------------------------------------


class _Writer(_DbusNextWriter):
    """dbus-next 0.2.3's writer treats EAGAIN from send() as fatal: under a burst the
    kernel's socket buffer fills (each send() is one skb of about 1 KiB of truesize for a
    150-byte call), and it fails the call being written AND finalizes the whole bus, so
    every other pending call fails too although dbus-daemon may have delivered them.

    Here a full buffer (BlockingIOError) or a signal (InterruptedError) means "wait until
    writable" (the writer is registered with the loop), a partial write continues where
    it stopped, what is queued goes out in one send(), and a message is written when it
    is sent, not on the next loop turn."""

    def __init__(self, bus: _Bus) -> None:
        super().__init__(bus)
        self.futures: list[asyncio.Future[None] | None] = []

    def buffer_message(self, msg: Message, future: asyncio.Future[None] | None = None) -> None:
        if msg.unix_fds:  # never negotiated (negotiate_unix_fd=False): a bug if asked
            raise ValueError("this connection does not pass file descriptors")
        self.messages.put_nowait((msg._marshall(negotiate_unix_fd=False), [], future))

    def schedule_write(
        self, msg: Message | None = None, future: asyncio.Future[None] | None = None
    ) -> None:
        if msg is not None:
            self.buffer_message(msg, future)
        if self.bus.unique_name:  # (not before Hello is answered)
            self._write(eager=True)  # now, not a loop turn later: a freeze must not wait

    def write_callback(self) -> None:
        self._write(eager=False)

    def _write(self, eager: bool) -> None:
        try:
            while True:
                if self.buf is None:
                    if self.messages.qsize() == 0:
                        self.loop.remove_writer(self.fd)
                        return
                    chunks: list[bytes] = []
                    self.futures = []
                    size = 0
                    while self.messages.qsize() and size < COALESCE_BYTES:
                        data, _fds, future = self.messages.get_nowait()
                        chunks.append(data)
                        self.futures.append(future)
                        size += len(data)
                    self.buf = memoryview(b"".join(chunks))
                    self.offset = 0
                try:
                    self.offset += self.sock.send(self.buf[self.offset :])
                except (BlockingIOError, InterruptedError):
                    self.loop.add_writer(self.fd, self.write_callback)  # once writable
                    return
                if self.offset < len(self.buf):
                    self.loop.add_writer(self.fd, self.write_callback)  # the rest, then
                    return
                self.buf = None
                for future in self.futures:
                    _future_set_result(future, None)
                self.futures = []
        except Exception as error:  # a real send error: the connection is gone
            for future in self.futures:
                _future_set_exception(future, error)
                if future is not None:
                    future.exception()  # call() never awaits its send: no "never retrieved"
            self.futures = []
            if eager:  # inside send(): the call's reply handler is registered after it
                self.loop.call_soon(self.bus._finalize, error)
            else:
                self.bus._finalize(error)


class _Bus(MessageBus):
    """dbus-next's asyncio MessageBus with a writer that survives backpressure, an
    authentication that ends when the peer hangs up (0.2.3 reads b'' forever, spinning
    until a timeout), calls that fail at once on a broken connection (0.2.3 lets a call
    made just after the break wait forever), and `close()`, which closes the socket:
    `disconnect()` only shuts it down, and the file object `makefile()` made keeps the
    descriptor open even after `socket.close()` (dbus-next issues #112 and #137)."""

    def __init__(self, bus_address: str | None = None) -> None:
        try:
            if bus_address:
                super().__init__(bus_address=bus_address)
            else:
                super().__init__(bus_type=BusType.SYSTEM)
        except BaseException:
            self._close_socket()  # a connect() that failed left its socket behind
            raise
        self._writer = _Writer(self)

    async def call(self, msg: Message) -> Message | None:
        # A call made after the connection broke would wait forever: its reply handler is
        # registered after _finalize() failed every pending one (asyncio.wait_for starts
        # this coroutine a loop turn after the caller checked `connected`).
        if self._disconnected:
            raise ConnectionResetError("the D-Bus connection is closed")
        reply: Message | None = await super().call(msg)
        return reply

    async def _auth_readline(self) -> str:
        buf = b""
        while buf[-2:] != b"\r\n":
            chunk = await self._loop.sock_recv(self._sock, 2)
            if not chunk:
                raise EOFError("the bus closed the connection during authentication")
            buf += chunk
        return buf[:-2].decode()

    def close(self) -> None:
        """Fail whatever is pending (as a lost connection), leave the loop, close the fd."""
        self._user_disconnect = True
        if not self._disconnected:
            with contextlib.suppress(Exception):
                self._finalize(ConnectionResetError("connection closed by spaceguard"))
        done = self._disconnect_future
        if done.done() and not done.cancelled():
            done.exception()  # seen: a lost connection's error is not "never retrieved"
        self._close_socket()

    def _close_socket(self) -> None:
        for name in ("_stream", "_sock"):
            resource = getattr(self, name, None)
            if resource is not None:
                with contextlib.suppress(OSError):
                    resource.close()


def open_bus(address: str) -> MessageBus:
    """A sound dbus-next MessageBus (not yet connected) for `address` ("" = system bus);
    close it with `close_bus`."""
    return _Bus(address or None)


def close_bus(bus: MessageBus) -> None:
    if isinstance(bus, _Bus):
        bus.close()
    else:
        bus.disconnect()


# --- the client ------------------------------------------------------------------------------


class SystemdClient:
    """One connection to the system bus, rebuilt after a loss, and the units' live view."""

    def __init__(
        self,
        address: str,
        units: Iterable[str],
        on_unit: Callable[[str, UnitView], None],
        on_connection: Callable[[bool], None],
        freezer_socket: Path | None = None,
        resync_interval: float = RESYNC_INTERVAL,
    ) -> None:
        self.address = address
        self._closing = False
        # How freeze/thaw go out: "direct" (FreezeUnit ourselves) or "helper" (through
        # spaceguard-freezer), decided by a probe at each connect (_probe_freezing).
        self.freeze_path = "direct"
        self.freezer = FreezerClient(freezer_socket) if freezer_socket else None
        self.units = set(units)
        self.on_unit = on_unit
        self.on_connection = on_connection
        self.resync_interval = resync_interval
        self.bus: MessageBus | None = None
        self.connected = False
        self.paths: dict[str, str] = {}  # object path → unit name
        self.properties: dict[str, dict[str, Any]] = {}
        # JobRemoved results by job path; a job can end before its caller sees the reply
        self.job_results: OrderedDict[str, str] = OrderedDict()
        self.job_waiters: dict[str, asyncio.Future[str]] = {}
        self.resyncs = 0  # full or partial re-reads done (status, tests)
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._read_slots = asyncio.Semaphore(READ_IN_FLIGHT)
        self._stale: set[str] = set()  # units whose last re-read failed: read at the next
        self._generation: dict[str, int] = {}  # per unit: signals and replies seen (_touch)
        self._cgroups: dict[str, str] = {}  # slice → its ControlGroup (this connection)
        self._stale_retry: asyncio.Task[None] | None = None
        self._resync_lock = asyncio.Lock()

    # -- connection ---------------------------------------------------------------------

    def launch(self) -> None:
        """Connect in the background, and reconnect whenever the connection is lost."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="systemd-bus")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            # Python 3.11's wait_for can swallow a cancellation that meets its inner
            # future's result (bpo-42130, fixed in 3.12): cancel until the task has ended
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._drop_bus()
        if self.freezer is not None:
            await self.freezer.close()

    def set_units(self, units: Iterable[str]) -> None:
        """After a reload: watch the new set (loading new units if connected)."""
        new = set(units) - self.units
        self.units = set(units)
        if new and self.connected:
            self._spawn(self._load_units(sorted(new)))

    async def _run(self) -> None:
        delay = RECONNECT_MIN
        while not self._closing:
            periodic: asyncio.Task[None] | None = None
            try:
                await self._connect()
                delay = RECONNECT_MIN
                assert self.bus is not None
                periodic = asyncio.get_running_loop().create_task(self._periodic())
                await self.bus.wait_for_disconnect()
                log.error("D-Bus connection lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure to (re)connect: retry with backoff
                log.error("D-Bus: %s; retrying in %.1fs", _describe(error), delay)
            finally:
                if periodic is not None:
                    periodic.cancel()
                self._drop_bus()
            self._set_connected(False)
            for waiter in self.job_waiters.values():  # their JobRemoved will never come
                if not waiter.done():
                    waiter.set_exception(OutcomeUnknown("connection lost while the job ran"))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    def _drop_bus(self) -> None:
        """Close the connection and its socket (every path out of a connection ends here,
        a connect that failed part-way included)."""
        bus, self.bus = self.bus, None
        if bus is not None:
            close_bus(bus)

    async def _connect(self) -> None:
        self.bus = open_bus(self.address)  # the socket is closed by _drop_bus, whatever fails
        bus = self.bus
        await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
        bus.add_message_handler(self._on_message)
        for rule in MATCH_RULES:
            await self._call(DBUS, DBUS_PATH, DBUS, "AddMatch", "s", [rule])
        await self._subscribe()
        await self._probe_freezing()
        self.paths.clear()
        self._stale.clear()
        self._cgroups.clear()
        await self._load_units(sorted(self.units))
        self._set_connected(True)
        log.info(
            "D-Bus connected (%s); watching %d units", self.address or "system bus", len(self.units)
        )

    async def _subscribe(self) -> None:
        try:
            await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "Subscribe")
        except SystemdError as error:
            if "AlreadySubscribed" not in str(error):  # after a daemon-reexec: kept
                raise

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
        async def load(unit: str) -> None:
            async with self._read_slots:
                reply = await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "LoadUnit", "s", [unit])
                path = str(reply[0])
                self.paths[path] = unit
                self.properties[unit] = {}
                await self._refresh(unit, path)

        results = await asyncio.gather(*(load(unit) for unit in units), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _path_of(self, unit: str) -> str | None:
        return next((path for path, name in self.paths.items() if name == unit), None)

    async def reread(self, unit: str) -> None:
        """Read a unit's properties again and report them (as a change, even if none). A
        read that fails leaves the unit stale: the next resync reads it (and one is due
        within a second); a lost connection re-reads every unit anyway."""
        path = self._path_of(unit)
        if path is None or not self.connected:
            return  # the next connection reads every unit anyway
        try:
            async with self._read_slots:
                await self._refresh(unit, path)
        except (SystemdError, OutcomeUnknown) as error:
            log.warning("re-reading %s failed (%s): trying again shortly", unit, error)
            self._stale.add(unit)
            self._retry_stale_soon()

    def _retry_stale_soon(self) -> None:
        """Read the stale units again in a second (one such retry pending at a time: a
        re-exec can fail a hundred re-reads at once)."""
        if self._stale_retry is None or self._stale_retry.done():
            self._stale_retry = asyncio.get_running_loop().create_task(self._retry_stale())
            self._background.add(self._stale_retry)
            self._stale_retry.add_done_callback(self._done)

    async def _retry_stale(self) -> None:
        await asyncio.sleep(1.0)
        if self._stale and self.connected:
            await self.resync("a re-read had failed", full=False, stale_only=True)

    def _touch(self, unit: str) -> None:
        """Something told us about `unit` (a signal, an action's reply): a reading of it
        under way may be older than that."""
        self._generation[unit] = self._generation.get(unit, 0) + 1

    async def _refresh(self, unit: str, path: str) -> None:
        """Read the unit (its Unit and Service properties: two calls) and report it. A
        reading during which a signal or an action's reply about the unit came may be
        older than what they told (e.g. a FreezerState read before a freeze, while the
        freezer helper's reply comes over another connection): it is read again."""
        for _attempt in range(REFRESH_ATTEMPTS):
            generation = self._generation.get(unit, 0)
            values: dict[str, Any] = {}
            for interface in (UNIT, SERVICE):
                try:
                    reply = await self._call(SYSTEMD, path, PROPERTIES, "GetAll", "s", [interface])
                except SystemdError:
                    if interface == UNIT:
                        raise
                    continue  # a unit that is not found has no Service interface
                values.update(
                    {key: value.value for key, value in reply[0].items() if key in _WATCHED}
                )
            if self._generation.get(unit, 0) == generation:
                break
        else:  # it keeps changing under us: the next resync (a second away) reads it
            self._stale.add(unit)
            self._retry_stale_soon()
            return
        self.properties.setdefault(unit, {}).update(values)
        self._stale.discard(unit)
        self._emit(unit)

    # -- resync ---------------------------------------------------------------------------

    async def resync(self, why: str, full: bool = True, stale_only: bool = False) -> int:
        """Re-read the units and report them; returns how many differed from the last
        reading. `full`: every unit in full (after a daemon-reload or -reexec). Otherwise
        the cheap check: one ListUnitsByNames and one FreezerState read per unit; only a
        unit that differs (or that a failed read left stale) is read in full and
        reported; `stale_only`: just those. One resync at a time; a request during one
        waits and runs after it."""
        async with self._resync_lock:
            if not self.connected:
                return 0
            started = time.monotonic()
            units = {name: path for path, name in self.paths.items()}
            before = {unit: dict(self.properties.get(unit, {})) for unit in units}
            try:
                if full:
                    suspects = set(units)
                elif stale_only:
                    suspects = set()
                else:
                    suspects = await self._suspects(units)
                suspects |= self._stale & set(units)

                async def read(unit: str) -> None:
                    async with self._read_slots:
                        await self._refresh(unit, units[unit])

                results = await asyncio.gather(
                    *(read(unit) for unit in sorted(suspects)), return_exceptions=True
                )
            except (SystemdError, OutcomeUnknown) as error:
                log.warning("resync (%s) failed: %s; the next one tries again", why, error)
                return 0
            failed = [r for r in results if isinstance(r, BaseException)]
            self._stale |= {
                u
                for u, r in zip(sorted(suspects), results, strict=True)
                if isinstance(r, BaseException)
            }
            differed = sum(
                1
                for unit in units
                if _view_props(self.properties.get(unit, {})) != _view_props(before[unit])
            )
            self.resyncs += 1
            level = logging.INFO if full or differed or failed else logging.DEBUG
            log.log(
                level,
                "resync (%s): %d units checked, %d read in full, %d differed%s, %.0f ms",
                why,
                len(units),
                len(suspects),
                differed,
                f", {len(failed)} reads failed" if failed else "",
                (time.monotonic() - started) * 1000,
            )
            return differed

    async def _suspects(self, units: dict[str, str]) -> set[str]:
        """The units whose ActiveState, SubState or FreezerState is not what we last read."""
        suspects: set[str] = set()
        if not units:
            return suspects
        reply = await self._call(
            SYSTEMD, MANAGER_PATH, MANAGER, "ListUnitsByNames", "as", [sorted(units)]
        )
        for name, _description, _load, active, sub, *_rest in reply[0]:
            props = self.properties.get(name, {})
            if props.get("ActiveState") != active or props.get("SubState") != sub:
                suspects.add(name)

        async def freezer_state(unit: str) -> None:
            async with self._read_slots:
                value = await self._call(
                    SYSTEMD, units[unit], PROPERTIES, "Get", "ss", [UNIT, "FreezerState"]
                )
            if value[0].value != self.properties.get(unit, {}).get("FreezerState"):
                suspects.add(unit)

        await asyncio.gather(*(freezer_state(unit) for unit in sorted(units)))
        return suspects

    async def _periodic(self) -> None:
        """The backstop: a cheap check of every unit every `resync_interval` seconds."""
        while True:
            await asyncio.sleep(self.resync_interval or RESYNC_INTERVAL)
            if self.resync_interval > 0:  # 0: off (a reload may turn it on again)
                await self.resync("periodic", full=False)

    # -- signals --------------------------------------------------------------------------

    def _on_message(self, message: Message) -> bool:
        if message.message_type != MessageType.SIGNAL:
            return False
        if message.member == "PropertiesChanged" and message.path in self.paths:
            unit = self.paths[message.path]
            interface, changed, invalidated = message.body
            if interface not in (UNIT, SERVICE):
                return False
            self._touch(unit)
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
                self._spawn(self.reread(unit))
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
        elif message.member == "Reloading" and message.interface == MANAGER:
            if message.body and not message.body[0]:  # the reload is over
                log.info("systemd reloaded its units: re-reading every unit")
                self._spawn(self.resync("systemd daemon-reload"))
        elif (
            message.member == "NameOwnerChanged"
            and message.interface == DBUS
            and message.body
            and message.body[0] == SYSTEMD
        ):
            _name, _old, new = message.body
            if new:
                self._spawn(self._after_reexec())
            else:
                log.warning("systemd left the bus (daemon-reexec?): waiting for it to return")
        return False

    async def _after_reexec(self) -> None:
        log.info("systemd is back on the bus (daemon-reexec): re-reading every unit")
        try:
            await self._subscribe()
        except (SystemdError, OutcomeUnknown) as error:
            log.warning("Subscribe after daemon-reexec failed: %s", error)
        await self.resync("systemd daemon-reexec")

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("D-Bus background read failed: %s", _describe(task.exception()))

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
        """One method call, at most MAX_IN_FLIGHT at once. SystemdError: it was refused
        (an error reply) or never sent; OutcomeUnknown: it went out and no answer came."""
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
        async with self._slots:
            bus = self.bus
            if bus is None or not bus.connected:
                raise SystemdError("not connected to D-Bus")
            try:
                async with asyncio.timeout(CALL_TIMEOUT):  # (wait_for: a task, a turn later)
                    reply = await bus.call(message)
            except TimeoutError:
                raise OutcomeUnknown(f"{member}: no reply within {CALL_TIMEOUT:g}s") from None
            except (OSError, EOFError) as error:
                raise OutcomeUnknown(f"{member}: connection lost mid-call ({error})") from None
            except Exception as error:
                if not bus.connected:  # the connection broke under the call
                    raise OutcomeUnknown(
                        f"{member}: connection lost ({_describe(error)})"
                    ) from None
                raise SystemdError(f"{member}: {_describe(error)}") from None
        if reply is None:  # dbus-next ends a pending call so when its bus closes
            raise OutcomeUnknown(f"{member}: the connection closed before the reply")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            if reply.error_name in UNKNOWN_OUTCOME_ERRORS:
                raise OutcomeUnknown(f"{member}: {reply.error_name}: {text}")
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
        """FreezeUnit/ThawUnit (or the helper's freeze/thaw). systemd replies once the
        cgroup is frozen (thawed), and 252 signals no change of FreezerState alone: the
        reply is what tells it, so it goes into the view here (a later signal of another
        property must not report the old FreezerState, e.g. as someone else's thaw)."""
        try:
            await self._freezer_call_once(method, verb, unit)
        except OutcomeUnknown:
            self._touch(unit)  # it may have changed: a reading under way may be older
            raise
        self.properties.setdefault(unit, {})["FreezerState"] = (
            "frozen" if verb == "freeze" else "running"
        )
        self._touch(unit)

    async def _freezer_call_once(self, method: str, verb: str, unit: str) -> None:
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
            async with self._slots:  # the helper calls systemd once per request: bounded too
                await self.freezer.request(verb, unit)
        except FreezerError as error:
            if error.unknown:
                raise OutcomeUnknown(f"freezer helper: {error}") from None
            raise SystemdError(f"freezer helper: {error}") from None

    async def freeze_slice(self, slice_name: str, units: Collection[str]) -> None:
        """FreezeUnit of a volume's slice, meant to freeze exactly `units`: systemd 252
        freezes each member's cgroup, then the slice's, and replies once all are frozen.
        Refused (SliceUnusable), sending nothing, unless the running units in the slice
        (its child cgroups) are exactly `units`: a slice freezes whatever runs in it."""
        if not slice_name.endswith(".slice"):
            raise SliceUnusable(f"{slice_name} is not a slice")
        self._check(slice_name)
        for unit in units:
            self._check(unit)
        members = await self._slice_members(slice_name)
        foreign, missing = sorted(members - set(units)), sorted(set(units) - members)
        if foreign or missing:
            raise SliceUnusable(
                f"{slice_name} holds "
                + (f"other units ({', '.join(foreign[:5])})" if foreign else "")
                + (" and " if foreign and missing else "")
                + (f"not {', '.join(missing[:5])}" if missing else "")
            )
        try:
            if self.freeze_path == "direct" or self.freezer is None:
                await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "FreezeUnit", "s", [slice_name])
            else:
                await self._helper_freeze_slice(slice_name)
        except (SystemdError, OutcomeUnknown):
            for unit in units:
                self._touch(unit)
            raise
        for unit in (*units, slice_name):
            self.properties.setdefault(unit, {})["FreezerState"] = "frozen"
            self._touch(unit)

    async def _helper_freeze_slice(self, slice_name: str) -> None:
        assert self.freezer is not None
        try:
            await self.freezer.request("freeze", slice_name)
        except FreezerError as error:
            if error.unknown:
                raise OutcomeUnknown(f"freezer helper: {error}") from None
            if str(error).startswith("refused"):  # the helper's own refusal: nothing sent
                raise SliceUnusable(f"freezer helper: {error}") from None
            raise SystemdError(f"freezer helper: {error}") from None

    async def _slice_members(self, slice_name: str) -> set[str]:
        """The units running in a slice: its child cgroups (under /sys/fs/cgroup)."""
        cgroup = self._cgroups.get(slice_name)
        if cgroup is None:
            path = self._path_of(slice_name)
            if path is None:
                raise SliceUnusable(f"{slice_name} is not loaded")
            reply = await self._call(
                SYSTEMD, path, PROPERTIES, "Get", "ss", [SLICE, "ControlGroup"]
            )
            cgroup = str(reply[0].value)
            if not cgroup:
                raise SliceUnusable(f"{slice_name} has no cgroup (not active)")
            self._cgroups[slice_name] = cgroup
        root = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_UNIFIED
        try:
            with os.scandir(root / cgroup.lstrip("/")) as entries:
                return {entry.name for entry in entries if entry.is_dir(follow_symlinks=False)}
        except OSError as error:
            raise SliceUnusable(f"cannot list {slice_name}'s cgroup: {error}") from None

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

    async def run_unit(self, unit: str, timeout: float, what: str = "verification") -> None:
        """Start a configured oneshot unit and wait until it has run; raises SystemdError
        unless it succeeded (its own TimeoutStartSec bounds it; `timeout` is our limit)."""
        self._check(unit)
        reply = await self._call(
            SYSTEMD, MANAGER_PATH, MANAGER, "StartUnit", "ss", [unit, "replace"]
        )
        await self._wait_job(str(reply[0]), f"{what} {unit}", timeout + JOB_TIMEOUT)

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


def _view_props(props: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(props.get(key) for key in sorted(_WATCHED))


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}" if not str(error) else str(error)
