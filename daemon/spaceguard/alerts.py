"""Delivers the guard's own events (pause, resume, stop, retry, incident, give-up) as alerts.

The policy decides *that* something is worth an alert; this adapter only gets it to people,
durably: to Alertmanager's v2 API and/or to generic webhooks, with retries, and through a
spool on disk so that nothing is lost across a guard restart or a receiver outage.

Model
-----
A :class:`GuardAlert` is one *state* of an alert identified by ``key`` (e.g. "paused/alice"):
firing while ``ends_at`` is None, resolved once it is set. :meth:`AlertSender.fire` and
:meth:`AlertSender.resolve` record a new state for every receiver and return at once; the
coroutine :meth:`AlertSender.run` delivers in the background. Call them from the event
loop's thread.

Alertmanager receivers (``kind="alertmanager"``)
    ``POST {url}/api/v2/alerts`` with a JSON list of
    ``{"labels": {..., "alertname": NAME}, "annotations": {...}, "startsAt": RFC3339,
    "endsAt": RFC3339, "generatorURL": str}``. Alertmanager is level-based, so only the newest
    state of a key matters: a newer state replaces an undelivered older one. Like Prometheus,
    a firing alert is re-sent every ``resend_interval_s`` with ``endsAt`` = now + 4 x
    ``resend_interval_s`` until it is resolved (otherwise Alertmanager resolves it by itself
    once that ``endsAt`` passes); a resolved alert is sent with its real ``endsAt`` and then
    forgotten. Alertmanager de-duplicates repeated sends of the same alert (same labels).
    Alerts due for delivery share one request; re-sends at least half-way due ride along.

Webhook receivers (``kind="webhook"``)
    One ``POST {url}`` per state change, ``Content-Type: application/json``,
    ``Authorization: Bearer TOKEN`` when a token is configured, body::

        {"version": "1", "source": "spaceguard",
         "status": "firing" | "resolved",
         "key": "paused/alice",
         "alertname": "SpaceguardMigrationPaused",
         "labels": {"alertname": "SpaceguardMigrationPaused", "account": "alice", ...},
         "annotations": {"summary": "...", "description": "..."},
         "startsAt": "2025-11-23T10:00:00.000000Z",
         "endsAt": null | "2025-11-23T10:20:00.000000Z",
         "generatorURL": "..."}

    A delivered state is not re-sent. Delivery is at-least-once (a guard killed between the
    receiver's answer and the spool update sends that state again after its restart):
    receivers can de-duplicate on ``(key, status, startsAt)``.

Duplicates and ordering
    Recording the same state again is a no-op. A newer state of a key replaces an older
    undelivered state *of the same status* (e.g. updated annotations). When an alert fires
    and resolves while a receiver is unreachable, Alertmanager receivers get only the
    resolved state (it carries the real startsAt and endsAt; sending the firing state first
    would not make Alertmanager notify either, as the alert is already resolved by its
    group_wait), while webhook receivers get both, in order: a webhook is an event stream,
    and "it was paused from 10:00 to 10:20" must reach it. At most
    ``MAX_PENDING_STATES_PER_KEY`` undelivered states are kept per key and webhook (the
    oldest are dropped, with a warning: the resolved states that remain still carry their
    startsAt).

Retries
    Any failure (connection error, timeout, non-2xx answer) is retried, per receiver, with
    exponential backoff from ``initial_backoff_s`` doubling up to ``max_backoff_s``, with
    jitter (each delay is drawn from [delay/2, delay]). A receiver answering 4xx is retried
    too: the alerts are validated before they are queued, so a 4xx is a configuration
    problem (credentials, URL) that someone will fix, and dropping alerts would hide it.
    An unexpected exception is logged with its traceback and retried the same way.

Spool
    Each receiver's state lives in ``spool_dir/<receiver>.json``: its undelivered states,
    plus the firing alerts it already has (Alertmanager needs them re-sent, and resolve()
    needs them after a restart). The file is rewritten atomically (temporary file, fsync,
    rename, fsync of the directory) on every change, synchronously inside fire()/resolve()
    so that an alert is on disk before the caller goes on; that is one small write to the
    state directory, not a network call. If the write fails (disk full, I/O error) the
    state is kept in memory, logged, and the write retried by run(). At start a spool that
    cannot be read is renamed to ``<receiver>.json.corrupt-<UTC timestamp>``, logged, and
    the receiver starts empty. With a ``spool_writer`` (atomicfile.BackgroundWriter: the
    guard passes one), fire()/resolve() only hand the new spool to that writer thread, so
    an fsync never holds up the loop; the latest spool of a receiver wins, and failed writes
    are retried with backoff there (the alert is spooled a moment after fire() returns: a
    crash in between loses it like any state not yet saved). Receivers that disagree after
    a crash between two spool writes are brought to the newest state, and a newly
    configured receiver is sent the alerts that are firing. Format (times are unix seconds)::

        {"format": "spaceguard-alert-spool", "version": 1, "receiver": "am",
         "alerts": [{"key": "paused/alice",
                     "pending": [{"alert": ALERT, "enqueued_at": 1732356000.0}, ...],
                     "delivered_firing": null | {"alert": ALERT, "enqueued_at": ...}}]}
        ALERT = {"key", "name", "labels", "annotations", "starts_at", "ends_at"}

HTTP uses the standard library's urllib in a worker thread (``asyncio.to_thread``) so that
a slow receiver never blocks the event loop; each request is bounded by the receiver's
``timeout_s``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import http.client
import json
import logging
import math
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

from spaceguard import __version__
from spaceguard.atomicfile import BackgroundWriter, set_aside, write_atomic
from spaceguard.names import is_label_name, is_receiver_name

log = logging.getLogger(__name__)

SPOOL_FORMAT: Final = "spaceguard-alert-spool"
SPOOL_VERSION: Final = 1
WEBHOOK_BODY_VERSION: Final = "1"
# Alertmanager resolves a firing alert whose endsAt passed; Prometheus uses 4 x its resend
# interval so that three lost re-sends in a row do not resolve it.
ENDS_AT_RESEND_FACTOR: Final = 4
MAX_PENDING_STATES_PER_KEY: Final = 8
# Only the start of an error answer is logged: enough to see why, bounded in size.
ERROR_BODY_LOG_BYTES: Final = 512
RESPONSE_READ_LIMIT_BYTES: Final = 65536
# While a spool write keeps failing, run() retries it this often.
SPOOL_WRITE_RETRY_S: Final = 5.0

ReceiverKind = Literal["alertmanager", "webhook"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class GuardAlert:
    """One state of one alert: firing while ``ends_at`` is None, resolved once set."""

    key: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: float
    ends_at: float | None = None

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("alert key must not be empty")
        if not self.name:
            raise ValueError(f"alert {self.key!r}: name must not be empty")
        for kind, mapping in (("label", self.labels), ("annotation", self.annotations)):
            for name, value in mapping.items():
                if not isinstance(name, str) or not is_label_name(name):
                    raise ValueError(f"alert {self.key!r}: invalid {kind} name {name!r}")
                if not isinstance(value, str):
                    raise ValueError(f"alert {self.key!r}: {kind} {name!r} is not a string")
        if "alertname" in self.labels:
            raise ValueError(f"alert {self.key!r}: 'alertname' is set from name, not labels")
        if not math.isfinite(self.starts_at):
            raise ValueError(f"alert {self.key!r}: starts_at must be finite")
        if self.ends_at is not None:
            if not math.isfinite(self.ends_at):
                raise ValueError(f"alert {self.key!r}: ends_at must be finite")
            if self.ends_at < self.starts_at:
                # Alertmanager rejects such an alert; reject it here, before it is queued.
                raise ValueError(f"alert {self.key!r}: ends_at is before starts_at")
        # Private read-only copies: a caller mutating its dict later must not change a
        # queued state.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    @property
    def firing(self) -> bool:
        return self.ends_at is None

    @property
    def status(self) -> Literal["firing", "resolved"]:
        return "firing" if self.firing else "resolved"


@dataclass(frozen=True)
class AlertReceiver:
    """Where alerts go. Secrets are kept out of repr() so that logging a receiver is safe."""

    name: str
    kind: ReceiverKind
    url: str
    bearer_token: str | None = field(default=None, repr=False)
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    timeout_s: float = 10.0
    # "" = straight to the receiver: an http_proxy in the environment (Debian's build sets a
    # dead one; production hosts often set one for the internet) must not swallow alerts
    # meant for a local Alertmanager
    proxy: str = ""

    def __post_init__(self) -> None:
        # The name is also the spool file name.
        if not is_receiver_name(self.name):
            raise ValueError(
                f"receiver name {self.name!r}: use letters, digits, '_.-' (max 64, no leading '.')"
            )
        if self.kind not in ("alertmanager", "webhook"):
            raise ValueError(f"receiver {self.name}: unknown kind {self.kind!r}")
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"receiver {self.name}: url must be http(s)://host[:port]/...")
        if self.bearer_token is not None and self.basic_auth is not None:
            raise ValueError(f"receiver {self.name}: use a bearer token or basic auth, not both")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"receiver {self.name}: timeout must be a positive number")

    @property
    def endpoint(self) -> str:
        if self.kind == "alertmanager":
            return self.url.rstrip("/") + "/api/v2/alerts"
        return self.url


@dataclass(frozen=True)
class ReceiverStats:
    """Delivery figures of one receiver, for the metrics (same fields as
    metrics.DeliveryStats). Counts are alert states sent; the age is in seconds."""

    sent_ok: int
    sent_error: int
    spooled: int
    oldest_spooled_age: float


class DeliveryError(Exception):
    """A receiver did not accept a request; the message says why, without secrets."""


@dataclass
class _StateChange:
    """A state waiting for, or given to, one receiver."""

    alert: GuardAlert
    # Wall-clock time it was recorded: persisted, so the spool age survives a restart.
    enqueued_at: float


@dataclass
class _TrackedAlert:
    """What one receiver must still be sent, and has, of one alert key."""

    pending: list[_StateChange] = field(default_factory=list)
    delivered_firing: _StateChange | None = None
    # Monotonic time of the last accepted send of the firing state (not persisted: after a
    # restart firing alerts are re-sent at once, which only refreshes their endsAt).
    last_sent_monotonic: float | None = None

    def newest(self) -> _StateChange | None:
        return self.pending[-1] if self.pending else self.delivered_firing

    def is_done(self) -> bool:
        return not self.pending and self.delivered_firing is None


@dataclass
class _ReceiverState:
    receiver: AlertReceiver
    spool_path: Path
    tracked: dict[str, _TrackedAlert] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    consecutive_failures: int = 0
    retry_at_monotonic: float = 0.0
    sent_ok: int = 0
    sent_error: int = 0
    spool_dirty: bool = False


@dataclass(frozen=True)
class _Send:
    key: str
    change: _StateChange


class AlertSender:
    """Queues alert states per receiver, spools them durably and delivers them in run()."""

    def __init__(
        self,
        receivers: Iterable[AlertReceiver],
        spool_dir: Path,
        resend_interval_s: float = 60.0,
        max_backoff_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        *,
        initial_backoff_s: float = 1.0,
        generator_url: str = "",
        extra_labels: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        spool_writer: BackgroundWriter | None = None,
    ) -> None:
        receiver_list = list(receivers)
        names = [receiver.name for receiver in receiver_list]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate receiver names in {names}")
        if not resend_interval_s > 0:
            raise ValueError("resend_interval_s must be positive")
        if not 0 < initial_backoff_s <= max_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        self._resend_interval_s = resend_interval_s
        self._max_backoff_s = max_backoff_s
        self._initial_backoff_s = initial_backoff_s
        self._clock = clock
        self._generator_url = generator_url
        # which guard says it ([alerts.labels]); an alert's own labels win over them
        self._extra_labels = dict(extra_labels or {})
        self._rng = rng if rng is not None else random.Random()
        self._spool_dir = spool_dir
        self._spool_writer = spool_writer
        self._running = False
        try:
            spool_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as error:  # full or read-only state dir: alerts go out from memory
            log.error(
                "alert spool directory %s cannot be made (%s): alerts are kept in memory "
                "and delivered from there until it can",
                spool_dir,
                error.strerror or error,
            )
        self._receivers: dict[str, _ReceiverState] = {}
        for receiver in receiver_list:
            state = _ReceiverState(receiver, spool_dir / f"{receiver.name}.json")
            state.tracked = self._load_spool(state.spool_path, receiver.name)
            self._receivers[receiver.name] = state
        self._warn_about_orphan_spools()
        self._reconcile_receivers()

    # --- recording states (synchronous, never raise on delivery problems) -----------------

    def fire(self, alert: GuardAlert) -> None:
        """Records ``alert`` (normally firing) for every receiver; delivery happens in run()."""
        self._record(alert)

    def resolve(self, key: str, ends_at: float | None = None) -> None:
        """Resolves the firing alert ``key`` at ``ends_at`` (default: now). Unknown keys and
        alerts already resolved are ignored, so callers may resolve unconditionally."""
        newest = self._newest_state(key)
        if newest is None or not newest.firing:
            log.debug("resolve(%r): no firing alert with that key", key)
            return
        end = self._clock() if ends_at is None else ends_at
        # A clock step must not make an alert end before it started (Alertmanager would
        # reject it).
        self._record(dataclasses.replace(newest, ends_at=max(end, newest.starts_at)))

    def firing_alerts(self) -> dict[str, GuardAlert]:
        """The alerts currently firing, by key (e.g. to reconcile after a restart)."""
        keys = {key for state in self._receivers.values() for key in state.tracked}
        firing = {}
        for key in keys:
            newest = self._newest_state(key)
            if newest is not None and newest.firing:
                firing[key] = newest
        return firing

    def stats(self) -> dict[str, ReceiverStats]:
        now = self._clock()
        result = {}
        for name, state in self._receivers.items():
            pending = [change for t in state.tracked.values() for change in t.pending]
            oldest_age = max(0.0, now - min(c.enqueued_at for c in pending)) if pending else 0.0
            result[name] = ReceiverStats(
                sent_ok=state.sent_ok,
                sent_error=state.sent_error,
                spooled=len(pending),
                oldest_spooled_age=oldest_age,
            )
        return result

    def _record(self, alert: GuardAlert) -> None:
        now = self._clock()
        for state in self._receivers.values():
            tracked = state.tracked.get(alert.key)
            newest = tracked.newest() if tracked is not None else None
            if newest is not None and newest.alert == alert:
                continue
            if tracked is None:
                tracked = state.tracked[alert.key] = _TrackedAlert()
            self._enqueue(state, tracked, _StateChange(alert, now))
            self._persist(state)
            state.wakeup.set()

    def _enqueue(self, state: _ReceiverState, tracked: _TrackedAlert, change: _StateChange) -> None:
        if state.receiver.kind == "alertmanager":
            # Level-based: only the newest state matters.
            tracked.pending = [change]
            return
        if tracked.pending and tracked.pending[-1].alert.firing == change.alert.firing:
            tracked.pending[-1] = change
            return
        tracked.pending.append(change)
        if len(tracked.pending) > MAX_PENDING_STATES_PER_KEY:
            dropped = tracked.pending.pop(0)
            log.warning(
                "alert receiver %s: too many undelivered states of %s, dropped the %s state "
                "recorded at %s",
                state.receiver.name,
                change.alert.key,
                dropped.alert.status,
                rfc3339(dropped.enqueued_at),
            )

    def _newest_state(self, key: str) -> GuardAlert | None:
        newest = self._newest_change(key)
        return newest.alert if newest is not None else None

    def _newest_change(self, key: str) -> _StateChange | None:
        """The latest state change of `key` any receiver knows of."""
        newest: _StateChange | None = None
        for state in self._receivers.values():
            tracked = state.tracked.get(key)
            candidate = tracked.newest() if tracked is not None else None
            if candidate is not None and (
                newest is None or candidate.enqueued_at > newest.enqueued_at
            ):
                newest = candidate
        return newest

    # --- delivery ------------------------------------------------------------------------

    async def run(self) -> None:
        """Delivers forever, one task per receiver; cancel it to stop."""
        if self._running:
            raise RuntimeError("AlertSender.run() is already running")
        self._running = True
        for state in self._receivers.values():
            # Bound to this loop (an Event binds to the loop that first waits on it), and
            # set: states recorded before run() are delivered at once.
            state.wakeup = asyncio.Event()
            state.wakeup.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                for state in self._receivers.values():
                    tasks.create_task(
                        self._deliver_forever(state), name=f"alerts-{state.receiver.name}"
                    )
                # Without receivers there is nothing to do, but run() still runs until
                # cancelled, like any other adapter.
                await asyncio.Event().wait()
        finally:
            self._running = False

    async def _deliver_forever(self, state: _ReceiverState) -> None:
        loop = asyncio.get_running_loop()
        while True:
            state.wakeup.clear()
            if state.spool_dirty:
                self._persist(state)
            now = loop.time()
            if now >= state.retry_at_monotonic:
                sends = self._due_sends(state, now)
                if sends:
                    await self._attempt(state, sends)
                    continue
            timeout = self._seconds_until_work(state, now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.wakeup.wait(), timeout)

    def _due_sends(self, state: _ReceiverState, now_monotonic: float) -> list[_Send]:
        if state.receiver.kind == "webhook":
            # One state change per request, oldest first, so the receiver sees them in order.
            oldest: _Send | None = None
            for key, tracked in state.tracked.items():
                if tracked.pending and (
                    oldest is None or tracked.pending[0].enqueued_at < oldest.change.enqueued_at
                ):
                    oldest = _Send(key, tracked.pending[0])
            return [oldest] if oldest is not None else []
        sends = [_Send(key, t.pending[-1]) for key, t in state.tracked.items() if t.pending]
        resendable = [
            (key, tracked, firing)
            for key, tracked in state.tracked.items()
            if (firing := tracked.delivered_firing) is not None and not tracked.pending
        ]
        if sends or any(self._resend_due(t, now_monotonic, 1.0) for _, t, _ in resendable):
            # A request goes out anyway: take along the alerts that are at least half-way
            # to their re-send, so that many alerts share one request per interval.
            for key, tracked, firing in resendable:
                if self._resend_due(tracked, now_monotonic, 0.5):
                    sends.append(_Send(key, firing))
        return sends

    def _resend_due(
        self, tracked: _TrackedAlert, now_monotonic: float, fraction_of_interval: float
    ) -> bool:
        last = tracked.last_sent_monotonic
        return (
            last is None or now_monotonic - last >= fraction_of_interval * self._resend_interval_s
        )

    def _seconds_until_work(self, state: _ReceiverState, now_monotonic: float) -> float | None:
        deadlines = []
        if any(tracked.pending for tracked in state.tracked.values()):
            deadlines.append(state.retry_at_monotonic)
        if state.receiver.kind == "alertmanager":
            for tracked in state.tracked.values():
                if tracked.delivered_firing is not None and not tracked.pending:
                    last = tracked.last_sent_monotonic
                    resend_at = state.retry_at_monotonic
                    if last is not None:
                        resend_at = max(resend_at, last + self._resend_interval_s)
                    deadlines.append(resend_at)
        if state.spool_dirty:
            deadlines.append(now_monotonic + SPOOL_WRITE_RETRY_S)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now_monotonic)

    async def _attempt(self, state: _ReceiverState, sends: list[_Send]) -> None:
        receiver = state.receiver
        body = self._request_body(receiver, sends)
        try:
            try:
                await asyncio.to_thread(post_json, receiver, body)
            except DeliveryError:
                raise
            except Exception as unexpected:
                # A bug must not end delivery for good: log it, retry like any failure.
                log.exception("alert receiver %s: unexpected delivery error", receiver.name)
                raise DeliveryError(f"unexpected {type(unexpected).__name__}") from unexpected
        except DeliveryError as error:
            state.sent_error += len(sends)
            state.consecutive_failures += 1
            delay = self._backoff_delay(state.consecutive_failures)
            state.retry_at_monotonic = asyncio.get_running_loop().time() + delay
            log.warning(
                "alert receiver %s: delivery of %d alert(s) failed (attempt %d): %s; "
                "retrying in %.1fs",
                receiver.name,
                len(sends),
                state.consecutive_failures,
                error,
                delay,
            )
            return
        if state.consecutive_failures:
            log.info(
                "alert receiver %s: delivering again after %d failed attempt(s)",
                receiver.name,
                state.consecutive_failures,
            )
        state.consecutive_failures = 0
        state.retry_at_monotonic = 0.0
        state.sent_ok += len(sends)
        now_monotonic = asyncio.get_running_loop().time()
        spool_changed = False
        for send in sends:
            spool_changed |= self._mark_delivered(state, send, now_monotonic)
        if spool_changed:
            self._persist(state)

    def _mark_delivered(self, state: _ReceiverState, send: _Send, now_monotonic: float) -> bool:
        """Records that ``send`` was accepted; returns whether the spool changed. States
        recorded while the request was in flight stay pending."""
        tracked = state.tracked.get(send.key)
        if tracked is None:
            return False
        spool_changed = False
        position = next((i for i, c in enumerate(tracked.pending) if c is send.change), None)
        if position is not None:
            del tracked.pending[position]
            tracked.delivered_firing = send.change if send.change.alert.firing else None
            spool_changed = True
        if send.change.alert.firing and tracked.delivered_firing is send.change:
            tracked.last_sent_monotonic = now_monotonic
        if tracked.is_done():
            del state.tracked[send.key]
        return spool_changed

    def _backoff_delay(self, consecutive_failures: int) -> float:
        exponent = min(consecutive_failures - 1, 62)
        delay = min(self._max_backoff_s, self._initial_backoff_s * 2.0**exponent)
        # Jitter spreads the retries of several guards after a shared receiver outage.
        return self._rng.uniform(delay / 2, delay)

    def _request_body(self, receiver: AlertReceiver, sends: list[_Send]) -> bytes:
        if receiver.kind == "alertmanager":
            now = self._clock()
            payload: Any = [self._alertmanager_alert(send.change.alert, now) for send in sends]
        else:
            (send,) = sends
            payload = self._webhook_body(send.change.alert)
        return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()

    def _alertmanager_alert(self, alert: GuardAlert, now: float) -> dict[str, Any]:
        ends_at = alert.ends_at
        if ends_at is None:
            ends_at = now + ENDS_AT_RESEND_FACTOR * self._resend_interval_s
        return {
            "labels": {**self._extra_labels, **alert.labels, "alertname": alert.name},
            "annotations": dict(alert.annotations),
            "startsAt": rfc3339(alert.starts_at),
            "endsAt": rfc3339(ends_at),
            "generatorURL": self._generator_url,
        }

    def _webhook_body(self, alert: GuardAlert) -> dict[str, Any]:
        return {
            "version": WEBHOOK_BODY_VERSION,
            "source": "spaceguard",
            "status": alert.status,
            "key": alert.key,
            "alertname": alert.name,
            "labels": {**self._extra_labels, **alert.labels, "alertname": alert.name},
            "annotations": dict(alert.annotations),
            "startsAt": rfc3339(alert.starts_at),
            "endsAt": None if alert.ends_at is None else rfc3339(alert.ends_at),
            "generatorURL": self._generator_url,
        }

    # --- spool ---------------------------------------------------------------------------

    def _persist(self, state: _ReceiverState) -> None:
        document = {
            "format": SPOOL_FORMAT,
            "version": SPOOL_VERSION,
            "receiver": state.receiver.name,
            "alerts": [
                {
                    "key": key,
                    "pending": [_change_to_json(change) for change in tracked.pending],
                    "delivered_firing": (
                        None
                        if tracked.delivered_firing is None
                        else _change_to_json(tracked.delivered_firing)
                    ),
                }
                for key, tracked in sorted(state.tracked.items())
            ],
        }
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        if self._spool_writer is not None:
            # off the loop: the writer thread keeps the latest spool of each receiver and
            # retries it with backoff; delivery goes on from memory meanwhile
            # (refused only when its queue is full: run() then tries again)
            state.spool_dirty = not self._spool_writer.submit(
                state.spool_path.name, functools.partial(_write_spool, state.spool_path, data)
            )
            return
        try:
            _write_spool(state.spool_path, data)
        except OSError as error:
            if not state.spool_dirty:
                log.error(
                    "alert receiver %s: cannot write spool %s: %s (kept in memory, retrying)",
                    state.receiver.name,
                    state.spool_path,
                    error,
                )
            state.spool_dirty = True
            return
        if state.spool_dirty:
            log.info("alert receiver %s: spool written again", state.receiver.name)
        state.spool_dirty = False

    def _load_spool(self, path: Path, receiver_name: str) -> dict[str, _TrackedAlert]:
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            # A temporary file from a write interrupted by a crash: the rename never
            # happened, so the spool itself is intact.
            with contextlib.suppress(OSError):
                leftover.unlink()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            log.error("alert spool %s unreadable (%s): setting it aside", path, error)
            self._set_aside(path)
            return {}
        try:
            tracked = _parse_spool(json.loads(raw), receiver_name)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.error("alert spool %s is corrupt (%s): setting it aside", path, error)
            self._set_aside(path)
            return {}
        pending = sum(len(t.pending) for t in tracked.values())
        if tracked:
            log.info(
                "alert receiver %s: %d alert(s) from the spool, %d state(s) undelivered",
                receiver_name,
                len(tracked),
                pending,
            )
        return tracked

    def _set_aside(self, path: Path) -> None:
        try:
            set_aside(path, "alert spool unreadable, kept for inspection")
        except OSError as error:
            log.error("cannot set %s aside: %s", path, error)

    def _warn_about_orphan_spools(self) -> None:
        known = {state.spool_path.name for state in self._receivers.values()}
        for path in sorted(self._spool_dir.glob("*.json")):
            if path.name not in known:
                log.warning(
                    "alert spool %s belongs to no configured receiver: its alerts will not "
                    "be delivered (remove it once it is no longer needed)",
                    path,
                )

    def _reconcile_receivers(self) -> None:
        """Brings every receiver to the newest known state of every key: they can differ
        after a crash between two spool writes, and a new receiver must learn what fires."""
        keys = {key for state in self._receivers.values() for key in state.tracked}
        for key in sorted(keys):
            newest = self._newest_change(key)
            if newest is None:
                continue
            for state in self._receivers.values():
                tracked = state.tracked.get(key)
                own = tracked.newest() if tracked is not None else None
                if own is not None and own.enqueued_at >= newest.enqueued_at:
                    continue
                if own is None and not newest.alert.firing:
                    # It either got the resolved state already or never knew the alert.
                    continue
                if tracked is None:
                    tracked = state.tracked[key] = _TrackedAlert()
                self._enqueue(state, tracked, _StateChange(newest.alert, newest.enqueued_at))
                self._persist(state)


def _write_spool(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    write_atomic(path, data)


def post_json(receiver: AlertReceiver, body: bytes) -> None:
    """POSTs ``body`` to the receiver (blocking: run it in a thread). Raises DeliveryError
    unless the receiver answers 2xx."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"spaceguard/{__version__}",
    }
    if receiver.bearer_token is not None:
        headers["Authorization"] = f"Bearer {receiver.bearer_token}"
    elif receiver.basic_auth is not None:
        user, password = receiver.basic_auth
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {credentials}"
    request = urllib.request.Request(receiver.endpoint, data=body, headers=headers, method="POST")
    proxies = {"http": receiver.proxy, "https": receiver.proxy} if receiver.proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(request, timeout=receiver.timeout_s) as response:
            # The answer does not matter, but reading it lets the connection close cleanly.
            response.read(RESPONSE_READ_LIMIT_BYTES)
    except urllib.error.HTTPError as error:
        detail = ""
        with contextlib.suppress(OSError, http.client.HTTPException):
            detail = error.read(ERROR_BODY_LOG_BYTES).decode("utf-8", "replace").strip()
        raise DeliveryError(f"HTTP {error.code} {error.reason}: {detail}".rstrip(": ")) from None
    except urllib.error.URLError as error:
        raise DeliveryError(str(error.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise DeliveryError(f"{type(error).__name__}: {error}") from None


def rfc3339(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _alert_to_json(alert: GuardAlert) -> dict[str, Any]:
    return {
        "key": alert.key,
        "name": alert.name,
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "starts_at": alert.starts_at,
        "ends_at": alert.ends_at,
    }


def _change_to_json(change: _StateChange) -> dict[str, Any]:
    return {"alert": _alert_to_json(change.alert), "enqueued_at": change.enqueued_at}


def _alert_from_json(raw: Any) -> GuardAlert:
    if not isinstance(raw, dict):
        raise TypeError("alert is not an object")
    labels, annotations = raw["labels"], raw["annotations"]
    if not isinstance(labels, dict) or not isinstance(annotations, dict):
        raise TypeError("labels and annotations must be objects")
    ends_at = raw["ends_at"]
    return GuardAlert(
        key=_expect(raw["key"], str),
        name=_expect(raw["name"], str),
        labels=labels,
        annotations=annotations,
        starts_at=_number(raw["starts_at"]),
        ends_at=None if ends_at is None else _number(ends_at),
    )


def _change_from_json(raw: Any) -> _StateChange:
    if not isinstance(raw, dict):
        raise TypeError("state is not an object")
    return _StateChange(_alert_from_json(raw["alert"]), _number(raw["enqueued_at"]))


def _parse_spool(document: Any, receiver_name: str) -> dict[str, _TrackedAlert]:
    if not isinstance(document, dict):
        raise TypeError("spool is not an object")
    if document.get("format") != SPOOL_FORMAT or document.get("version") != SPOOL_VERSION:
        raise ValueError(f"not a version {SPOOL_VERSION} {SPOOL_FORMAT}")
    if document.get("receiver") != receiver_name:
        raise ValueError(f"spool of receiver {document.get('receiver')!r}")
    result: dict[str, _TrackedAlert] = {}
    for entry in _expect(document["alerts"], list):
        key = _expect(entry["key"], str)
        pending = [_change_from_json(raw) for raw in _expect(entry["pending"], list)]
        delivered_raw = entry["delivered_firing"]
        delivered = None if delivered_raw is None else _change_from_json(delivered_raw)
        if any(change.alert.key != key for change in pending) or (
            delivered is not None and (delivered.alert.key != key or not delivered.alert.firing)
        ):
            raise ValueError(f"inconsistent spool entry {key!r}")
        tracked = _TrackedAlert(pending=pending, delivered_firing=delivered)
        if key in result or tracked.is_done():
            raise ValueError(f"duplicate or empty spool entry {key!r}")
        result[key] = tracked
    return result


def _expect(value: Any, expected_type: type[_T]) -> _T:
    if not isinstance(value, expected_type):
        raise TypeError(f"expected {expected_type.__name__}, got {type(value).__name__}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)
