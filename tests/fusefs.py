"""A tiny real FUSE file system that can stop answering: a hung network mount, for tests.

It speaks the FUSE kernel protocol over /dev/fuse itself (no libfuse, no Python package)
and is mounted with mount(2). It holds one empty root directory and answers INIT,
GETATTR, STATFS (a 1 GiB file system, half free) and LOOKUP (nothing there); everything
else gets ENOSYS. :meth:`HangingFuse.hang` makes it read requests and never answer them,
like a network file system whose server went away; :meth:`HangingFuse.answer` answers the
held ones and every later one again. Callers of statfs(2)/stat(2) on the mount block in
the kernel meanwhile, exactly as on a hung NFS or sshfs mount.

    with HangingFuse(tmp / "net") as fs:
        os.statvfs(fs.mountpoint)   # answered
        fs.hang()                   # statvfs now blocks until fs.answer() (or unmount)

Root only (mount(2) of a FUSE file system). Unmounting (lazily) and closing /dev/fuse
aborts whatever is still held: blocked callers get ENOTCONN and return.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import stat
import struct
import threading
from pathlib import Path
from types import TracebackType

__all__ = ["HangingFuse", "missing_for_fuse"]

FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_STATFS = 17
FUSE_INIT = 26
FUSE_INTERRUPT = 36
FUSE_DESTROY = 38
FUSE_BATCH_FORGET = 42
NO_REPLY = {FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT}

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes
ATTR_OUT = struct.Struct("<QII" + "QQQQQQIIIIIIIIII")  # attr_valid, nsec, dummy, fuse_attr
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs: 80 bytes

BLOCK = 4096
BLOCKS = (1 << 30) // BLOCK
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2


def missing_for_fuse() -> list[str]:
    """What this host lacks to mount a FUSE file system (empty when all is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("not root (mounting FUSE needs root)")
    if not os.path.exists("/dev/fuse"):
        missing.append("no /dev/fuse (modprobe fuse)")
    return missing


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class HangingFuse:
    def __init__(self, mountpoint: str | os.PathLike[str]) -> None:
        self.mountpoint = Path(mountpoint).resolve()
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._hung = False
        self._stopping = threading.Event()
        self._held: list[tuple[int, int, int]] = []  # (opcode, unique, nodeid)
        self.counts: dict[int, int] = {}  # opcode → requests read
        self.held_total = 0  # requests held since the last answer() (or start)

    # -- control ---------------------------------------------------------------------

    def mount(self) -> HangingFuse:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        # allow_other: the guard as shipped (user spaceguard) must reach it, as it would a
        # network file system; without it the kernel answers others' statfs with zeros
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        libc = _libc()
        if (
            libc.mount(
                b"hangfs",
                str(self.mountpoint).encode(),
                b"fuse.hangfs",
                MS_NOSUID | MS_NODEV,
                options,
            )
            != 0
        ):
            error = ctypes.get_errno()
            os.close(self._fd)
            self._fd = None
            raise OSError(error, f"mount fuse on {self.mountpoint}: {os.strerror(error)}")
        self._thread = threading.Thread(target=self._serve, name="hangfs", daemon=True)
        self._thread.start()
        return self

    def hang(self) -> None:
        """From now on, hold every request unanswered."""
        with self._lock:
            self._hung = True

    def answer(self) -> None:
        """Answer the held requests, and every later one."""
        with self._lock:
            self._hung = False
            held, self._held = self._held, []
            self.held_total = 0
        for opcode, unique, nodeid in held:
            self._reply_to(opcode, unique, nodeid, b"")

    def held(self, opcode: int | None = None) -> int:
        """Requests held now (of ``opcode``, or all)."""
        with self._lock:
            return sum(1 for op, _, _ in self._held if opcode is None or op == opcode)

    def umount(self) -> None:
        """Answer what is held, unmount (lazily: a copy in another mount namespace may stay
        until that namespace ends), stop serving and close /dev/fuse, which aborts the
        connection: whatever uses the mount still gets ENOTCONN, never a hang."""
        if self._fd is None:
            return
        self.answer()
        _libc().umount2(str(self.mountpoint).encode(), MNT_DETACH)
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        fd, self._fd = self._fd, None
        os.close(fd)

    def __enter__(self) -> HangingFuse:
        return self.mount()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.umount()

    # -- the protocol ----------------------------------------------------------------

    def _serve(self) -> None:
        fd = self._fd
        assert fd is not None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not self._stopping.is_set():
            try:
                if not poller.poll(100):
                    continue  # look at the stop flag: a blocked read would pin the device
                request = os.read(fd, 1 << 17)
            except OSError as error:
                if error.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: the request was interrupted before we read it
                return  # ENODEV: unmounted; EBADF: closed
            if len(request) < IN_HEADER.size:
                continue
            _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
            body = request[IN_HEADER.size :]
            with self._lock:
                self.counts[opcode] = self.counts.get(opcode, 0) + 1
                hold = self._hung and opcode not in NO_REPLY and opcode != FUSE_INIT
                if hold:
                    self._held.append((opcode, unique, nodeid))
                    self.held_total += 1
            if not hold:
                self._reply_to(opcode, unique, nodeid, body)

    def _reply_to(self, opcode: int, unique: int, nodeid: int, body: bytes) -> None:
        if opcode in NO_REPLY:
            return
        if opcode == FUSE_INIT:
            _major, minor = struct.unpack_from("<II", body)
            self._send(
                unique,
                0,
                INIT_OUT.pack(7, min(minor, 31), 1 << 16, 0, 16, 12, 1 << 16, 1, 0, 0, 0, 0),
            )
        elif opcode == FUSE_GETATTR and nodeid == 1:
            mode = stat.S_IFDIR | 0o755
            attr = (1, 0, 0, 0, 0, 0, 0, 0, 0, mode, 2, 0, 0, 0, BLOCK, 0)
            # attr_valid 0: every stat(2) asks again, so a hang shows at once
            self._send(unique, 0, ATTR_OUT.pack(0, 0, 0, *attr))
        elif opcode == FUSE_STATFS:
            half = BLOCKS // 2
            self._send(
                unique, 0, STATFS_OUT.pack(BLOCKS, half, half, 1000, 500, BLOCK, 255, BLOCK, 0)
            )
        elif opcode == FUSE_LOOKUP:
            self._send(unique, -errno.ENOENT, b"")
        elif opcode == FUSE_DESTROY:
            self._send(unique, 0, b"")
        else:
            self._send(unique, -errno.ENOSYS, b"")

    def _send(self, unique: int, error: int, payload: bytes) -> None:
        fd = self._fd
        if fd is None:
            return
        with contextlib.suppress(OSError):  # ENOENT: the caller was interrupted meanwhile
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload)
