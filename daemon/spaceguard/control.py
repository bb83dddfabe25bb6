"""The control socket: newline-delimited JSON requests from `spaceguardctl`, on the guard's loop.

One request per line, one reply per line, several per connection::

    → {"v": 1, "verb": "pause", "args": {"account": "alice", "reason": "disk swap"}, "id": 7}
    ← {"v": 1, "ok": true, "result": {"message": "alice: paused ..."}, "id": 7}
    ← {"v": 1, "ok": false, "error": {"code": "forbidden", "message": "..."}}

Requests are parsed with `json` only (never pickle, never eval) and every argument is
checked before the backend sees it. Who may do what comes from the kernel (SO_PEERCRED
and SO_PEERGROUPS: the caller's uid and the groups its process holds), not from anything
the client says, nor from the group database: a process that dropped a group has dropped
what it grants. Every client is its own task with a deadline for each
line and each reply, and their number is capped, so a bad or slow client costs the loop
nothing: the guard's decisions and watchdog keep their timing.

The socket is either created here (mode 0660, group set to the admin or reader group) or
inherited from systemd socket activation (`LISTEN_FDS`, see systemd/spaceguard.socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .protocol import (
    CHANGE_VERBS,
    MAX_LINE_BYTES,
    PROTOCOL_VERSION,
    READ_VERBS,
    RequestError,
    check_args,
    check_envelope,
    encode_reply,
    error_reply,
    jsonable,
    ok_reply,
    outcome_result,
    parse_request,
    read_request_id,
)

log = logging.getLogger(__name__)

REQUEST_BURST = 50
SD_LISTEN_FDS_START = 3  # the first fd systemd passes (sd_listen_fds(3))
IDENTITY_CACHE_SECONDS = 10.0  # group changes show up within this long
NSS_TIMEOUT_SECONDS = 2.0  # a passwd/group lookup (LDAP, sssd) that takes longer is skipped
# SO_PEERGROUPS (Linux >= 4.13): the peer's supplementary groups at connect(); Python's
# socket module may lack the name (3.11 does), the value is the kernel's
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
NGROUPS_MAX = 65536


class ControlBackend(Protocol):
    def status(self) -> dict[str, Any]: ...
    async def operator(
        self, verb: str, account: str, reason: str, force: bool, who: str
    ) -> tuple[bool, str]: ...  # verb: pause|resume|retry
    def incidents(self, account: str | None) -> list[dict[str, Any]]: ...
    def incident(self, incident_id: str) -> dict[str, Any] | None: ...
    def ack(self, incident_id: str, who: str) -> tuple[bool, str]: ...
    async def ack_account(self, account: str, who: str) -> tuple[bool, str]: ...
    async def reload(self) -> tuple[bool, str]: ...
    async def check_config(self, path: str | None) -> tuple[bool, str]: ...
    # what fills the volumes (all, or one); RequestError not-found / refused for bad ones
    async def usage(self, volume: str | None, rescan: bool) -> dict[str, Any]: ...


class ControlError(Exception):
    """The control socket cannot be set up; phrased for the operator."""


# --- who is asking --------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it."""

    uid: int
    gid: int
    pid: int
    user: str = ""  # "" when the uid has no passwd entry
    gids: frozenset[int] = frozenset()  # primary and supplementary groups its process holds
    groups_known: bool = True  # False: the kernel could not tell the supplementary groups

    @property
    def who(self) -> str:
        return f"uid {self.uid} ({self.user or 'no passwd entry'})"

    def in_group(self, gid: int | None) -> bool:
        """Whether the process holds `gid` (as its group or a supplementary one). Without
        SO_PEERGROUPS only its group counts: a right from a supplementary group is refused
        rather than guessed from the group database."""
        return gid is not None and gid in self.gids


@dataclass(frozen=True)
class Access:
    """Which groups may read and which may change; gids are None when a group is unset or
    does not exist (then only root has that right)."""

    reader_group: str = ""
    admin_group: str = ""
    reader_gid: int | None = None
    admin_gid: int | None = None

    def may_change(self, peer: Peer) -> bool:
        return peer.uid == 0 or peer.in_group(self.admin_gid)

    def may_read(self, peer: Peer) -> bool:
        return self.may_change(peer) or peer.in_group(self.reader_gid)

    def allows(self, peer: Peer, verb: str) -> bool:
        return self.may_read(peer) if verb in READ_VERBS else self.may_change(peer)

    def requirement(self, verb: str) -> str:
        """What a caller needs for `verb`, for the refusal message."""
        groups = (
            [self.admin_group] if verb in CHANGE_VERBS else [self.reader_group, self.admin_group]
        )
        named = [f"group {name!r}" for name in dict.fromkeys(groups) if name]
        if not named:
            return "root (no group is configured for it)"
        return "root or membership in " + " or ".join(named)


class IdentityCache:
    """uid → user name and group name → gid, kept briefly: the lookups read /etc/passwd
    and /etc/group, and a burst of clients should not repeat them. (Which groups a caller
    is in comes from the kernel, never from here: see peer_groups.)"""

    def __init__(
        self, ttl: float = IDENTITY_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl, self.clock = ttl, clock
        self._users: dict[int, tuple[float, str]] = {}
        self._groups: dict[str, tuple[float, int | None]] = {}
        # lookups in flight, by (kind, key): at most one each, however many clients wait
        self._inflight: dict[tuple[str, object], asyncio.Future[object]] = {}
        self._executor: ThreadPoolExecutor | None = None

    def user(self, uid: int) -> str:
        """The user name of `uid` ("" when it has no passwd entry)."""
        now = self.clock()
        cached = self._users.get(uid)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = ""
        if len(self._users) > 1024:  # bounded: uids are few, but never trust that
            self._users.clear()
        self._users[uid] = (now, name)
        return name

    def group(self, name: str) -> int | None:
        if not name:
            return None
        now = self.clock()
        cached = self._groups.get(name)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        try:
            gid: int | None = grp.getgrnam(name).gr_gid
        except KeyError:
            gid = None
        self._groups[name] = (now, gid)
        return gid

    # -- off the loop: what the control server uses ------------------------------------------

    async def user_async(self, uid: int) -> str:
        """`user`, with the NSS lookup (passwd may be LDAP/sssd: seconds, or a hang) on the
        lookup thread, at most one in flight per uid, and answered "" after
        NSS_TIMEOUT_SECONDS (a name is only shown in replies and logs, never a right)."""
        cached = self._users.get(uid)
        if cached is not None and self.clock() - cached[0] < self.ttl:
            return cached[1]
        name = await self._lookup(("user", uid), functools.partial(self.user, uid), "")
        return str(name)

    async def group_async(self, name: str) -> int | None:
        """`group` off the loop; a lookup that does not answer in time counts as a group
        that does not exist (only root keeps its rights: the safe side)."""
        if not name:
            return None
        cached = self._groups.get(name)
        if cached is not None and self.clock() - cached[0] < self.ttl:
            return cached[1]
        gid = await self._lookup(("group", name), functools.partial(self.group, name), None)
        return gid if isinstance(gid, int) else None

    async def _lookup(
        self, key: tuple[str, object], lookup: Callable[[], object], fallback: object
    ) -> object:
        future = self._inflight.get(key)
        if future is None:
            if self._executor is None:
                # one thread: a hung NSS server ties up that thread, not the loop or a pool
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="nss-lookup")
            future = asyncio.wrap_future(self._executor.submit(lookup))
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        try:
            return await asyncio.wait_for(asyncio.shield(future), NSS_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning(
                "control: %s lookup of %r took over %gs (NSS): answering without it",
                key[0],
                key[1],
                NSS_TIMEOUT_SECONDS,
            )
            return fallback


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connecting process, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> frozenset[int] | None:
    """The supplementary groups the connecting process held when it connected
    (SO_PEERGROUPS), or None when the kernel cannot tell (before Linux 4.13)."""
    size = 256 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as error:
            if error.errno == errno.ERANGE and size < NGROUPS_MAX * 4:
                size = NGROUPS_MAX * 4  # more groups than the first guess: ask for all
                continue
            if error.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        count = len(raw) // 4
        return frozenset(struct.unpack(f"{count}I", raw[: count * 4]))


async def _dispatch(verb: str, args: dict[str, Any], peer: Peer, backend: ControlBackend) -> object:
    if verb == "version":
        return {"version": __version__, "protocol": PROTOCOL_VERSION}
    if verb == "status":
        return backend.status()
    if verb == "incidents":
        return backend.incidents(args.get("account"))
    if verb == "show":
        record = backend.incident(args["incident"])
        if record is None:
            raise RequestError("not-found", f"no incident {args['incident']!r}")
        return record
    if verb == "check-config":
        return outcome_result(verb, await backend.check_config(args.get("path")))
    if verb == "usage":
        return await backend.usage(args.get("volume"), args.get("rescan", False))
    if verb in ("pause", "resume", "retry"):
        return outcome_result(
            verb,
            await backend.operator(
                verb, args["account"], args.get("reason", ""), args.get("force", False), peer.who
            ),
        )
    if verb == "ack" and "account" in args:
        return outcome_result(verb, await backend.ack_account(args["account"], peer.who))
    if verb == "ack":
        return outcome_result(verb, backend.ack(args["incident"], peer.who))
    if verb == "reload":
        return outcome_result(verb, await backend.reload())
    raise RequestError("unknown-verb", f"unknown verb {verb!r}")  # unreachable: VERBS checked


async def handle_line(
    line: bytes, peer: Peer, backend: ControlBackend, access: Access | None = None
) -> dict[str, Any]:
    """One request line (without its newline) → one reply. Never raises (except for
    cancellation): bad input and backend failures both come back as error replies."""
    access = access or Access()
    request_id: str | int | None = None
    verb = ""
    try:
        request = parse_request(line)
        request_id = read_request_id(request)
        verb = check_envelope(request)
        if (
            verb == "check-config"
            and isinstance(request.get("args"), dict)
            and "path" in request["args"]
            and not access.may_change(peer)
        ):
            # checking another file makes the guard read it with its own rights: only for
            # those who may change the guard anyway
            raise RequestError(
                "forbidden",
                f"check-config with a path needs "
                f"{access.requirement('reload')}; you are "
                f"{peer.who}",
            )
        if not access.allows(peer, verb):
            unknown = (
                ""
                if peer.groups_known
                else " (this kernel cannot tell the groups of your process: SO_PEERGROUPS)"
            )
            raise RequestError(
                "forbidden",
                f"{verb} needs {access.requirement(verb)}; you are {peer.who}{unknown}",
            )
        args = check_args(verb, request.get("args"))
        result = jsonable(await _dispatch(verb, args, peer, backend))
    except RequestError as error:
        if error.code == "forbidden":
            log.warning(
                "control: refused %s for %s, pid %d: %s", verb, peer.who, peer.pid, error.message
            )
        return error_reply(error.code, error.message, request_id)
    except TypeError as error:  # from jsonable: the backend returned something odd
        log.error("control: %s: cannot send the result: %s", verb, error)
        return error_reply("internal", f"{verb}: {error}", request_id)
    except Exception as error:
        log.error("control: %s for %s failed: %s", verb, peer.who, error, exc_info=True)
        return error_reply(
            "internal", f"{verb} failed: {type(error).__name__}: {error}", request_id
        )
    return ok_reply(result, request_id)


# --- the listening socket -----------------------------------------------------------------


def inherited_socket(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> socket.socket | None:
    """The listening socket systemd passed (socket activation), or None.

    sd_listen_fds(): the fds are for us only when LISTEN_PID is our pid (a child of ours
    inherits the environment but must not take them). The variables are removed so that
    processes we start do not see them either.
    """
    env = os.environ if environ is None else environ
    listen_pid, listen_fds = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if not (listen_pid.isdigit() and listen_fds.isdigit() and int(listen_fds) >= 1):
        return None
    if int(listen_pid) != (os.getpid() if pid is None else pid):
        return None
    if environ is None:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if int(listen_fds) > 1:
        log.warning(
            "control: systemd passed %s sockets; using the first (fd %d)",
            listen_fds,
            SD_LISTEN_FDS_START,
        )
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as error:
        raise ControlError(
            f"LISTEN_FDS is set but fd {SD_LISTEN_FDS_START} is not a socket: {error.strerror}"
        ) from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ControlError(
            f"the socket systemd passed (fd {SD_LISTEN_FDS_START}) is not a Unix "
            "stream socket: check ListenStream= in spaceguard.socket"
        )
    os.set_inheritable(sock.fileno(), False)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file nothing listens on; refuse to touch anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(
            f"{path} exists and is not a socket; not removing it "
            "(check control_socket in the config)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # stale: left by a guard that died
        return
    except BlockingIOError:
        pass  # backlog full: someone is listening
    except OSError as error:
        raise ControlError(f"{path}: cannot check the existing socket: {error.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"{path}: another process is already listening (another spaceguard?)")


def bind_socket(path: Path, group: str, backlog: int) -> socket.socket:
    """Create the listening socket: parent dir, stale file removed, mode 0660, group."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as error:
        raise ControlError(f"cannot create {path.parent}: {error.strerror}") from None
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # permissions are set before listen(): nobody can connect in between
        os.chmod(path, 0o660)
        if group:
            try:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            except KeyError:
                log.warning(
                    "control: group %r does not exist; only the guard's own user "
                    "and group can connect to %s",
                    group,
                    path,
                )
            except PermissionError:
                # unprivileged guard (User=spaceguard) not in that group: still serve root
                log.warning(
                    "control: cannot give %s to group %r (the guard's user must be a "
                    "member; or use spaceguard.socket)",
                    path,
                    group,
                )
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ControlError(f"cannot listen on {path}: {error.strerror}") from None
    return sock


# --- the server ---------------------------------------------------------------------------------


class ControlServer:
    """Serves the control socket on the running loop; one task per client."""

    def __init__(
        self,
        path: Path,
        reader_group: str,
        admin_group: str,
        backend: ControlBackend,
        idle_timeout: float = 5.0,
        max_clients: int = 256,
        max_requests_per_second: float = 500.0,
    ) -> None:
        self.path = path
        self.reader_group, self.admin_group = reader_group, admin_group
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        # connections wait here while the clients before them are served; beyond it a
        # client's connect() fails (asyncio clients) or blocks (spaceguardctl)
        self.backlog = max(128, 2 * max_clients)
        self.identities = IdentityCache()
        self.inherited = False
        self._server: asyncio.AbstractServer | None = None
        self._bound_inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self.served_requests = 0
        self.refused_busy = 0
        # Requests are paced, all clients together: the loop that answers them also samples
        # the volumes and freezes migrations, and a crowd of clients must not delay that.
        self.request_interval = 1.0 / max_requests_per_second
        self._next_slot = 0.0

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        sock = inherited_socket()
        if sock is not None:
            self.inherited = True
            name = sock.getsockname()
            log.info("control: using the socket from systemd (%s)", name or "?")
            if isinstance(name, str) and name != str(self.path):
                log.warning(
                    "control: systemd's socket is %s but control_socket is %s; "
                    "spaceguardctl defaults to the latter",
                    name,
                    self.path,
                )
        else:
            for name in (self.admin_group, self.reader_group):
                if name and self.identities.group(name) is None:
                    log.warning("control: configured group %r does not exist", name)
            # A socket file has one group: the readers' (admins must be readers too, see
            # README), else the admins'.
            socket_group = next(
                (
                    name
                    for name in (self.reader_group, self.admin_group)
                    if name and self.identities.group(name) is not None
                ),
                "",
            )
            sock = bind_socket(self.path, socket_group, backlog=self.backlog)
            st = self.path.stat()
            self._bound_inode = (st.st_dev, st.st_ino)
            log.info("control: listening on %s", self.path)
        # readuntil() enforces the line limit: a client cannot grow the buffer past it.
        # asyncio calls listen() again, so the backlog is given here too.
        self._server = await asyncio.start_unix_server(
            self._client_connected, sock=sock, limit=MAX_LINE_BYTES, backlog=self.backlog
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._bound_inode is not None:  # ours to remove; systemd's socket is not
            with contextlib.suppress(OSError):
                st = self.path.lstat()
                if (st.st_dev, st.st_ino) == self._bound_inode:
                    self.path.unlink()
            self._bound_inode = None

    async def access(self) -> Access:
        return Access(
            self.reader_group,
            self.admin_group,
            await self.identities.group_async(self.reader_group),
            await self.identities.group_async(self.admin_group),
        )

    async def _peer(self, writer: asyncio.StreamWriter) -> Peer:
        sock = writer.get_extra_info("socket")
        pid, uid, gid = peer_credentials(sock)
        groups = peer_groups(sock)
        return Peer(
            uid=uid,
            gid=gid,
            pid=pid,
            user=await self.identities.user_async(uid),
            gids=frozenset({gid, *(groups or ())}),
            groups_known=groups is not None,
        )

    async def _client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= self.max_clients:
            self.refused_busy += 1
            with contextlib.suppress(OSError):
                writer.write(
                    encode_reply(
                        error_reply("busy", f"too many clients ({self.max_clients}); try again")
                    )
                )
            writer.close()
            return
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except OSError:
            pass  # the client went away, or did not read its replies (TimeoutError)
        except asyncio.CancelledError:
            # close() cancels us; ending normally keeps asyncio's stream callback (3.11)
            # from logging the cancellation as an error
            pass
        except Exception:  # a bug here must cost one client, not the guard
            log.exception("control: client task failed")
        finally:
            self._clients.discard(task)
            writer.close()

    async def _pace(self) -> None:
        """Wait for this request's slot: at most max_requests_per_second are answered, in
        arrival order; a lone spaceguardctl never waits."""
        # GCRA: a burst of REQUEST_BURST passes at once, then requests keep to the rate
        now = asyncio.get_running_loop().time()
        slot = max(self._next_slot, now)
        self._next_slot = slot + self.request_interval
        wait = slot - now - REQUEST_BURST * self.request_interval
        if wait > 0:
            await asyncio.sleep(wait)

    async def _send(self, writer: asyncio.StreamWriter, reply: Mapping[str, Any]) -> None:
        writer.write(encode_reply(reply))
        # a client that does not read its replies must not hold the task forever
        async with asyncio.timeout(self.idle_timeout):
            await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = await self._peer(writer)
        except (OSError, struct.error) as error:
            log.error("control: cannot read the peer's credentials: %s", error)
            await self._send(writer, error_reply("internal", "cannot identify the caller"))
            return
        while True:
            last = False
            try:
                async with asyncio.timeout(self.idle_timeout):
                    line = await reader.readuntil(b"\n")
            except TimeoutError:
                await self._send(
                    writer,
                    error_reply(
                        "timeout", f"no complete request within {self.idle_timeout:g} s; closing"
                    ),
                )
                return
            except asyncio.LimitOverrunError:
                await self._send(
                    writer,
                    error_reply(
                        "too-long", f"request line longer than {MAX_LINE_BYTES} bytes; closing"
                    ),
                )
                return
            except asyncio.IncompleteReadError as eof:
                if not eof.partial.strip():
                    return  # the client is done
                line, last = eof.partial, True  # a last request without its newline
            await self._pace()
            access = await self.access()
            reply = await handle_line(line.rstrip(b"\r\n"), peer, self.backend, access)
            self.served_requests += 1
            await self._send(writer, reply)
            if last:
                return
