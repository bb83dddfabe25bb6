"""What passes the check starts: any configuration that `config.parse` accepts builds every
runtime object the guard makes from it (the Guard itself: state store, alert sender, control
server, D-Bus client; compiled rules; volume samplers) without an exception.

`spaceguard check-config`, the control socket's check-config and the daemon's start and
reload all go through `config.load`; this test is what keeps that one path honest.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spaceguard.config import Config, ConfigError, parse
from spaceguard.volumes import VolumeSampler, poll_interval

ODD_VALUES: list[Any] = [
    0,
    -1,
    1,
    0.0,
    0.5,
    1e-9,
    1e309,
    2**63,
    True,
    "",
    " ",
    "0",
    "0s",
    "1ms",
    "500ms",
    "0.9s",
    "1s",
    "30s",
    "1h",
    "1%",
    "0%",
    "100%",
    "101%",
    "5GiB",
    "0B",
    "1B",
    ".am",
    "am",
    "a" * 65,
    "alice\n",
    "x.service",
    "x.service\n",
    "/var/lib/x.json",
    "@.service",
    "http://127.0.0.1:1",
    "ftp://x",
    "https://h/\n",
    "(",
    "[a-",
    "debug",
    "notice",
    "freeze",
    "stop",
    "thaw",
    [],
    {},
    ["a"],
]

KEYS: list[tuple[str, ...]] = [
    ("guard", "metrics_listen"),
    ("guard", "log_level"),
    ("guard", "log_recheck_interval"),
    ("guard", "reader_group"),
    ("guard", "bus_address"),
    ("volumes", "space", "pause_below"),
    ("volumes", "space", "resume_above"),
    ("volumes", "space", "pause_below_inodes"),
    ("volumes", "space", "resume_above_inodes"),
    ("volumes", "space", "resume_after"),
    ("volumes", "space", "predict"),
    ("volumes", "space", "max_write_speed"),
    ("volumes", "space", "poll_min"),
    ("volumes", "space", "poll_max"),
    ("volumes", "space", "require_mount"),
    ("volumes", "space", "usage_interval"),
    ("volumes", "space", "usage_depth"),
    ("volumes", "space", "usage_top"),
    ("volumes", "space", "usage_budget"),
    ("volumes", "space", "usage_max_entries"),
    ("volumes", "space", "usage_old_after"),
    ("volumes", "space", "warn_below"),
    ("volumes", "space", "warn_after"),
    ("volumes", "space", "admit_below"),
    ("volumes", "space", "max_freeze"),
    ("volumes", "space", "resume_batch"),
    ("volumes", "space", "resume_step"),
    ("volumes", "space", "slice"),
    ("migrations", 0, "account"),
    ("migrations", 0, "unit"),
    ("migrations", 0, "pause"),
    ("migrations", 0, "resume_unit"),
    ("migrations", 0, "stall_after"),
    ("migrations", 0, "max_retries"),
    ("migrations", 0, "retry_backoff"),
    ("migrations", 0, "retry_backoff_max"),
    ("migrations", 0, "verify_unit"),
    ("migrations", 0, "verify_timeout"),
    ("migrations", 0, "verify_command"),
    ("migrations", 0, "size_unit"),
    ("migrations", 0, "size_file"),
    ("migrations", 0, "size_timeout"),
    ("migrations", 0, "expected_size"),
    ("migrations", 0, "admission"),
    ("migrations", 0, "priority"),
    ("migrations", 0, "max_freeze"),
    ("rules", 0, "name"),
    ("rules", 0, "pattern"),
    ("rules", 0, "class"),
    ("alerts", "resend_interval"),
    ("alerts", "max_backoff"),
    ("alerts", "generator_url"),
    ("alerts", "labels"),
    ("alerts", "receivers", 0, "name"),
    ("alerts", "receivers", 0, "kind"),
    ("alerts", "receivers", 0, "url"),
    ("alerts", "receivers", 0, "timeout"),
    ("alerts", "receivers", 0, "proxy"),
]


def base_document(tmp: Path) -> dict[str, Any]:
    return {
        "guard": {
            "state_dir": str(tmp / "state"),
            "control_socket": str(tmp / "control.sock"),
            "metrics_listen": "127.0.0.1:9839",
        },
        "volumes": {"space": {"path": str(tmp), "require_mount": False}},
        "migrations": [
            {
                "account": "alice",
                "unit": "m365-migrate@alice.service",
                "volume": "space",
                "resume_unit": "m365-migrate-resume@alice.service",
                "log": str(tmp / "alice.log"),
            }
        ],
        "rules": [{"name": "custom", "pattern": "quota exceeded", "class": "transient"}],
        "alerts": {
            "receivers": [{"name": "am", "kind": "alertmanager", "url": "http://127.0.0.1:9093"}]
        },
    }


def put(document: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def build_everything(document: dict[str, Any], tmp: Path) -> None:
    """Parse; if accepted, build what the daemon builds from the config."""
    from spaceguard.daemon import Guard

    try:
        config = parse(tmp / "spaceguard.toml", document)
    except ConfigError:
        return

    async def build() -> None:
        guard = Guard(tmp / "spaceguard.toml", config)
        guard._rules(config)
        for volume in config.volumes.values():
            VolumeSampler(volume, lambda event: None, lambda: False)
            poll_interval(volume, _usage(), 0.0, False)
            guard.consumers.request(volume)
        guard.store.close()

    asyncio.run(build())
    drive_policy(config)


def drive_policy(config: Config) -> None:
    """An episode of the pure policy under this config: the migrations run, every volume
    runs low and recovers, a migration fails; the clock doubles its steps up to 36 h, so
    every timer the config sets (hold-down, resume steps, max_freeze, backoffs) comes due.
    Every action is carried out at once. Whatever the checker accepts must not crash it."""
    from spaceguard.model import (
        ActionDone,
        BusChanged,
        RunVerify,
        Tick,
        UnitAction,
        UnitChanged,
        UnitView,
        VolumeSampled,
    )
    from spaceguard.policy import decide, initial_state

    now = 1_750_000_000.0
    state = initial_state(config)
    running = UnitView("active", "running", started_at=now)
    after = {
        "freeze": UnitView("active", "running", freezer_state="frozen", started_at=now),
        "thaw": running,
        "stop": UnitView("inactive", "dead", result="success"),
        "start": running,
    }

    def run(event: object) -> None:
        nonlocal state
        queue = [event]
        for _ in range(1000):
            if not queue:
                return
            state, actions = decide(config, state, queue.pop(0), now)  # type: ignore[arg-type]
            for action in actions:
                if isinstance(action, RunVerify):
                    queue.append(ActionDone(action, True))
                elif isinstance(action, UnitAction):  # systemd does it, then says so
                    queue += [
                        ActionDone(action, True),
                        UnitChanged(action.unit, after[action.kind]),
                    ]

    def sample(name: str, free: float) -> VolumeSampled:
        return VolumeSampled(name, int(free * 10**10), 10**10, int(free * 10**6), 10**6, 10**6)

    run(BusChanged(True))
    for migration in config.migrations:
        for unit in migration.units:
            run(UnitChanged(unit, running))
    for name in config.volumes:
        run(sample(name, 0.001))
    step = 1.0
    while step < 36 * 3600:
        now += step
        step *= 2
        for name in config.volumes:
            run(sample(name, 0.9 if step > 64 else 0.001))
        if step == 256:
            unit = config.migrations[0].unit
            run(
                UnitChanged(unit, UnitView("failed", "failed", "running", "exit-code", "exited", 1))
            )
        run(Tick())


def _usage() -> Any:
    from spaceguard.volumes import Usage

    return Usage(avail_bytes=10**9, size_bytes=10**10, avail_files=10**5, files=10**6, fsid=1)


def test_the_reference_document_builds(tmp_path: Path) -> None:
    build_everything(base_document(tmp_path), tmp_path)


@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(KEYS), st.sampled_from(ODD_VALUES)), min_size=1, max_size=3
    )
)
def test_whatever_the_checker_accepts_builds(
    tmp_path: Path, changes: list[tuple[tuple[str, ...], Any]]
) -> None:
    document = base_document(tmp_path)
    for path, value in changes:
        put(document, path, copy.deepcopy(value))
    build_everything(document, tmp_path)


def test_the_policy_episode_reaches_the_staggered_release(tmp_path: Path) -> None:
    """drive_policy can find what crashes only later: the release after a recovery."""
    config = parse(tmp_path / "spaceguard.toml", base_document(tmp_path))
    from spaceguard import policy

    calls: list[str] = []
    real = policy._Decision._release_slot

    def counted(self: Any, migration: Any, state: Any) -> bool:
        calls.append(migration.account)
        return real(self, migration, state)

    policy._Decision._release_slot = counted  # type: ignore[method-assign]
    try:
        drive_policy(config)
    finally:
        policy._Decision._release_slot = real  # type: ignore[method-assign]
    assert "alice" in calls


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("alerts", "receivers", 0, "name"), ".am"),
        (("alerts", "receivers", 0, "timeout"), 0),
        (("alerts", "resend_interval"), 0),
        (("alerts", "max_backoff"), "500ms"),
        (("migrations", 0, "unit"), "m365-migrate@alice.service\n"),
        (("migrations", 0, "account"), "alice\n"),
        (("volumes", "space", "resume_step"), "0s"),
    ],
)
def test_values_that_used_to_pass_the_check_and_crash_the_guard_are_refused(
    tmp_path: Path, path: tuple[str, ...], value: Any
) -> None:
    document = base_document(tmp_path)
    put(document, path, value)
    with pytest.raises(ConfigError) as error:
        parse(tmp_path / "spaceguard.toml", document)
    assert str(path[-1]) in str(error.value)
