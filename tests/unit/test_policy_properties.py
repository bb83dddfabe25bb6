"""Property tests of policy.decide(): random event sequences against a faithful fake systemd.

A `World` holds the truth (what each unit is doing, which actions are in flight, what the
volume looked like); hypothesis drives it with random commands (samples around the
thresholds, ticks, action completions in either order with their unit signals, outside
interference, bus drops, operator requests, log lines, guard restarts). After every
decision the safety rules of DESIGN.md are checked:

(a) never an action on a unit the config does not name;
(b) an operator hold ends only by an operator's hand (a resume request, or a person
    thawing/starting the unit), and nothing is thawed/started while a hold is set;
(c) a guard hold on space is released only after the volume's last sample is back above
    resume_above (bytes and inodes) for resume_after; nothing resumes on a low volume
    unless an operator overrode the guard;
(d) no flapping inside the hysteresis band (separate test);
(e) at most one action in flight per unit (and one verification per migration);
(f) decide() never raises and never mutates its input;
(g) every guard hold is visible: its "paused" alert fires while it lasts, and a "paused"
    alert does not keep firing for a migration that is running again;
(h) the durable part of the state survives StateStore save + load, and a restart from it
    keeps every rule above.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spaceguard.config import Config, parse
from spaceguard.model import (
    Action,
    ActionDone,
    BusChanged,
    FailureClass,
    GuardState,
    LogEvidence,
    LogParsed,
    OperatorRequest,
    RaiseAlert,
    Reply,
    ResolveAlert,
    RunVerify,
    Tick,
    UnitAction,
    UnitChanged,
    UnitView,
    VolumeSampled,
    VolumeUnavailable,
)
from spaceguard.policy import (
    decide,
    initial_state,
    unit_owner,
)
from spaceguard.state import StateStore, _restore, durable

GiB = 1024**3
MiB = 1024**2
SIZE = 100 * GiB  # pause below 5 GiB, resume above 10 GiB
FILES = 1_000_000  # pause below 10 000 inodes, resume above 20 000
PAUSE, RESUME = 5 * GiB, 10 * GiB
PAUSE_FILES, RESUME_FILES = 10_000, 20_000
RESUME_AFTER = 120.0
T0 = 1_750_000_000.0

ALICE, ALICE_RESUME = "m365-migrate@alice.service", "m365-migrate-resume@alice.service"
BOB, BOB_RESUME = "m365-migrate@bob.service", "m365-migrate-resume@bob.service"
CAROL = "m365-migrate@carol.service"
STRANGER = "sshd.service"
ACCOUNTS = ("alice", "bob", "carol", "mallory")
UNITS = (ALICE, ALICE_RESUME, BOB, BOB_RESUME, CAROL, STRANGER)

CONFIG: Config = parse(
    Path("/etc/spaceguard/prop.toml"),
    {
        "volumes": {
            "space": {
                "path": "/space",
                "pause_below": "5%",
                "resume_above": "10%",
                "pause_below_inodes": "1%",
                "resume_above_inodes": "2%",
                "resume_after": RESUME_AFTER,
                "predict": "10m",
            }
        },
        "migrations": [
            {
                "account": "alice",
                "unit": ALICE,
                "resume_unit": ALICE_RESUME,
                "volume": "space",
                "stall_after": "30m",
                "max_retries": 2,
                "retry_backoff": "1m",
                "verify_command": ["rclone", "check", "m365-alice:", "/space/alice"],
            },
            {
                "account": "bob",
                "unit": BOB,
                "resume_unit": BOB_RESUME,
                "volume": "space",
                "pause": "stop",
                "max_retries": 2,
                "retry_backoff": "30s",
            },
            {"account": "carol", "unit": CAROL, "volume": "space"},
        ],
    },
)
CONFIGURED = {unit for m in CONFIG.migrations for unit in m.units}

RUNNING = UnitView("active", "running")
DEAD = UnitView("inactive", "dead", result="success")


def failed(status: int, code: str = "exited") -> UnitView:
    return UnitView("failed", "failed", result="exit-code", exec_code=code, exec_status=status)


# --- the world --------------------------------------------------------------------------


@dataclass
class World:
    state: GuardState
    now: float = T0
    views: dict[str, UnitView] = field(default_factory=dict)
    inflight: list[UnitAction | RunVerify] = field(default_factory=list)
    bus: bool = True
    # the volume as the guard was last told: (avail bytes, avail files) or None (unavailable)
    last_sample: tuple[int, int] | None = None
    above_since: float | None = None  # since when samples are continuously ≥ resume_above
    firing: set[str] = field(default_factory=set)
    holds_taken: dict[str, int] = field(default_factory=dict)
    resumes: int = 0  # thaws and starts after a pause for space (not retries)
    guard_frozen: set[str] = field(default_factory=set)  # frozen by a freeze the guard asked for
    log: list[str] = field(default_factory=list)

    # -- feeding the guard, with every check ----------------------------------------------

    def feed(self, event: Any) -> list[Action]:
        before = self.state
        snapshot = pickle.dumps(before)  # much faster than a deepcopy, just as thorough
        new, actions = decide(CONFIG, before, event, self.now)
        assert pickle.dumps(before) == snapshot, "decide() mutated its input state"  # (f)
        self.log.append(f"{self.now - T0:10.2f} {event!r}\n    → {actions!r}")
        self.check(before, new, event, actions)
        self.state = new
        for action in actions:
            if isinstance(action, UnitAction | RunVerify):
                self.inflight.append(action)
            elif isinstance(action, RaiseAlert):
                self.firing.add(action.key)
            elif isinstance(action, ResolveAlert):
                self.firing.discard(action.key)
        self.check_visible()
        return actions

    def check(self, old: GuardState, new: GuardState, event: Any, actions: list[Action]) -> None:
        ok_replies = {a.request_id for a in actions if isinstance(a, Reply) and a.ok}
        for action in actions:
            if isinstance(action, UnitAction):
                # (a) only configured units, on behalf of the migration that owns them
                assert action.unit in CONFIGURED, action
                owner = unit_owner(CONFIG, action.unit)
                assert owner is not None and owner.account == action.account, action
                # (e) one action in flight per unit
                assert all(
                    not (isinstance(f, UnitAction) and f.unit == action.unit) for f in self.inflight
                ), f"{action} while one is in flight"
            if isinstance(action, RunVerify):
                assert all(
                    not (isinstance(f, RunVerify) and f.account == action.account)
                    for f in self.inflight
                ), f"{action} while one is in flight"
        for m in CONFIG.migrations:
            before, after = old.migrations[m.account], new.migrations[m.account]
            resumes = [
                a
                for a in actions
                if isinstance(a, UnitAction)
                and a.account == m.account
                and a.kind in ("thaw", "start")
            ]
            self.resumes += sum(a.reason in ("released", "resume") for a in resumes)
            operator_hand = (
                isinstance(event, OperatorRequest)
                and event.account == m.account
                and event.request_id in ok_replies
            ) or (isinstance(event, UnitChanged) and event.unit in m.units)
            # a finished migration is not started again without an operator's retry
            if any(a.kind == "start" for a in resumes) and not operator_hand:
                assert not after.finished, (m.account, resumes)
            # (b) nothing is resumed while a hold is set
            if resumes:
                assert after.hold is None, (m.account, resumes, after.hold)
            # (b) an operator hold ends only by an operator's hand
            if (
                before.hold is not None
                and before.hold.by == "operator"
                and (after.hold is None or after.hold.by != "operator")
            ):
                assert operator_hand, (m.account, event)
            # (c) a guard hold ends only after the hold-down above resume_above
            if (
                before.hold is not None
                and before.hold.by == "guard"
                and after.hold is None
                and not operator_hand
            ):
                assert self.last_sample is not None, "released while the volume is unavailable"
                avail, files = self.last_sample
                assert avail >= RESUME and files >= RESUME_FILES, (avail, files)
                assert self.above_since is not None
                assert self.now - self.above_since >= RESUME_AFTER, self.now - self.above_since
            # (c) nothing resumes on a low volume unless an operator overrode the guard
            if resumes and new.volumes["space"].low:
                assert after.override, (m.account, resumes)
            # (g) the guard pausing a running unit says so in the same decision (a hold on a
            # migration that is not running is no news until a unit of it runs)
            pauses = [
                a
                for a in actions
                if isinstance(a, UnitAction)
                and a.account == m.account
                and a.kind in ("freeze", "stop")
                and a.reason != "failure"
            ]
            if pauses and after.hold is not None and after.hold.by == "guard":
                assert after.hold.alerted, (m.account, actions)
                assert (
                    before.hold is not None
                    and before.hold.alerted
                    and before.hold.since == after.hold.since
                ) or any(
                    isinstance(a, RaiseAlert) and a.key == f"paused/{m.account}" for a in actions
                ), (m.account, actions)
            if (
                after.hold is not None
                and after.hold.by == "guard"
                and (before.hold is None or before.hold.by != "guard")
            ):
                self.holds_taken[m.account] = self.holds_taken.get(m.account, 0) + 1

    def check_visible(self) -> None:
        """(g) a guard hold is always alerted; a "paused" alert always means paused."""
        for account, m in self.state.migrations.items():
            key = f"paused/{account}"
            if m.hold is not None and m.hold.by == "guard" and m.hold.alerted:
                assert key in self.firing, f"{account} paused by the guard without an alert"
            if (
                m.hold is not None
                and m.hold.by == "guard"
                and any(
                    kind == "freeze" or (kind == "stop" and m.failure is None)
                    for kind in m.pending.values()
                )
            ):
                assert m.hold.alerted, f"{account} being paused by the guard, not alerted"
            if key in self.firing:
                assert m.hold is not None, f"{key} still firing for a running migration"

    # -- the outside world ------------------------------------------------------------------

    def advance(self, dt: float) -> None:
        self.now += dt

    def set_view(self, unit: str, view: UnitView, by_guard: bool = False) -> None:
        if by_guard and view.frozen:
            self.guard_frozen.add(unit)
        elif not view.frozen or self.views.get(unit, view).frozen != view.frozen:
            self.guard_frozen.discard(unit)
        if self.views.get(unit) != view:
            self.views[unit] = view
            self.feed(UnitChanged(unit, view))

    def sample(self, avail: int, files: int, rate: float) -> None:
        self.last_sample = (avail, files)
        if avail >= RESUME and files >= RESUME_FILES:
            if self.above_since is None:
                self.above_since = self.now
        else:
            self.above_since = None
        self.feed(VolumeSampled("space", avail, SIZE, files, FILES, rate))

    def unavailable(self) -> None:
        self.last_sample = None
        self.above_since = None
        self.feed(VolumeUnavailable("space", "/space is not a mount point"))

    def complete(self, index: int, ok: bool, signal_first: bool) -> None:
        """systemd finishes an in-flight action: its effect, its signal, its reply."""
        if not self.inflight:
            return
        action = self.inflight.pop(index % len(self.inflight))
        if isinstance(action, RunVerify):
            self.feed(ActionDone(action, ok, "" if ok else "exit status 1"))
            return
        view = self.views[action.unit]
        effect: UnitView | None = None
        error = "" if ok else "org.freedesktop.DBus.Error.Timeout"
        if ok:
            match action.kind:
                case "freeze" if view.running:
                    effect = replace(view, freezer_state="frozen")
                case "thaw" if view.active_state == "active":
                    effect = replace(view, freezer_state="running")
                case "stop":
                    effect = DEAD
                case "start":
                    effect = view if view.running else RUNNING
                case _:
                    ok, error = False, f"Unit {action.unit} is not active."
        if effect is not None and signal_first:
            self.set_view(action.unit, effect, by_guard=True)
        self.feed(ActionDone(action, ok, error))
        if effect is not None and not signal_first:
            self.set_view(action.unit, effect, by_guard=True)

    def meddle(self, unit: str, what: str) -> None:
        """Someone (a person, a crash, the migration finishing) changes a unit."""
        view = self.views[unit]
        active = view.active_state == "active"
        match what:
            case "thaw" if view.frozen:
                self.set_view(unit, replace(view, freezer_state="running"))
            case "freeze" if active:
                self.set_view(unit, replace(view, freezer_state="frozen"))
            case "stop" if active:
                self.set_view(unit, DEAD)
            case "start" if not active:
                self.set_view(unit, RUNNING)
            case "exit1" if active and not view.frozen:
                self.set_view(unit, failed(1))
            case "exit5" if active and not view.frozen:
                self.set_view(unit, failed(5))
            case "killed" if active:
                self.set_view(unit, failed(9, "killed"))
            case "finish" if active and not view.frozen:
                self.set_view(unit, DEAD)

    def restart(self) -> None:
        """The guard restarts: durable state through a real StateStore; in-flight jobs
        finish without anyone hearing back; the unit watcher reports every unit."""
        with tempfile.TemporaryDirectory() as directory:
            store = StateStore(Path(directory))
            assert store.save(self.state, {"alice": {"inode": 1, "offset": 2}})
            loaded = StateStore(Path(directory)).load()
        assert loaded is not None
        assert durable(loaded.state) == durable(self.state)  # (h)
        assert loaded.log_positions == {"alice": {"inode": 1, "offset": 2}}
        for action in self.inflight:
            if isinstance(action, UnitAction):
                view = self.views[action.unit]
                if action.kind == "freeze" and view.running:
                    self.views[action.unit] = replace(view, freezer_state="frozen")
                    self.guard_frozen.add(action.unit)
                elif action.kind == "thaw" and view.active_state == "active":
                    self.views[action.unit] = replace(view, freezer_state="running")
                    self.guard_frozen.discard(action.unit)
                elif action.kind == "stop":
                    self.views[action.unit] = DEAD
                    self.guard_frozen.discard(action.unit)
                elif action.kind == "start" and not view.running:
                    self.views[action.unit] = RUNNING
        self.inflight.clear()
        self.state = initial_state(CONFIG, loaded.state)
        self.log.append(f"{self.now - T0:10.2f} RESTART")
        self.feed(BusChanged(self.bus))
        for unit, view in sorted(self.views.items()):
            self.feed(UnitChanged(unit, view))

    def calm(self) -> None:
        """The storm passes: the bus is up, space is back, every job completes, operators
        resume what they paused. The guard must then leave nothing frozen or stopped that
        it paused (liveness: it never forgets what it paused)."""
        if not self.bus:
            self.bus = True
            self.feed(BusChanged(True))
        for round_ in range(8):
            while self.inflight:
                self.complete(0, True, round_ % 2 == 0)
            self.advance(1.0)
            self.sample(50 * GiB, FILES // 2, 0.0)
            self.advance(RESUME_AFTER + 60)
            self.feed(Tick())
            for account, m in self.state.migrations.items():
                # no unexplained pause: whatever is frozen is shown as held by someone
                for unit, view in m.units.items():
                    if view.frozen and view.running and unit not in m.pending:
                        assert m.hold is not None, f"{unit} frozen, no hold shown"
                # operators resume what they paused, and what nobody could explain
                if m.hold is not None and m.hold.by in ("operator", "unknown"):
                    self.feed(OperatorRequest(f"calm{round_}", "resume", account, force=True))
        assert not self.inflight
        assert not self.guard_frozen, f"left frozen by the guard: {self.guard_frozen}"
        for account, m in self.state.migrations.items():
            assert m.hold is None, account
            assert not m.paused_units, (account, m.paused_units)
            assert not m.pending, (account, m.pending)


def new_world() -> World:
    world = World(state=initial_state(CONFIG))
    world.feed(BusChanged(True))
    for unit in UNITS:
        world.set_view(unit, RUNNING if unit in (ALICE, BOB, CAROL, STRANGER) else DEAD)
    return world


# --- commands ---------------------------------------------------------------------------

AVAILS = st.one_of(
    st.sampled_from(
        [
            0,
            PAUSE - 1,
            PAUSE,
            PAUSE + 1,
            7 * GiB,
            RESUME - 1,
            RESUME,
            RESUME + 1,
            12 * GiB,
            50 * GiB,
        ]
    ),
    st.integers(min_value=0, max_value=20 * GiB),
)
FILES_FREE = st.sampled_from(
    [
        FILES // 2,
        FILES // 2,
        FILES // 2,
        PAUSE_FILES - 1,
        PAUSE_FILES,
        RESUME_FILES - 1,
        RESUME_FILES,
    ]
)
RATES = st.sampled_from([0.0, 0.0, -MiB, MiB, 20 * MiB, GiB])
DT = st.sampled_from([0.0, 0.001, 0.25, 1.0, 5.0, 60.0, 119.0, 120.0, 121.0, 600.0, 1900.0])

COMMAND = st.one_of(
    st.tuples(st.just("sample"), AVAILS, FILES_FREE, RATES, DT),
    st.tuples(st.just("sample"), AVAILS, FILES_FREE, RATES, DT),
    st.tuples(st.just("sample"), AVAILS, FILES_FREE, RATES, DT),
    st.tuples(st.just("unavailable"), DT),
    st.tuples(st.just("tick"), DT),
    st.tuples(st.just("tick"), DT),
    st.tuples(st.just("complete"), st.integers(0, 7), st.booleans(), st.booleans(), DT),
    st.tuples(st.just("complete"), st.integers(0, 7), st.just(True), st.booleans(), DT),
    st.tuples(st.just("complete"), st.integers(0, 7), st.just(True), st.booleans(), DT),
    st.tuples(
        st.just("meddle"),
        st.sampled_from(UNITS),
        st.sampled_from(["thaw", "freeze", "stop", "start", "exit1", "exit5", "killed", "finish"]),
        DT,
    ),
    st.tuples(st.just("bus"), st.booleans(), DT),
    st.tuples(
        st.just("operator"),
        st.sampled_from(["pause", "resume", "retry"]),
        st.sampled_from(ACCOUNTS),
        st.booleans(),
        DT,
    ),
    st.tuples(
        st.just("log"),
        st.sampled_from(ACCOUNTS),
        st.sampled_from(["progress", "unrecoverable", "transient", "disk_full"]),
        DT,
    ),
    st.tuples(st.just("restart"), DT),
)


def run(world: World, commands: list[tuple[Any, ...]]) -> None:
    for number, command in enumerate(commands):
        kind, *args = command
        world.advance(args[-1])
        match kind:
            case "sample":
                world.sample(args[0], args[1], args[2])
            case "unavailable":
                world.unavailable()
            case "tick":
                world.feed(Tick())
            case "complete":
                world.complete(args[0], args[1], args[2])
            case "meddle":
                world.meddle(args[0], args[1])
            case "bus":
                world.bus = args[0]
                world.feed(BusChanged(args[0]))
            case "operator":
                verb, account, force = args[0], args[1], args[2]
                world.feed(OperatorRequest(f"r{number}", verb, account, force=force))
            case "log":
                account, what = args[0], args[1]
                if what == "progress":
                    world.feed(LogParsed(account, progressed=True, transferred_bytes=number))
                else:
                    world.feed(
                        LogParsed(
                            account,
                            (LogEvidence(FailureClass(what), f"rule-{what}", f"line {number}"),),
                        )
                    )
            case "restart":
                world.restart()


def durable_round_trip(state: GuardState) -> None:
    """(h) without the file system: JSON text → restored state → the same durable data."""
    data = json.loads(json.dumps(durable(state)))
    assert durable(_restore(data)) == durable(state)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(COMMAND, min_size=1, max_size=80))
def test_random_event_sequences_keep_the_safety_rules(commands: list[tuple[Any, ...]]) -> None:
    world = new_world()
    try:
        run(world, commands)
        durable_round_trip(world.state)
        world.restart()
        world.calm()
    except AssertionError:
        print("\n".join(line[:300] for line in world.log[-30:]))
        raise


# --- (d) no flapping inside the hysteresis band -----------------------------------------------

BAND = st.integers(min_value=PAUSE, max_value=RESUME - 1)
BAND_COMMAND = st.one_of(
    st.tuples(st.just("sample"), BAND, st.just(FILES // 2), RATES, DT),
    st.tuples(st.just("sample"), BAND, st.just(FILES // 2), RATES, DT),
    st.tuples(st.just("tick"), DT),
    st.tuples(st.just("complete"), st.integers(0, 7), st.just(True), st.booleans(), DT),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(BAND_COMMAND, min_size=1, max_size=80))
def test_no_flapping_inside_the_band(commands: list[tuple[Any, ...]]) -> None:
    world = new_world()
    try:
        run(world, commands)
    except AssertionError:
        print("\n".join(line[:300] for line in world.log[-30:]))
        raise
    assert all(count <= 1 for count in world.holds_taken.values()), world.holds_taken
    assert world.resumes == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=RESUME - 1), DT), min_size=1, max_size=60)
)
def test_one_pause_however_the_samples_move_below_resume_above(
    samples: list[tuple[int, float]],
) -> None:
    """Once paused, anything below resume_above keeps the pause, and never re-pauses."""
    world = new_world()
    world.sample(PAUSE - 1, FILES // 2, 0.0)
    for avail, dt in samples:
        world.advance(dt)
        world.sample(avail, FILES // 2, 0.0)
        world.complete(0, True, False)
    assert world.holds_taken == {"alice": 1, "bob": 1, "carol": 1}
    assert world.resumes == 0
