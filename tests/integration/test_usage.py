"""Scenario 3, step 2: what fills the volume, end to end. The real guard (a Type=notify unit
in a real systemd) scans real trees on real ext4 loop volumes; `spaceguardctl usage` asks it
over the control socket; the figures are checked against `du` on the same tree.

* sizes match `du -x --block-size=1`, hard links count once, a nested mount is not crossed,
  a destination's size is reported, reclaim candidates are listed (and left alone);
* the entry budget cuts a big tree and the result says so;
* the pause alert (at a real webhook) and the disk-full incident carry the consumers;
* bad input: an unknown volume, an unmounted one, directories removed during scans.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.guardrig import REPO, GuardRig, wait_until, writer_unit
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import require
from tests.unit.test_alertmanager_real import NotificationRecorder
from tests.unit.test_usage_walk import du, du_depth, mixed_tree, write

MIB = 1024 * 1024
SLEEPER = "[Service]\nExecStart=/bin/sleep infinity\n"


def ctl(rig: GuardRig, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """spaceguardctl as an operator runs it, against the guard's socket."""
    return subprocess.run(
        [rig.python, "-m", "spaceguard.ctl", "--socket", str(rig.host_socket), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO / "daemon")},
        check=False,
    )


def du_each(*paths: str) -> dict[str, int]:
    """One `du -sx` over several paths: a file linked from two of them is counted once."""
    out = subprocess.run(
        ["du", "-sx", "--block-size=1", *paths], capture_output=True, text=True, check=True
    ).stdout
    return {line.split("\t", 1)[1]: int(line.split("\t", 1)[0]) for line in out.splitlines()}


def usage_json(rig: GuardRig, *args: str) -> dict[str, Any]:
    done = ctl(rig, "usage", "--json", *args)
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)["volumes"]
    assert isinstance(report, dict)
    return report


def test_usage_matches_du_links_once_and_stays_on_its_file_system(
    loop_volume, sandbox, venv_python, tmp_path
):
    space = loop_volume(256, name="space")
    nested = loop_volume(32, name="space/archive")  # mounted inside it: must not be crossed
    write(nested.mountpoint / "hidden.bin", 8 * MIB)
    big = loop_volume(64, name="big", inodes=16384)
    mixed_tree(space.mountpoint)
    for index in range(25):  # a hard-linked tree: counted once
        original = write(space.mountpoint / "links" / f"f{index}", 40_000)
        (space.mountpoint / "links-again").mkdir(exist_ok=True)
        (space.mountpoint / "links-again" / f"f{index}").hardlink_to(original)
    for index in range(5000):
        write(big.mountpoint / "many" / f"f{index}", 100)
    sandbox.up({"sleeper@alice.service": SLEEPER, "sleeper@bob.service": SLEEPER})
    rig = GuardRig(sandbox, tmp_path, venv_python)
    rig.write_config(f"""
        [volumes.space]
        path = "{space.mountpoint}"
        [volumes.big]
        path = "{big.mountpoint}"
        usage_max_entries = 1000
        [[migrations]]
        account = "alice"
        unit = "sleeper@alice.service"
        volume = "space"
        destination = "{space.mountpoint / "alice"}"
        [[migrations]]
        account = "bob"
        unit = "sleeper@bob.service"
        volume = "space"
        destination = "{space.mountpoint / "bob"}"
        """)
    rig.install()
    rig.start()

    report = usage_json(rig, "space", "--rescan")
    scan = report["scan"]
    assert scan["complete"] and scan["cut"] == ""
    mount = space.mountpoint
    assert scan["scanned_bytes"] == du(mount)
    expected = du_depth(mount, 1)
    assert str(nested.mountpoint) not in expected  # du -x does not count it either
    consumers = {item["path"]: item["bytes"] for item in scan["consumers"]}
    assert set(consumers) == set(expected) - {str(mount)}
    linked = [str(mount / "links"), str(mount / "links-again")]
    for path, size in consumers.items():
        if path not in linked:  # which of the two holds the files depends on the walk order
            assert size == expected[path], path
    assert scan["hardlinks"] == 25
    assert sum(consumers[path] for path in linked) == sum(du_each(*linked).values())
    assert scan["other_mounts"] == [str(nested.mountpoint)]
    destinations = {item["account"]: item for item in scan["destinations"]}
    assert destinations["alice"]["bytes"] == du(mount / "alice")
    assert destinations["bob"]["bytes"] == du(mount / "bob")
    # what no directory explains: the directory shadowed by the nested mount, metadata
    statvfs = os.statvfs(mount)
    used = (statvfs.f_blocks - statvfs.f_bfree) * statvfs.f_frsize
    assert scan["used_bytes"] == used
    assert scan["unexplained_bytes"] == used - scan["scanned_bytes"]
    assert 0 <= scan["unexplained_bytes"] < MIB
    kinds = {(c["kind"], Path(c["path"]).name) for c in scan["candidates"]}
    assert {("partial", "doc.docx.ab12cd.partial"), ("preallocated", "video.mp4")} <= kinds
    assert ("temp", "tmp") in kinds
    assert (mount / "carol" / "doc.docx.ab12cd.partial").exists()  # listed, not touched

    # the same figures again, without a new scan, with their age
    shown = ctl(rig, "usage", "space")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"space ({mount}): figures ")
    assert f"{mount}/alice/" in shown.stdout and "RECLAIM CANDIDATES" in shown.stdout
    assert f"not crossed (other file systems): {nested.mountpoint}" in shown.stdout

    # the entry budget cuts the big tree, and the result says so
    cut = usage_json(rig, "big", "--rescan")["scan"]
    assert not cut["complete"] and cut["cut"] == "entry budget of 1,000 used up"
    assert cut["unexplained_bytes"] is None
    assert cut["scanned_bytes"] < du(big.mountpoint)
    assert "PARTIAL: entry budget of 1,000 used up" in ctl(rig, "usage", "big").stdout

    # metrics: the destinations and the top N, lint-clean
    metrics = rig.metrics()
    alice = f'spaceguard_usage_bytes{{path="{mount / "alice"}",volume="space"}}'
    assert metrics[alice] == du(mount / "alice")
    assert metrics['spaceguard_usage_scan_partial{volume="big"}'] == 1
    assert metrics['spaceguard_usage_scan_partial{volume="space"}'] == 0
    assert sum(1 for key in metrics if key.startswith("spaceguard_usage_bytes{")) <= 2 * 10 + 2
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not found (Debian package prometheus)")
    assert promtool is not None
    lint = subprocess.run(
        [promtool, "check", "metrics"],
        input=rig.metrics_text(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout
    journal = rig.journal()
    assert "usage scanner started" in journal and "CPU SCHED_IDLE, I/O idle class" in journal

    # an unknown volume: a clear answer, nothing changes
    unknown = ctl(rig, "usage", "nope")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr == "spaceguardctl: no volume 'nope' (configured: big, space)\n"


def test_removed_directories_and_an_unmounted_volume_get_clear_answers(
    loop_volume, sandbox, venv_python, tmp_path
):
    space = loop_volume(128, name="space")
    gone = tmp_path / "gone"  # configured, never mounted
    gone.mkdir()
    for index in range(3000):
        write(space.mountpoint / "stable" / f"f{index}", 1000)
    sandbox.up({"sleeper@alice.service": SLEEPER})
    rig = GuardRig(sandbox, tmp_path, venv_python)
    rig.write_config(f"""
        [volumes.space]
        path = "{space.mountpoint}"
        [volumes.gone]
        path = "{gone}"
        [[migrations]]
        account = "alice"
        unit = "sleeper@alice.service"
        volume = "space"
        """)
    rig.install()
    rig.start()
    pid = rig.main_pid()

    stop = threading.Event()

    def churn() -> None:  # directories appear and vanish under the scanner
        round_ = 0
        while not stop.is_set():
            base = space.mountpoint / "churn" / f"r{round_ % 3}"
            for index in range(200):
                write(base / f"d{index % 20}" / f"f{index}", 2000)
            shutil.rmtree(base)
            round_ += 1

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    try:
        for _ in range(2):
            scan = usage_json(rig, "space", "--rescan")["scan"]
            assert scan["complete"], scan
            assert scan["entries"] >= 3000
            time.sleep(5.5)  # a rescan within 5 s returns the last figures
    finally:
        stop.set()
        worker.join(30)
    assert rig.main_pid() == pid and sandbox.show("spaceguard.service", "ActiveState") == "active"

    unmounted = ctl(rig, "usage", "gone", "--rescan")
    assert unmounted.returncode == 1
    assert unmounted.stderr.startswith(
        f"spaceguardctl: usage gone: volume gone is unavailable ({gone} is not a mount point"
    ), unmounted.stderr
    everything = ctl(rig, "usage", "--json")
    assert everything.returncode == 0
    names = [report["volume"] for report in json.loads(everything.stdout)["volumes"]]
    assert sorted(names) == ["gone", "space"]
    assert rig.main_pid() == pid


def test_the_pause_alert_carries_the_consumers(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(256, options=["nodelalloc"], name="space")
    ballast = make_ballast(volume, 140)
    webhook = NotificationRecorder()
    try:
        status = tmp_path / "writer.status"
        (volume.mountpoint / "alice").mkdir()
        sandbox.up(
            {
                "writer@alice.service": writer_unit(
                    venv_python, volume.mountpoint / "alice", "120M", status
                )
            }
        )
        rig = GuardRig(sandbox, tmp_path, venv_python)
        rig.write_config(f"""
            [volumes.space]
            path = "{volume.mountpoint}"
            pause_below = "32MiB"
            resume_above = "64MiB"
            resume_after = "2s"
            [[migrations]]
            account = "alice"
            unit = "writer@alice.service"
            volume = "space"
            destination = "{volume.mountpoint / "alice"}"
            [[alerts.receivers]]
            name = "hook"
            kind = "webhook"
            url = "{webhook.url}"
            """)
        rig.install()
        rig.start()
        wait_until(
            lambda: 'spaceguard_usage_scan_timestamp_seconds{volume="space"}' in rig.metrics(),
            30,
            "the start-up usage scan",
        )
        sandbox.systemctl("start", "writer@alice.service")
        sandbox.wait_for("writer@alice.service", "FreezerState", "frozen", timeout=30)
        (body,) = wait_until(
            lambda: [n for n in webhook.notifications if n.get("status") == "firing"],
            15,
            "the pause alert at the webhook",
            on_timeout=rig.journal,
        )
        description = body["annotations"]["description"]
        assert "Runbook scenario 3" in description  # the policy's text, then the facts
        assert "What fills it (usage scan " in description
        assert f"{ballast} 140.0 MiB (growth not known yet)" in description
        assert f"{volume.mountpoint / 'alice'} " in description
        assert "Not explained by any directory: " in description
        assert description.endswith("Details: spaceguardctl usage space.")
        # the volume ran low: a scan of that moment follows, and shows the writer's data
        wait_until(
            lambda: (usage_json(rig, "space")["scan"] or {}).get("trigger") == "low",
            60,
            "the scan started when the volume ran low",
        )
        scan = usage_json(rig, "space")["scan"]
        alice = next(c for c in scan["consumers"] if c["path"] == str(volume.mountpoint / "alice"))
        assert alice["bytes"] > 10 * MIB  # what the writer wrote before it was frozen
        assert 0 < alice["bytes"] - alice["growth_bytes"] <= 4096  # since the empty directory
    finally:
        webhook.stop()


def test_a_disk_full_pause_writes_an_incident_with_the_consumers(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(64, name="space")
    write(volume.mountpoint / "bob" / "done.bin", 3 * MIB)
    write(volume.mountpoint / "bob" / "part.docx.x1y2.partial", MIB)
    log = tmp_path / "bob.log"
    log.write_text("")
    sandbox.up({"m365-migrate@bob.service": SLEEPER})
    rig = GuardRig(sandbox, tmp_path, venv_python)
    rig.write_config(f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "0"
        resume_above = "63MiB"
        [[migrations]]
        account = "bob"
        unit = "m365-migrate@bob.service"
        volume = "space"
        log = "{log}"
        destination = "{volume.mountpoint / "bob"}"
        """)
    rig.install()
    rig.start()
    sandbox.systemctl("start", "m365-migrate@bob.service")
    time.sleep(1.1)  # the line below must be stamped after the run began (whole seconds)
    written = time.time()
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(written))
    with log.open("a") as handle:
        handle.write(
            f"{stamp} ERROR : big.bin: Failed to copy: write {volume.mountpoint}/bob/big.bin: "
            "no space left on device\n"
        )
    sandbox.wait_for("m365-migrate@bob.service", "FreezerState", "frozen", timeout=30)
    incidents_dir = rig.state_dir / "incidents"
    (path,) = wait_until(
        lambda: sorted(incidents_dir.glob("*-bob-disk-full.json")),
        60,
        "the disk-full incident",
        on_timeout=rig.journal,
    )
    record = json.loads(path.read_text())
    assert (record["class"], record["trigger"]) == ("disk_full", "disk-full")
    assert "no space left on device" in record["matched_lines"][0]
    scan = record["usage"]["scan"]
    # the scan of that moment: started for the incident, or by the volume running low
    # (the once-a-second check may come first)
    assert scan["trigger"] in ("disk-full", "low") and scan["complete"]
    assert scan["started_at"] >= written - 1.0
    assert scan["scanned_bytes"] == du(volume.mountpoint)
    bob = next(c for c in scan["consumers"] if c["path"] == str(volume.mountpoint / "bob"))
    assert bob["bytes"] == du(volume.mountpoint / "bob")
    assert [c["kind"] for c in scan["candidates"]] == ["partial"]
    shown = ctl(rig, "show", record["id"])
    assert shown.returncode == 0, shown.stderr
    assert f"What fills volume space ({volume.mountpoint})" in shown.stdout
    assert f"{volume.mountpoint / 'bob'}" in shown.stdout
    assert "Runbook (scenario 3)" in shown.stdout
    listed = ctl(rig, "--json", "incidents")
    assert [item["id"] for item in json.loads(listed.stdout)] == [record["id"]]
    assert rig.metrics()['spaceguard_incidents_open{account="bob"}'] == 1
    assert sandbox.show("m365-migrate@bob.service", "ActiveState") == "active"  # only frozen
