"""consumers.py and what shows the figures: growth over the last hour, the alert paragraph,
the monitor's triggers (with the real worker process on a real tree, and with a stand-in
worker for the timing of triggers), `spaceguardctl usage` over a real socket, the metrics
(through promtool), the incident text and the config keys."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from spaceguard.config import Config, ConfigError, parse
from spaceguard.consumers import (
    Sample,
    ScanFailed,
    UnknownVolume,
    UsageMonitor,
    Worker,
    alert_text,
    growth,
    prune,
    sample_of,
)
from spaceguard.ctl import render_usage
from spaceguard.incidents import render_text
from spaceguard.metrics import Counters, Snapshot, make_registry
from spaceguard.model import GuardState, VolumeState
from spaceguard.usage import Candidate, Destination, Entry, ScanRequest, ScanResult

from tests.sandbox import require
from tests.unit.test_control import ctl, run, serving

GIB = 1024**3
MIB = 1024**2


def result(
    consumers: list[tuple[str, int]] | None = None,
    *,
    at: float = 10_000.0,
    complete: bool = True,
    used: int = 100 * GIB,
    scanned: int = 90 * GIB,
    **extra: Any,
) -> ScanResult:
    return ScanResult(
        root="/space",
        started_at=at - 2.0,
        duration=2.0,
        complete=complete,
        cut="" if complete else "time budget of 30s used up",
        entries=1_000_000,
        directories=10_000,
        scanned_bytes=scanned,
        used_bytes=used,
        reserved_bytes=GIB,
        consumers=tuple(
            Entry(path, size, complete=complete)
            for path, size in (consumers or [("/space/alice", 60 * GIB)])
        ),
        **extra,
    )


# --- growth -------------------------------------------------------------------------------------


def test_growth_against_the_scan_an_hour_ago() -> None:
    history = [
        Sample(0.0, {"/a": 10}),
        Sample(1000.0, {"/a": 15}),
        Sample(3000.0, {"/a": 30}),
        Sample(4000.0, {"/a": 40}),
    ]
    now = Sample(4600.0, {"/a": 50})
    # the newest scan at least an hour old (t=1000), not the oldest (t=0)
    assert growth([*history, now], now, "/a") == (35, 3600.0)
    # no scan an hour old yet: the oldest there is
    assert growth([*history[2:], now], now, "/a") == (20, 1600.0)
    assert growth([now], now, "/a") is None
    assert growth(history, now, "/b") is None
    shrunk = Sample(4600.0, {"/a": 5})
    assert growth(history, shrunk, "/a") == (-10, 3600.0)


def test_history_keeps_two_hours() -> None:
    history = deque(Sample(float(at), {}) for at in range(0, 10_000, 1000))
    prune(history, 9000.0)
    assert [sample.at for sample in history] == [2000.0 + 1000 * i for i in range(8)]
    lone = deque([Sample(0.0, {})])
    prune(lone, 1e9)
    assert len(lone) == 1


def test_growth_counts_only_finished_entries() -> None:
    partial = result(complete=False)
    sample = sample_of(partial)
    assert sample.sizes == {}  # nothing finished: no growth from a cut scan
    whole = sample_of(result())
    assert whole.sizes == {"/space/alice": 60 * GIB, "/space": 90 * GIB}


# --- the alert paragraph --------------------------------------------------------------------


def test_alert_text_names_the_consumers_their_growth_and_the_rest() -> None:
    earlier = result([("/space/alice", 50 * GIB), ("/space/bob", 20 * GIB)], at=6000.0)
    latest = result(
        [("/space/alice", 60 * GIB), ("/space/bob", 20 * GIB), ("/space/new", GIB)],
        at=10_000.0,
        candidates=(Candidate("partial", "/space/alice/x.partial", 3 * GIB, 0.0),),
        reclaimable={"partial": 3 * GIB, "old": 0},
    )
    history = [sample_of(earlier), sample_of(latest)]
    text = alert_text(latest, history, "space", now=10_120.0, scanning=False)
    assert text.startswith("What fills it (usage scan 2m ago, complete): ")
    assert "/space/alice 60.0 GiB (+10.0 GiB in 67m)" in text
    assert "/space/bob 20.0 GiB (+0 B in 67m)" in text
    assert "/space/new 1.0 GiB (growth not known yet)" in text
    assert "Not explained by any directory: 10.0 GiB (used 100.0 GiB minus scanned" in text
    assert "1.0 GiB reserved" in text
    assert "Reclaim candidates, listed, not touched: partial 3.0 GiB" in text
    assert "/space/alice/x.partial 3.0 GiB" in text
    assert text.endswith("Details: spaceguardctl usage space.")


def test_alert_text_without_figures_and_for_a_cut_scan() -> None:
    assert "no usage scan yet (one is running)" in alert_text(None, [], "space", 0.0, True)
    cut = result(complete=False)
    text = alert_text(cut, [], "space", cut.finished_at, False)
    assert "partial: time budget of 30s used up" in text
    assert "/space/alice 60.0 GiB (at least)" in text
    assert "not known (the scan was cut)" in text


# --- the monitor ------------------------------------------------------------------------------


def config_for(path: Path, **volume: object) -> Config:
    return parse(
        Path("/etc/spaceguard/test.toml"),
        {
            "volumes": {"space": {"path": str(path), **volume}},
            "migrations": [
                {
                    "account": "alice",
                    "unit": "m@alice.service",
                    "volume": "space",
                    "destination": str(path / "alice"),
                }
            ],
        },
    )


def volume_state(**fields: Any) -> VolumeState:
    base = VolumeState(up=True, sampled_at=1.0, avail_bytes=50 * GIB, size_bytes=100 * GIB)
    return replace(base, **fields)


class StandInWorker(Worker):
    """Answers from a list instead of walking (the real worker is tested below)."""

    def __init__(self) -> None:
        super().__init__(["true"])
        self.requests: list[ScanRequest] = []
        self.answers: list[ScanResult | ScanFailed] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def scan(self, request: ScanRequest) -> ScanResult:
        self.requests.append(request)
        await self.gate.wait()
        answer = self.answers.pop(0) if self.answers else result()
        if isinstance(answer, ScanFailed):
            raise answer
        return answer


def test_triggers_schedule_band_low_and_none_while_unavailable(tmp_path: Path) -> None:
    config = config_for(tmp_path, usage_interval="1h", resume_above="10%")
    state = GuardState(volumes={"space": volume_state()})
    clock = [0.0]

    async def body() -> None:
        nonlocal state
        worker = StandInWorker()
        monitor = UsageMonitor(config, lambda: state, worker, clock=lambda: clock[0])
        task = asyncio.get_running_loop().create_task(monitor._run_scans())

        async def settle() -> None:
            for _ in range(20):
                await asyncio.sleep(0)

        monitor._check_triggers()  # start-up: the first scheduled scan
        await settle()
        assert [monitor.volumes["space"].trigger] == ["schedule"]
        assert worker.requests[0].destinations == {"alice": str(tmp_path / "alice")}
        clock[0] = 1800.0
        monitor._check_triggers()  # nothing due
        await settle()
        assert len(worker.requests) == 1
        # free space enters the band below resume_above (10%): fresh figures for the pause
        state = GuardState(volumes={"space": volume_state(avail_bytes=9 * GIB)})
        monitor.volumes["space"].latest = replace(result(), started_at=-1000.0)
        monitor._check_triggers()
        await settle()
        assert monitor.volumes["space"].trigger == "approaching"
        # still in the band: no new scan; then the volume goes low: one more
        monitor._check_triggers()
        state = GuardState(volumes={"space": volume_state(avail_bytes=GIB, low=True)})
        monitor._check_triggers()
        await settle()
        assert [r for r in (monitor.volumes["space"].trigger,)] == ["low"]
        assert len(worker.requests) == 3
        # an hour after the last scan: the schedule again; an unmounted volume: no scan
        state = GuardState(volumes={"space": volume_state(up=False, error="not mounted")})
        clock[0] = 9000.0
        monitor._check_triggers()
        await settle()
        assert len(worker.requests) == 3
        with pytest.raises(ScanFailed, match="volume space is unavailable \\(not mounted\\)"):
            await monitor.scan("space")
        task.cancel()

    asyncio.run(body())


def test_on_demand_scans_wait_fresh_figures_and_bad_volumes(tmp_path: Path) -> None:
    config = config_for(tmp_path, usage_interval=0)
    state = GuardState(volumes={"space": volume_state()})

    async def body() -> None:
        worker = StandInWorker()
        wall = [20_000.0]
        monitor = UsageMonitor(config, lambda: state, worker, wall=lambda: wall[0])
        task = asyncio.get_running_loop().create_task(monitor._run_scans())
        monitor._check_triggers()
        await asyncio.sleep(0)
        assert worker.requests == []  # usage_interval = 0: no scheduled scans
        worker.answers = [result(at=19_999.0)]
        first = await monitor.scan("space")
        assert first.finished_at == 19_999.0
        # within `fresh` seconds: the same figures, no new walk
        assert await monitor.scan("space", fresh=10.0) is first
        assert len(worker.requests) == 1
        # two requests while one scan runs: both get its result
        worker.gate.clear()
        worker.answers = [result(at=20_001.0)]
        both = asyncio.gather(monitor.scan("space"), monitor.scan("space"))
        await asyncio.sleep(0.01)
        assert monitor.report("space")["scanning"] is True
        worker.gate.set()
        one, two = await both
        assert one is two and len(worker.requests) == 2
        # a failing scan is reported, the last good figures stay
        worker.answers = [ScanFailed("the scanner exited (status 1); see the journal")]
        with pytest.raises(ScanFailed, match="exited"):
            await monitor.scan("space")
        report = monitor.report("space")
        assert report["error"].startswith("the scanner exited")
        assert report["scan"]["finished_at"] == 20_001.0
        with pytest.raises(UnknownVolume, match=r"no volume 'nope' \(configured: space\)"):
            await monitor.scan("nope")
        stats = monitor.stats()["space"]
        assert stats.scans == {"complete": 2, "error": 1}
        task.cancel()

    asyncio.run(body())


def test_the_real_worker_through_the_monitor(tmp_path: Path) -> None:
    root = tmp_path / "space"
    (root / "alice").mkdir(parents=True)
    (root / "alice" / "a.bin").write_bytes(b"x" * 300_000)
    (root / "junk.partial").write_bytes(b"y" * 100_000)
    config = config_for(root, usage_interval=0)
    state = GuardState(volumes={"space": volume_state()})

    async def body() -> None:
        monitor = UsageMonitor(config, lambda: state)
        task = asyncio.get_running_loop().create_task(monitor._run_scans())
        try:
            scan = await monitor.scan("space")
            assert monitor.worker.priority["cpu"] in ("SCHED_IDLE", "nice 19")
            pid = monitor.worker.pid
            await monitor.scan("space")
            assert monitor.worker.pid == pid  # kept, with its cache
            report = monitor.report("space")
        finally:
            task.cancel()
            await monitor.close()
        du = subprocess.run(
            ["du", "-sx", "--block-size=1", str(root)], capture_output=True, text=True, check=True
        )
        assert scan.scanned_bytes == int(du.stdout.split()[0])
        assert report["scan"]["destinations"][0]["account"] == "alice"
        assert report["scan"]["candidates"][0]["path"] == str(root / "junk.partial")
        json.dumps(report)  # it goes over the control socket as is

    asyncio.run(body())


def test_a_worker_that_dies_or_hangs_is_replaced(tmp_path: Path) -> None:
    async def body() -> None:
        worker = Worker(["sh", "-c", 'echo \'{"hello": {"pid": 1}}\'; read line; exit 3'])
        with pytest.raises(ScanFailed, match=r"the scanner exited \(status 3\)"):
            await worker.scan(ScanRequest(root=str(tmp_path)))
        with pytest.raises(ScanFailed, match="exited"):  # started again, and fails again
            await worker.scan(ScanRequest(root=str(tmp_path)))
        mute = Worker(["sh", "-c", "sleep 30"], grace=0.2)
        with pytest.raises(ScanFailed, match="did not start"):
            await mute.scan(ScanRequest(root=str(tmp_path)))
        hung = Worker(["sh", "-c", 'echo \'{"hello": {"pid": 1}}\'; sleep 30'], grace=0.2)
        with pytest.raises(ScanFailed, match=r"no answer within 1.2s \(a hung file system\?\)"):
            await hung.scan(ScanRequest(root=str(tmp_path), budget=1.0))
        assert hung.process is None  # killed; the next scan starts a new one
        broken = Worker(["/nonexistent/python"])
        with pytest.raises(ScanFailed, match="cannot start the scanner"):
            await broken.scan(ScanRequest(root=str(tmp_path)))

    asyncio.run(body())


# --- spaceguardctl usage over a real socket ------------------------------------------------


def sample_report() -> dict[str, Any]:
    config = config_for(Path("/space"))
    state = GuardState(volumes={"space": volume_state()})
    monitor = UsageMonitor(config, lambda: state, StandInWorker(), wall=lambda: 10_100.0)
    usage = monitor.volumes["space"]
    earlier = result([("/space/alice", 50 * GIB)], at=6000.0)
    latest = result(
        [("/space/alice", 60 * GIB), ("/space/evil\\x1b[31m", MIB)],
        at=10_000.0,
        destinations=(Destination("alice", "/space/alice", Entry("/space/alice", 60 * GIB)),),
        candidates=(Candidate("temp", "/space/tmp", 2 * GIB, 9000.0),),
        reclaimable={"temp": 2 * GIB},
        other_mounts=("/space/mnt",),
        unreadable=1,
        errors=("/space/secret: Permission denied",),
        hardlinks=4,
    )
    usage.history.extend([sample_of(earlier), sample_of(latest)])
    usage.latest, usage.trigger = latest, "low"
    return {"volumes": [monitor.report("space")], "now": 10_100.0}


def test_render_usage() -> None:
    text = render_usage(sample_report(), now=10_100.0)
    lines = text.splitlines()
    assert lines[0] == (
        "space (/space): figures 1m40s old (scan by low, 2.0s, 1,000,000 entries, complete)"
    )
    assert any("60.0 GiB" in line and "+10.0 GiB in 1h06m" in line for line in lines)
    assert "/space/evil\\x1b[31m" in text and "\x1b" not in text
    assert "(not explained by any directory" in text and "10.0 GiB" in text
    assert "MIGRATION DESTINATIONS" in text and "RECLAIM CANDIDATES" in text
    assert "temp  2.0 GiB  18m20s ago  /space/tmp" in text
    assert "not crossed (other file systems): /space/mnt" in text
    assert "unreadable directories: 1" in text
    assert "error: /space/secret: Permission denied" in text
    assert render_usage({"volumes": []}, 0.0) == "no volumes\n"
    none_yet = {"volumes": [{"volume": "v", "path": "/v", "scan": None, "scanning": False}]}
    assert render_usage(none_yet, 0.0) == "v (/v): no scan yet\n"


class UsageBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[str | None, bool]] = []

    async def usage(self, volume: str | None, rescan: bool) -> dict[str, Any]:
        from spaceguard.protocol import RequestError

        self.calls.append((volume, rescan))
        if volume == "nope":
            raise RequestError("not-found", "no volume 'nope' (configured: space)")
        return sample_report()


def test_spaceguardctl_usage_round_trip(tmp_path: Path) -> None:
    backend = UsageBackend()
    path = tmp_path / "c.sock"

    async def body() -> None:
        async with serving(path, backend):  # type: ignore[arg-type]
            code, out, err = await ctl(path, "usage", "--json")
            assert (code, err) == (0, "")
            assert json.loads(out) == json.loads(json.dumps(sample_report()))
            code, out, _ = await ctl(path, "usage", "space", "--rescan")
            assert code == 0 and out.startswith("space (/space): figures")
            code, out, err = await ctl(path, "usage", "nope")
            assert (code, out) == (1, "")
            assert err == "spaceguardctl: no volume 'nope' (configured: space)\n"
            code, _, err = await ctl(path, "usage", "a\nb")
            assert code == 1 and "volume must be a volume name" in err
        assert backend.calls == [(None, False), ("space", True), ("nope", False)]

    run(body)


# --- metrics, incidents, config ------------------------------------------------------------


def test_usage_metrics_are_bounded_and_pass_promtool(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    state = GuardState(volumes={"space": volume_state()})
    monitor = UsageMonitor(config, lambda: state, StandInWorker())
    usage = monitor.volumes["space"]
    earlier = result([("/space/alice", 50 * GIB)], at=6400.0)
    latest = result(
        [("/space/alice", 60 * GIB), ('/space/odd "name"\\n', GIB)],
        destinations=(Destination("alice", "/space/alice", Entry("/space/alice", 60 * GIB)),),
        reclaimable={"partial": 5, "preallocated": 0, "temp": 0, "old": 0},
    )
    usage.history.extend([sample_of(earlier), sample_of(latest)])
    usage.latest = latest
    usage.scans.update({"complete": 2})
    snapshot = Snapshot(
        config=config,
        state=state,
        counters=Counters(),
        now=10_000.0,
        usage=monitor.stats(),
    )
    text = generate_latest(make_registry(lambda: snapshot)).decode()
    sizes = [line for line in text.splitlines() if line.startswith("spaceguard_usage_bytes{")]
    assert len(sizes) == 2  # the destination is one of the top entries: one series
    assert 'spaceguard_usage_bytes{path="/space/alice",volume="space"} 6.442450944e+10' in text
    rate = 10 * GIB / 3600
    assert f'spaceguard_usage_growth_bytes_per_second{{path="/space/alice",volume="space"}} {rate}'
    assert "spaceguard_usage_unexplained_bytes" in text
    assert 'spaceguard_usage_scans_total{result="complete",volume="space"} 2.0' in text
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not found (Debian package prometheus)")
    assert promtool is not None
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout


def test_disk_full_incident_text_carries_the_consumers() -> None:
    report = sample_report()["volumes"][0]
    record = {
        "id": "20260101T000000Z-alice-disk-full",
        "account": "alice",
        "unit": "m@alice.service",
        "time": 0.0,
        "trigger": "disk-full",
        "class": "disk_full",
        "detail": "Migration alice paused: space is low",
        "outcome": "paused: resumes by itself once space is back (runbook scenario 3)",
        "usage": report,
        "partial": {"note": "a pause"},
    }
    text = render_text(record)
    assert "What fills volume space (/space), scan of 1,000,000 entries in 2.0s, complete:" in text
    assert "  60.0 GiB  /space/alice, +10.0 GiB in 67m" in text
    assert "not explained by any directory: 10.0 GiB" in text
    assert "destination of alice: /space/alice 60.0 GiB" in text
    assert "temp" in text and "/space/tmp" in text
    assert "Runbook (scenario 3)" in text and "scenario 1" not in text


def test_config_usage_keys(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    volume = config.volumes["space"]
    assert (volume.usage_interval, volume.usage_depth, volume.usage_top) == (3600.0, 1, 10)
    assert (volume.usage_budget, volume.usage_max_entries) == (30.0, 5_000_000)
    tuned = config_for(
        tmp_path,
        usage_interval="15m",
        usage_depth=2,
        usage_top=20,
        usage_budget="2m",
        usage_max_entries=100_000,
        usage_old_after="90d",
    ).volumes["space"]
    assert (tuned.usage_interval, tuned.usage_depth, tuned.usage_top) == (900.0, 2, 20)
    assert (tuned.usage_budget, tuned.usage_max_entries, tuned.usage_old_after) == (
        120.0,
        100_000,
        90 * 86400.0,
    )
    assert config_for(tmp_path, usage_interval=0).volumes["space"].usage_interval == 0
    for key, value, message in [
        ("usage_interval", "30s", "must be 0 (no scheduled scans) or at least 1m"),
        ("usage_depth", 0, "must be between 1 and 8"),
        ("usage_depth", 9, "must be between 1 and 8"),
        ("usage_top", 101, "must be between 1 and 100"),
        ("usage_budget", "0s", "must be between 1s and 10m"),
        ("usage_budget", "11m", "must be between 1s and 10m"),
        ("usage_max_entries", 10, "must be at least 1000"),
        ("usage_old_after", "1h", "must be at least 1d"),
        ("usage_top", "ten", "expected a whole number"),
        ("usage_interval", "soon", "cannot read 'soon' as a duration"),
    ]:
        with pytest.raises(ConfigError) as raised:
            config_for(tmp_path, **{key: value})
        assert f"volumes.space.{key}: " in str(raised.value), (key, value)
        assert message in str(raised.value), (key, value, str(raised.value))
