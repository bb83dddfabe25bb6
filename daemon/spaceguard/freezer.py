"""The freezer helper (`spaceguard freezer`) and the guard's client for it.

Why it exists: on systemd 252 (Debian 12) an unprivileged process cannot freeze or thaw
a unit at all. The bus policy shipped with systemd lets only root send `FreezeUnit`,
`ThawUnit`, `Unit.Freeze` and `Unit.Thaw` ("AccessDenied", polkit is never asked), while
`StartUnit`/`StopUnit` go through polkit. So the guard runs unprivileged, and this helper,
the only privileged piece, does the two things polkit cannot grant: it freezes and thaws
the configured migration units, for the guard's user only.

What it accepts (everything else gets a clear error and changes nothing):

* peers whose kernel-reported uid (SO_PEERCRED) is the guard's user (`--user`,
  default `spaceguard`); other peers get one error line and are disconnected;
* the verbs `freeze` and `thaw`, for units the guard's config (the same file, read with
  `spaceguard.config.load`) names as migration units: `unit` and `resume_unit` of a
  `[[migrations]]` table; the file is re-read when it changes and on SIGHUP, and a file
  that does not load keeps the previous list (like the guard's own reload);
* lines of at most `MAX_LINE` bytes.

The protocol is one line per request and per reply, so replies can come out of order
(two units frozen at once do not wait for each other)::

    request:  ID VERB UNIT\\n     ID: 1-16 letters/digits; VERB: freeze | thaw
    reply:    ID ok\\n
              ID error TEXT\\n    TEXT: systemd's error name and message, or why refused
              - error TEXT\\n     a line that could not be read as a request

It calls `Manager.FreezeUnit`/`ThawUnit` on the system bus (or the config's
`guard.bus_address`) and answers with systemd's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pwd
import re
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/spaceguard-freezer/freezer.sock")
DEFAULT_USER = "spaceguard"
MAX_LINE = 512  # bytes, newline included: a unit name is at most 255
MAX_IN_FLIGHT = 32  # requests per connection being answered at once
CALL_TIMEOUT = 30.0
SD_LISTEN_FDS_START = 3
VERBS = {"freeze": "FreezeUnit", "thaw": "ThawUnit"}
_ID = re.compile(r"[A-Za-z0-9]{1,16}")
_UNIT = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}")

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"

# What systemd (or the bus policy) answers a caller that may not freeze: the guard then
# sends its freezes through this helper.
REFUSALS = (
    "org.freedesktop.DBus.Error.AccessDenied",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
)
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"


class FreezerError(Exception):
    """A request failed or was refused; the text says why. `unknown`: the request went
    out but no answer came, so it may have taken effect."""

    def __init__(self, message: str, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


# --- the protocol (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: str
    verb: str
    unit: str


def parse_request(line: bytes) -> Request:
    """One request line (with or without its newline); raises FreezerError("bad request: ...")."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise FreezerError("bad request: not ASCII") from None
    text = text.removesuffix("\n")
    parts = text.split(" ")
    if len(parts) != 3:
        raise FreezerError("bad request: expected 'ID VERB UNIT'")
    request_id, verb, unit = parts
    if not _ID.fullmatch(request_id):
        raise FreezerError("bad request: ID must be 1-16 letters or digits")
    if verb not in VERBS:
        raise FreezerError(f"bad request: unknown verb {verb!r} (only freeze, thaw)")
    if not _UNIT.fullmatch(unit):
        raise FreezerError("bad request: not a unit name")
    return Request(request_id, verb, unit)


def format_reply(request_id: str, error: str | None = None) -> bytes:
    if error is None:
        return f"{request_id} ok\n".encode()
    text = " ".join(error.split())  # one line, whatever systemd said
    line = f"{request_id} error {text}".encode("ascii", "replace")
    if len(line) >= MAX_LINE:  # bus errors can be long: the reader takes MAX_LINE at most
        line = line[: MAX_LINE - 4] + b"..."
    return line + b"\n"


def parse_reply(line: bytes) -> tuple[str, str | None]:
    """(id, None) for ok, (id, text) for an error; raises FreezerError for garbage."""
    text = line.decode("ascii", "replace").removesuffix("\n")
    request_id, _, rest = text.partition(" ")
    if rest == "ok":
        return request_id, None
    if rest.startswith("error "):
        return request_id, rest.removeprefix("error ")
    raise FreezerError(f"unreadable reply from the freezer helper: {text[:80]!r}")


def migration_units(config: Config) -> frozenset[str]:
    """The units the helper may freeze and thaw: each migration's unit and resume unit;
    and each volume's slice (volumes.X.slice), which it only freezes (check)."""
    units = frozenset(unit for migration in config.migrations for unit in migration.units)
    return units | {volume.slice for volume in config.volumes.values() if volume.slice}


def choose_path(probe_error: str | None, helper: bool) -> tuple[str, str]:
    """Which way the guard freezes, from systemd's answer to a FreezeUnit probe on a unit
    that cannot exist: ("direct" | "helper", why). `probe_error` is the D-Bus error text
    ("Name: message"), None if the call succeeded."""
    name = (probe_error or "").split(":", 1)[0].strip()
    if name in REFUSALS:
        if helper:
            return "helper", f"systemd refuses FreezeUnit to this process ({name})"
        return "direct", f"systemd refuses FreezeUnit to this process ({name}) and no helper"
    if name == NO_SUCH_UNIT or probe_error is None:
        return "direct", "systemd lets this process call FreezeUnit"
    return "direct", f"the FreezeUnit probe failed unexpectedly ({probe_error})"


def is_refusal(error_text: str) -> bool:
    return error_text.split(":", 1)[0].strip() in REFUSALS


# --- the helper (server) --------------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected process, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def inherited_socket() -> socket.socket | None:
    """The listening socket from spaceguard-freezer.socket (sd_listen_fds), or None."""
    listen_pid, listen_fds = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if not (listen_pid.isdigit() and int(listen_pid) == os.getpid() and listen_fds.isdigit()):
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise FreezerError("the socket systemd passed is not a Unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    sock.setblocking(False)
    return sock


def bind_socket(path: Path, gid: int) -> socket.socket:
    """Listen on `path` ourselves (no socket activation): mode 0660, group `gid`."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FreezerError(f"{path} exists and is not a socket; not removing it")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)  # before listen(): nobody can connect in between
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        log.warning("freezer: cannot give %s to group %d; use spaceguard-freezer.socket", path, gid)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class ConfigWatch:
    """The allowed units, from the config file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.units: frozenset[str] = frozenset()
        self.bus_address = ""
        self.problem = "not loaded yet"
        self._seen: tuple[int, ...] | None = None

    def _signature(self) -> tuple[int, ...] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def current(self, force: bool = False) -> frozenset[str]:
        """The allowed units; reloads first if the file changed (or `force`). A file that
        does not load keeps the previous set; `problem` then says why."""
        signature = self._signature()
        if not force and signature == self._seen and signature is not None:
            return self.units
        self._seen = signature
        try:
            config = load(self.path)
        except ConfigError as error:
            self.problem = str(error)
            log.error("freezer: %s; still allowing the previous %d units", error, len(self.units))
            return self.units
        units = migration_units(config)
        if units != self.units or self.problem:
            log.info(
                "freezer: %s: %d migration units may be frozen: %s",
                self.path,
                len(units),
                ", ".join(sorted(units)) or "none",
            )
        self.units, self.problem = units, ""
        self.bus_address = config.guard.bus_address
        return units


class FreezerServer:
    def __init__(self, config_path: Path, user: str, socket_path: Path = DEFAULT_SOCKET) -> None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise FreezerError(
                f"user {user!r} does not exist (it is the guard's user, made by systemd-sysusers)"
            ) from None
        self.user, self.uid, self.gid = user, entry.pw_uid, entry.pw_gid
        self.socket_path = socket_path
        self.config = ConfigWatch(config_path)
        self.bus: Any = None
        self._bus_lock = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.served = 0

    async def start(self) -> None:
        self.config.current(force=True)
        sock = inherited_socket()
        if sock is None:
            sock = bind_socket(self.socket_path, self.gid)
            where = str(self.socket_path)
        else:
            where = f"{sock.getsockname()} (from systemd)"
        with contextlib.suppress(Exception):  # the first freeze must not wait for a connect
            await self._connected_bus()
        self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)
        log.info("freezer: listening on %s for user %s (uid %d)", where, self.user, self.uid)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self.bus is not None:
            self.bus.disconnect()

    async def _connected_bus(self) -> Any:
        from dbus_next.aio.message_bus import MessageBus
        from dbus_next.constants import BusType

        async with self._bus_lock:
            if self.bus is not None and self.bus.connected:
                return self.bus
            address = self.config.bus_address
            bus = (
                MessageBus(bus_address=address) if address else MessageBus(bus_type=BusType.SYSTEM)
            )
            await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
            log.info("freezer: connected to %s", address or "the system bus")
            self.bus = bus
            return bus

    async def call(self, verb: str, unit: str) -> str | None:
        """FreezeUnit/ThawUnit; None when systemd says done, else its error text."""
        from dbus_next.constants import MessageType
        from dbus_next.message import Message

        try:
            bus = await self._connected_bus()
            message = Message(
                destination=SYSTEMD,
                path=MANAGER_PATH,
                interface=MANAGER,
                member=VERBS[verb],
                signature="s",
                body=[unit],
            )
            reply = await asyncio.wait_for(bus.call(message), CALL_TIMEOUT)
        except Exception as error:  # any failure is an answer, never a silent request
            if self.bus is not None and not self.bus.connected:
                self.bus = None
            return f"D-Bus: {str(error) or type(error).__name__}"
        if reply is not None and reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            return f"{reply.error_name}: {text}"
        return None

    def check(self, request: Request) -> str | None:
        """Why `request` is refused, or None."""
        units = self.config.current()
        if request.unit not in units:
            why = (
                f"; the config does not load: {self.config.problem}" if self.config.problem else ""
            )
            return f"refused: {request.unit} is not a migration unit in {self.config.path}{why}"
        if request.unit.endswith(".slice") and request.verb != "freeze":
            # a slice's thaw thaws every member (an operator's hold too): members one by one
            return f"refused: {request.unit} is a slice: it is only frozen, its members thawed"
        return None

    async def answer(self, request: Request) -> tuple[bytes, int, str]:
        """The reply, and what to log once it is sent (the guard must not wait for a log
        line: a freeze is on its reaction path)."""
        refusal = self.check(request)
        if refusal is not None:
            return format_reply(request.id, refusal), logging.WARNING, refusal
        started = time.monotonic()
        error = await self.call(request.verb, request.unit)
        took = (time.monotonic() - started) * 1000
        self.served += 1
        if error is None:
            return format_reply(request.id), logging.INFO, f"done in {took:.1f} ms"
        return format_reply(request.id, error), logging.WARNING, error

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid, _gid = peer_credentials(writer.get_extra_info("socket"))
        if uid != self.uid:
            log.warning(
                "freezer: refused a connection from uid %d (pid %d): only %s may use it",
                uid,
                pid,
                self.user,
            )
            writer.write(
                format_reply(
                    "-", f"forbidden: only user {self.user} may use this socket (you are uid {uid})"
                )
            )
            await writer.drain()
            return
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        answering: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return  # the guard closed the connection
                except asyncio.LimitOverrunError:
                    writer.write(
                        format_reply("-", f"bad request: line longer than {MAX_LINE} bytes")
                    )
                    await writer.drain()
                    return
                try:
                    request = parse_request(line)
                except FreezerError as error:
                    log.warning("freezer: uid %d (pid %d): %s", uid, pid, error)
                    writer.write(format_reply("-", str(error)))
                    await writer.drain()
                    continue
                await slots.acquire()
                job = asyncio.get_running_loop().create_task(self._reply(request, writer, slots))
                answering.add(job)
                job.add_done_callback(answering.discard)
        finally:
            if answering:
                await asyncio.gather(*answering, return_exceptions=True)

    async def _reply(
        self, request: Request, writer: asyncio.StreamWriter, slots: asyncio.Semaphore
    ) -> None:
        try:
            try:
                reply, level, note = await self.answer(request)
            except Exception as error:  # a bug here must still answer the guard
                log.exception("freezer: %s %s failed", request.verb, request.unit)
                reply, level, note = (
                    format_reply(request.id, f"internal error: {error!r}"),
                    logging.ERROR,
                    "internal error",
                )
            writer.write(reply)
            log.log(level, "freezer: %s %s: %s", request.verb, request.unit, note)
            await writer.drain()
        finally:
            slots.release()


async def run_freezer(config_path: Path, user: str, socket_path: Path) -> int:
    from .notify import Notifier

    try:
        server = FreezerServer(config_path, user, socket_path)
        await server.start()
    except (FreezerError, OSError) as error:
        log.error("freezer: cannot start: %s", error)
        return 1
    notifier = Notifier()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server.config.current(force=True))
    notifier.ready(f"freezing and thawing for {user}")
    await stopping.wait()
    notifier.stopping()
    await server.close()
    return 0


# --- the guard's side (client) --------------------------------------------------------------


class FreezerClient:
    """One connection to the helper, made on first use (or by `connect()`) and again after a
    loss; requests are answered concurrently and matched to replies by id."""

    def __init__(self, path: Path, timeout: float = CALL_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        async with self._lock:
            if self.connected:
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.path), limit=MAX_LINE), self.timeout
                )
            except (TimeoutError, OSError) as error:
                why = getattr(error, "strerror", None) or "timed out"
                raise FreezerError(
                    f"cannot reach the freezer helper at {self.path}: {why} "
                    "(is spaceguard-freezer.socket running?)"
                ) from None
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why = "the freezer helper closed the connection"
        try:
            while True:
                line = await reader.readuntil(b"\n")
                request_id, error = parse_reply(line)
                future = self._pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(error)
                elif request_id == "-":
                    why = f"the freezer helper says: {error}"
                    log.error("%s", why)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            FreezerError,
        ) as error:
            if isinstance(error, FreezerError):
                why = str(error)
        finally:
            self._lost(why)

    def _lost(self, why: str) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(FreezerError(why))
        self._pending.clear()

    async def request(self, verb: str, unit: str) -> None:
        """Ask the helper to freeze or thaw `unit`; raises FreezerError with its answer."""
        if verb not in VERBS:
            raise FreezerError(f"unknown verb {verb!r}")
        await self.connect()
        if self._writer is None:
            raise FreezerError("the freezer helper closed the connection")
        request_id = str(next(self._ids) % 10**16)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(f"{request_id} {verb} {unit}\n".encode("ascii", "replace"))
            error = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise FreezerError(
                f"the freezer helper gave no answer in {self.timeout:.0f}s", unknown=True
            ) from None
        except FreezerError as lost:  # the connection went while the request was out
            raise FreezerError(str(lost), unknown=True) from None
        finally:
            self._pending.pop(request_id, None)
        if error is not None:
            raise FreezerError(error)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        self._lost("closed")
