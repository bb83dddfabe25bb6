"""The size probe (issue 14, "will it fit?"), pure: a migration whose size nobody states is
held before it writes ("sizing") while its size_unit measures it; the answer decides its
admission; a probe that fails or takes too long never blocks it. And the probe's file,
read strictly (sizeprobe.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from spaceguard.model import (
    BusChanged,
    ClockStepped,
    LogParsed,
    OperatorRequest,
    RaiseAlert,
    ResolveAlert,
    RunSize,
    SizeMeasured,
    Tick,
    UnitChanged,
)
from spaceguard.sizeprobe import MAX_SIZE_FILE, SizeFileError, read_size_file
from spaceguard.watermarks import remaining_bytes
from test_planning import DEAD, FROZEN, RUNNING, GiB, boot, planned, sample, start
from test_policy import Guard, of_type, unit_actions

ALICE = "m@alice.service"
PROBE = "s@alice.service"


def sized(**keys: Any) -> dict[str, Any]:
    return {"size_unit": PROBE, "size_file": "/var/lib/m/alice.json", "size_timeout": "10m", **keys}


def probes(actions: list[Any]) -> list[RunSize]:
    return of_type(actions, RunSize)


def held(guard: Guard, account: str = "alice") -> str | None:
    hold = guard.m(account).hold
    return hold.reason if hold else None


def sizing_alice(volume_gib: float = 50, **keys: Any) -> Guard:
    """alice's unit has started with no size known: held (frozen) while probed."""
    guard = boot(planned(alice=sized(**keys)), avail=volume_gib)
    actions = start(guard, "alice")
    assert unit_actions(actions) == [("freeze", ALICE, "sizing")]
    assert probes(actions) == [RunSize("alice", PROBE, "/var/lib/m/alice.json", 600.0)]
    assert not [a for a in of_type(actions, RaiseAlert) if a.key == "paused/alice"]
    guard.done("freeze", ALICE)
    guard(UnitChanged(ALICE, FROZEN))
    return guard


def test_an_unsized_start_is_held_while_probed_and_released_when_it_fits() -> None:
    guard = sizing_alice()
    assert held(guard) == "sizing"
    assert probes(guard(Tick(), after=1)) == []  # one probe in flight, not one per event
    actions = guard(SizeMeasured("alice", 30 * GiB), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(actions)
    assert held(guard) is None and guard.m("alice").admitted == "yes"
    assert remaining_bytes(guard.config.migrations[0], guard.m("alice")) == 30 * GiB
    guard(LogParsed("alice", transferred_bytes=10 * GiB), after=1)
    assert remaining_bytes(guard.config.migrations[0], guard.m("alice")) == 20 * GiB
    # rclone's own totals win once they come
    guard(LogParsed("alice", transferred_bytes=11 * GiB, total_bytes=12 * GiB), after=1)
    assert remaining_bytes(guard.config.migrations[0], guard.m("alice")) == GiB


def test_a_probed_size_that_does_not_fit_is_an_admission_hold_with_its_numbers() -> None:
    guard = sizing_alice()
    actions = guard(SizeMeasured("alice", 60 * GiB), after=1)
    assert unit_actions(actions) == []  # stays frozen
    assert held(guard) == "admission"
    (alert,) = [a for a in of_type(actions, RaiseAlert) if a.key == "paused/alice"]
    assert alert.name == "SpaceguardMigrationNotAdmitted"
    assert alert.labels["reason"] == "admission"
    assert "alice needs 60.0 GiB more; 45.0 GiB free after the others" in alert.description
    assert unit_actions(guard(sample(60), after=1)) == []  # 55 GiB above pause: short
    actions = guard(sample(70), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(actions)
    assert ResolveAlert("paused/alice") in actions


def test_a_failed_probe_admits_provisionally_with_a_warning() -> None:
    guard = sizing_alice()
    actions = guard(SizeMeasured("alice", None, "/var/lib/m/alice.json: not JSON"), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(actions)
    warnings = [a.message for a in actions if getattr(a, "level", "") == "warning"]
    assert any("size probe failed: /var/lib/m/alice.json: not JSON" in w for w in warnings)
    assert guard.m("alice").admitted == "provisional" and held(guard) is None
    guard.done("thaw", ALICE)
    guard(UnitChanged(ALICE, RUNNING))
    assert probes(guard(Tick(), after=1)) == []  # not probed again in this run
    # judged again once rclone says its totals, as any run of unknown size
    actions = guard(LogParsed("alice", transferred_bytes=0, total_bytes=80 * GiB), after=1)
    assert unit_actions(actions) == [("freeze", ALICE, "admission")]


def test_a_probe_that_takes_too_long_is_given_up_and_a_late_answer_still_counts() -> None:
    guard = sizing_alice()
    assert unit_actions(guard(Tick(full=False), after=599)) == []
    actions = guard(Tick(full=False), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(actions)
    warnings = [a.message for a in actions if getattr(a, "level", "") == "warning"]
    assert any("s@alice.service gave no result within 600s" in w for w in warnings), warnings
    assert guard.m("alice").admitted == "provisional"
    guard.done("thaw", ALICE)
    guard(UnitChanged(ALICE, RUNNING))
    # the probe is still in flight: a new run of the unit does not start another one
    guard(UnitChanged(ALICE, DEAD), after=1)
    assert probes(guard(UnitChanged(ALICE, RUNNING), after=1)) == []
    # its late answer is used: 60 GiB do not fit
    actions = guard(SizeMeasured("alice", 60 * GiB), after=1)
    assert unit_actions(actions) == [("freeze", ALICE, "admission")]


def test_a_sizing_hold_and_its_probe_survive_a_restart() -> None:
    from test_policy import restarted

    guard = sizing_alice()
    guard = restarted(guard)
    assert held(guard) == "sizing"
    guard(UnitChanged(ALICE, FROZEN))
    guard(UnitChanged("r@alice.service", DEAD))
    actions = guard(sample(50), after=1)
    # the answer died with the old process: asked again
    assert probes(actions) == [RunSize("alice", PROBE, "/var/lib/m/alice.json", 600.0)]
    actions = guard(SizeMeasured("alice", GiB), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(actions)


def test_a_probe_waits_for_the_bus() -> None:
    guard = boot(planned(alice=sized()))
    guard(BusChanged(False))
    actions = guard(UnitChanged(ALICE, RUNNING), after=1)
    assert probes(actions) == [] and held(guard) == "sizing"
    assert probes(guard(BusChanged(True), after=1)) == [
        RunSize("alice", PROBE, "/var/lib/m/alice.json", 600.0)
    ]


def test_an_operator_resume_overrides_the_sizing_hold() -> None:
    guard = sizing_alice()
    actions = guard(OperatorRequest("r", "resume", "alice", force=True), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(actions)
    assert guard.m("alice").admitted == "forced"
    # its answer is kept (shown, used by the others' sums), and holds nothing this run
    assert unit_actions(guard(SizeMeasured("alice", 60 * GiB), after=1)) == []
    assert held(guard) is None


def test_the_answer_serves_a_start_soon_after_and_a_later_run_is_measured_again() -> None:
    guard = sizing_alice()
    guard(SizeMeasured("alice", 10 * GiB), after=1)
    guard.done("thaw", ALICE)
    guard(UnitChanged(ALICE, RUNNING))
    guard(UnitChanged(ALICE, DEAD), after=60)
    actions = guard(UnitChanged(ALICE, RUNNING), after=60)  # 2 minutes after the answer
    assert probes(actions) == [] and unit_actions(actions) == []
    assert guard.m("alice").admitted == "yes"
    guard(UnitChanged(ALICE, DEAD), after=60)
    actions = guard(UnitChanged(ALICE, RUNNING), after=600)  # past size_timeout: stale
    assert unit_actions(actions) == [("freeze", ALICE, "sizing")]
    assert len(probes(actions)) == 1


def test_in_stop_mode_the_resumed_run_is_admitted_on_the_same_answer() -> None:
    guard = boot(planned(alice=sized(pause="stop")))
    actions = start(guard, "alice")
    assert unit_actions(actions) == [("stop", ALICE, "sizing")]
    guard.done("stop", ALICE)
    guard(UnitChanged(ALICE, DEAD))
    actions = guard(SizeMeasured("alice", 10 * GiB), after=1)
    assert unit_actions(actions) == [("start", "r@alice.service", "resume")]
    guard.done("start", "r@alice.service")
    actions = guard(UnitChanged("r@alice.service", RUNNING), after=1)
    assert probes(actions) == [] and unit_actions(actions) == []
    assert guard.m("alice").admitted == "yes"


def test_a_failed_probe_in_stop_mode_does_not_loop() -> None:
    guard = boot(planned(alice=sized(pause="stop")))
    start(guard, "alice")
    guard.done("stop", ALICE)
    guard(UnitChanged(ALICE, DEAD))
    actions = guard(SizeMeasured("alice", None, "job failed"), after=1)
    assert unit_actions(actions) == [("start", "r@alice.service", "resume")]
    guard.done("start", "r@alice.service")
    actions = guard(UnitChanged("r@alice.service", RUNNING), after=1)
    assert probes(actions) == [] and unit_actions(actions) == []
    assert guard.m("alice").admitted == "provisional"


def test_a_clock_step_keeps_the_probes_timeout() -> None:
    guard = sizing_alice()
    guard(ClockStepped(-3600.0), at=guard.now - 3600)
    assert unit_actions(guard(Tick(full=False), after=590)) == []
    assert ("thaw", ALICE, "released") in unit_actions(guard(Tick(full=False), after=10))


def test_without_a_size_unit_nothing_is_probed() -> None:
    guard = boot(planned(alice={}))
    actions = start(guard, "alice")
    assert probes(actions) == [] and unit_actions(actions) == []


def test_below_admit_below_no_probe_is_needed_yet() -> None:
    guard = boot(planned({"admit_below": "20%"}, alice=sized()), avail=15)
    actions = start(guard, "alice")
    assert unit_actions(actions) == [("freeze", ALICE, "no-new-starts")]
    assert probes(actions) == []
    guard.done("freeze", ALICE)
    guard(UnitChanged(ALICE, FROZEN))
    actions = guard(sample(50), after=1)  # above admit_below: now measured
    assert len(probes(actions)) == 1 and held(guard) == "sizing"


def test_the_probe_result_is_durable() -> None:
    from test_policy import restarted

    guard = sizing_alice()
    guard(SizeMeasured("alice", 10 * GiB), after=1)
    again = restarted(guard)
    assert again.m("alice").size_bytes == 10 * GiB
    assert again.m("alice").sized_at == guard.m("alice").sized_at


# --- the probe's file ---------------------------------------------------------------------


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_rclone_sizes_json_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", '{"count":3,"bytes":123456789,"sizeless":0}\n')
    assert read_size_file(path, time.time()) == 123456789
    assert read_size_file(write(tmp_path / "z.json", '{"bytes": 0}')) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("  \n", "empty"),
        ("{", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[1, 2]", "expected a JSON object"),
        ('{"count": 3}', 'no "bytes" key'),
        ('{"bytes": "12"}', '"bytes" must be a whole number'),
        ('{"bytes": 1.5}', '"bytes" must be a whole number'),
        ('{"bytes": true}', '"bytes" must be a whole number'),
        ('{"bytes": null}', '"bytes" must be a whole number'),
        ('{"bytes": -1}', "did not say its size"),
        ('{"bytes": 99999999999999999999999}', "more than any volume holds"),
    ],
)
def test_anything_else_is_a_clear_error(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = write(tmp_path / "s.json", content)
    with pytest.raises(SizeFileError, match=message) as error:
        read_size_file(path)
    assert str(path) in str(error.value)


def test_the_file_must_be_a_regular_file_of_bounded_size(tmp_path: Path) -> None:
    with pytest.raises(SizeFileError, match="cannot read: No such file"):
        read_size_file(tmp_path / "missing.json")
    with pytest.raises(SizeFileError, match="not a regular file"):
        read_size_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SizeFileError, match="not a regular file"):
        read_size_file(fifo)  # and it does not block
    big = write(tmp_path / "big.json", json.dumps({"bytes": 1, "pad": "x" * MAX_SIZE_FILE}))
    with pytest.raises(SizeFileError, match="larger than 64 KiB"):
        read_size_file(big)
    with pytest.raises(SizeFileError, match="not a regular file"):
        read_size_file(Path("/dev/zero"))


def test_a_file_left_by_an_earlier_run_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", '{"bytes": 5}')
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(SizeFileError, match="not written by this probe"):
        read_size_file(path, not_before=time.time())
