"""sd_notify (sdnotify): READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same
by hand. The watchdog interval comes from WATCHDOG_USEC, as sd_watchdog_enabled() does.
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier()
        self.last_status = ""
        self.last_watchdog = 0.0

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds between pings (half of WatchdogSec), or None when no watchdog is set."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        return int(usec) / 1_000_000 / 2

    def _send(self, message: str) -> None:
        # sdnotify encodes latin-1: keep the text within it rather than lose the message
        self._notifier.notify(message.encode("latin-1", "replace").decode("latin-1"))

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self) -> None:
        monotonic_usec = int(time.monotonic() * 1_000_000)
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        text = " ".join(text.split())  # STATUS= is one line
        if text != self.last_status:
            self.last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.last_watchdog = time.monotonic()
        self._send("WATCHDOG=1")
