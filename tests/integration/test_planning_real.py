"""Space planning (issue 14) with real parts: the guard as shipped (tests.installed), real
writer units on real ext4 loop volumes, a real webhook receiver. The policy's pure
behaviour is tests/unit/test_planning.py; this file checks that the shipped guard does it
to real units: admission, serialisation, the ladder with its alerts, staggered resume, and
the ladder's last step on a real rclone copy (a freeze past max_freeze is a stop, resumed
through resume_unit, `rclone check` clean)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from tests.guardrig import GuardRig, read_status, wait_until, writer_unit
from tests.installed import ShippedRig
from tests.integration.test_failures import incidents
from tests.integration.test_real_migrations import (  # noqa: F401 (rclone: a fixture)
    RESUME_UNIT,
    UNIT,
    actions,
    make_tree,
    migration_config,
    nobodys,
    rclone,
    rclone_check,
    rclone_unit,
    tree_files,
)
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume
from tests.unit.test_alertmanager_real import NotificationRecorder

MIB = 1024 * 1024
AVAIL = 'spaceguard_volume_avail_bytes{volume="space"}'
DONE_LINE = re.compile(r"(\S+): (freeze|thaw|stop|start) (\S+) done \(([\w-]+)\)")


def volume_section(volume: LoopVolume, extra: str = "") -> str:
    return f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "1s"
        predict = "0s"
        {extra}
        """


def webhook_alerts(url: str) -> str:
    """The guard's alerts to one webhook receiver, retried within a second."""
    return f"""
        [alerts]
        resend_interval = "1m"
        max_backoff = "1s"

        [[alerts.receivers]]
        name = "hook"
        kind = "webhook"
        url = "{url}"
        timeout = "2s"
        """


def migration(account: str, extra: str = "", pause: str = "freeze") -> str:
    return f"""
        [[migrations]]
        account = "{account}"
        unit = "writer@{account}.service"
        volume = "space"
        pause = "{pause}"
        {extra}
        """


def ballast_leaving(volume: LoopVolume, free_mib: int, name: str = "ballast.bin") -> Path:
    """A ballast file that leaves about FREE_MIB usable on the volume."""
    mib = volume.usable_bytes // MIB - free_mib
    assert mib > 0, f"the volume has only {volume.usable_bytes // MIB} MiB"
    path = make_ballast(volume, mib)
    if name != "ballast.bin":
        path = path.rename(volume.mountpoint / name)
    return path


def writers(
    python: str, volume: LoopVolume, tmp_path: Path, sizes: dict[str, str], rate: str | None
) -> dict[str, str]:
    units = {}
    for account, size in sizes.items():
        (volume.mountpoint / account).mkdir()
        units[f"writer@{account}.service"] = writer_unit(
            python, volume.mountpoint / account, size, tmp_path / f"{account}.status", rate=rate
        )
    return units


def written(volume: LoopVolume, account: str) -> int:
    path = volume.mountpoint / account / "writer.bin"
    return path.stat().st_size if path.exists() else 0


def hold_reason(rig: GuardRig, account: str) -> str | None:
    prefix = f'spaceguard_migration_pause_info{{account="{account}",'
    for name, value in rig.metrics().items():
        if name.startswith(prefix) and value == 1:
            found = re.search(r'reason="([^"]*)"', name)
            return found.group(1) if found else None
    return None


def done_actions(rig: GuardRig) -> Counter[tuple[str, str, str]]:
    """(unit, action, reason) -> how many the guard logged as done."""
    return Counter(
        (match.group(3), match.group(2), match.group(4))
        for match in DONE_LINE.finditer(rig.journal())
    )


def finished(tmp_path: Path, account: str) -> list[int]:
    return [size for word, size in read_status(tmp_path / f"{account}.status") if word == "DONE"]


def words(tmp_path: Path, account: str) -> list[str]:
    return [word for word, _ in read_status(tmp_path / f"{account}.status")]


def notified(webhook: NotificationRecorder) -> list[dict[str, Any]]:
    return [body for body in list(webhook.notifications) if body.get("status") == "firing"]


def test_a_migration_that_cannot_fit_is_held_before_it_writes(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = ballast_leaving(volume, 100)  # 68 MiB above pause_below: 120 MiB cannot fit
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(volume_section(volume) + migration("alice", 'expected_size = "120MiB"'))
    sandbox.up(writers(venv_python, volume, tmp_path, {"alice": "120M"}, rate=None))
    rig.install()
    rig.start()

    sandbox.systemctl("start", "writer@alice.service")
    sandbox.wait_for("writer@alice.service", "FreezerState", "frozen", timeout=30)
    wait_until(lambda: hold_reason(rig, "alice") == "admission", 10, "the admission hold")
    # held before it writes: at most what a writer at full disk speed writes before the
    # guard saw its unit start (not a size the volume could not take)
    assert written(volume, "alice") < 16 * MIB, written(volume, "alice")
    journal = rig.journal()
    assert "alice: held before it writes: alice needs 120.0 MiB more" in journal, journal
    assert "freeze writer@alice.service done (admission)" in journal, journal
    assert "ENOSPC" not in words(tmp_path, "alice")

    ballast.unlink()
    sandbox.wait_for("writer@alice.service", "FreezerState", "running", timeout=30)
    wait_until(lambda: finished(tmp_path, "alice"), 60, "alice to finish", on_timeout=rig.journal)
    assert finished(tmp_path, "alice") == [120 * MIB]
    assert "ENOSPC" not in words(tmp_path, "alice")
    assert "alice: it fits now: releasing its hold" in rig.journal()


def test_two_that_fit_alone_but_not_together_are_serialised(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = ballast_leaving(volume, 32 + 90)  # 90 MiB above pause_below: one 60 at a time
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(
        volume_section(volume)
        + migration("alice", 'expected_size = "60MiB"')
        + migration("bob", 'expected_size = "60MiB"')
    )
    sandbox.up(writers(venv_python, volume, tmp_path, {"alice": "60M", "bob": "60M"}, "8M"))
    rig.install()
    rig.start()

    sandbox.systemctl("start", "writer@alice.service")
    wait_until(lambda: written(volume, "alice") > 0, 20, "alice to write")
    sandbox.systemctl("start", "writer@bob.service")
    sandbox.wait_for("writer@bob.service", "FreezerState", "frozen", timeout=30)
    wait_until(lambda: hold_reason(rig, "bob") == "admission", 10, "bob's admission hold")
    assert hold_reason(rig, "alice") is None
    assert sandbox.show("writer@alice.service", "FreezerState") == "running"
    assert "bob: held before it writes: bob needs 60.0 MiB more" in rig.journal()

    wait_until(lambda: finished(tmp_path, "alice"), 60, "alice to finish", on_timeout=rig.journal)
    # alice's bytes are written: 30 MiB left above pause_below, bob (60) still cannot fit.
    # A positive sign the guard saw alice end and the volume after it, then bob is held.
    sandbox.wait_for("writer@alice.service", "ActiveState", "inactive", timeout=30)
    after = volume.usable_bytes
    wait_until(lambda: rig.metrics().get(AVAIL) == after, 10, "the guard to sample the volume")
    assert hold_reason(rig, "bob") == "admission"
    assert sandbox.show("writer@bob.service", "FreezerState") == "frozen"

    ballast.unlink()
    wait_until(lambda: finished(tmp_path, "bob"), 60, "bob to finish", on_timeout=rig.journal)
    assert finished(tmp_path, "alice") == [60 * MIB] and finished(tmp_path, "bob") == [60 * MIB]
    assert "ENOSPC" not in words(tmp_path, "alice") + words(tmp_path, "bob")
    assert "bob: it fits now: releasing its hold" in rig.journal()


def test_the_ladder_warns_then_holds_then_freezes_then_stops_and_resumes(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = ballast_leaving(volume, 110)
    webhook = NotificationRecorder()
    try:
        rig = ShippedRig(sandbox, tmp_path, venv_python)
        rig.write_config(
            volume_section(
                volume,
                'warn_below = "100MiB"\nwarn_after = "1s"\nadmit_below = "80MiB"\n'
                'max_freeze = "3s"',
            )
            + migration("alice", 'resume_unit = "writer-resume@alice.service"')
            + migration("bob")
            + webhook_alerts(webhook.url)
        )
        units = writers(venv_python, volume, tmp_path, {"alice": "120M"}, "8M")
        units.update(writers(venv_python, volume, tmp_path, {"bob": "8M"}, None))
        units["writer-resume@alice.service"] = writer_unit(
            venv_python,
            volume.mountpoint / "alice",
            "120M",
            tmp_path / "alice.status",
            resume=True,
            rate="8M",
        )
        sandbox.up(units)
        rig.install()
        rig.start()

        sandbox.systemctl("start", "writer@alice.service")
        wait_until(
            lambda: [b for b in notified(webhook) if b["alertname"] == "SpaceguardVolumeLow"],
            30,
            "SpaceguardVolumeLow at the webhook",
            on_timeout=rig.journal,
        )
        assert hold_reason(rig, "alice") is None  # the warn step pauses nothing
        wait_until(
            lambda: volume.usable_bytes < 76 * MIB, 30, "the volume to drop below admit_below"
        )
        sandbox.systemctl("start", "writer@bob.service")
        wait_until(lambda: hold_reason(rig, "bob") == "no-new-starts", 10, "bob's hold")
        wait_until(
            lambda: [
                b
                for b in notified(webhook)
                if b["alertname"] == "SpaceguardMigrationPaused"
                and b["labels"].get("account") == "alice"
            ],
            30,
            "alice's pause alert at the webhook",
            on_timeout=rig.journal,
        )
        # max_freeze 3 s: the freeze becomes a clean stop
        sandbox.wait_for("writer@alice.service", "ActiveState", ("inactive", "failed"), 30)
        assert "TERM" in words(tmp_path, "alice")
        actions = done_actions(rig)
        assert actions[("writer@alice.service", "freeze", "space")] == 1, actions
        assert actions[("writer@alice.service", "stop", "space")] == 1, actions
        assert re.search(r"alice: frozen for \d+s \(max_freeze 3s\): stopping it", rig.journal())
        metrics = rig.metrics()
        stops = 'spaceguard_actions_total{action="stop",reason="space",result="ok"}'
        assert metrics.get(stops) == 1, {k: v for k, v in metrics.items() if "actions" in k}
        order = [body["alertname"] for body in notified(webhook)]
        assert order.index("SpaceguardVolumeLow") < order.index("SpaceguardMigrationNotAdmitted")
        assert order.index("SpaceguardMigrationNotAdmitted") < order.index(
            "SpaceguardMigrationPaused"
        ), order
        bob_alert = [
            b for b in notified(webhook) if b["alertname"] == "SpaceguardMigrationNotAdmitted"
        ]
        assert bob_alert[0]["labels"]["reason"] == "no-new-starts", bob_alert

        ballast.unlink()
        wait_until(
            lambda: finished(tmp_path, "alice") and finished(tmp_path, "bob"),
            60,
            "alice (through its resume unit) and bob to finish",
            on_timeout=rig.journal,
        )
        assert finished(tmp_path, "alice") == [120 * MIB]
        assert finished(tmp_path, "bob") == [8 * MIB]
        assert written(volume, "alice") == 120 * MIB  # nothing lost, nothing written twice
        assert "ENOSPC" not in words(tmp_path, "alice") + words(tmp_path, "bob")
        assert "start writer-resume@alice.service done" in rig.journal()
    finally:
        webhook.stop()


def test_a_freeze_past_max_freeze_of_real_rclone_is_a_stop_and_a_resume_nothing_lost(
    loop_volume,
    sandbox,
    venv_python,
    tmp_path,
    rclone,  # noqa: F811
):
    """The ladder's last step on a real rclone copy (as nobody, rate-limited): the volume
    drops below pause_below while it copies, the guard freezes it, max_freeze passes, the
    guard stops it; space comes back and the guard starts the resume unit, the same `rclone
    copy` (idempotent: it copies what is missing), which finishes the job."""
    volume = loop_volume(128, options=["nodelalloc"])
    volume.mountpoint.chmod(0o755)
    source = tmp_path / "onedrive"
    files, _ = make_tree(source, good=16, size=2 * MIB)  # 26 MiB of real files, 8 folders
    destination = nobodys(volume.mountpoint / "alice", directory=True)
    log = nobodys(tmp_path / "m365-migrate-alice.log")
    # 2 MiB/s: the copy is still running when space runs low, and again when it resumes
    flags = "--bwlimit 2M --transfers 1 --local-no-preallocate"
    copy = rclone_unit(rclone, source, destination, log, flags)
    sandbox.up({UNIT: copy, RESUME_UNIT: copy})
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(
        migration_config(
            volume,
            log,
            destination,
            f'resume_unit = "{RESUME_UNIT}"\nmax_freeze = "3s"',
            pause_below="32MiB",
            resume_above="64MiB",
        )
    )
    rig.install()
    rig.start()

    sandbox.systemctl("start", UNIT)
    # rclone's totals reach the guard (it judges the run's admission then, on a volume with
    # room for it); only then does space run low
    remaining = f'spaceguard_migration_remaining_bytes{{account="alice",unit="{UNIT}"}}'
    wait_until(
        lambda: rig.metrics().get(remaining, 0) > 0,
        30,
        "the guard to know what the copy still writes",
        on_timeout=lambda: rig.journal()[-3000:] + log.read_text()[-3000:],
    )
    # the ballast leaves 2 MiB above pause_below: rclone's own writes take the volume under
    ballast = ballast_leaving(volume, 32 + 2)
    wait_until(
        lambda: actions(rig).get('action="freeze",reason="space",result="ok"') == 1,
        30,
        "the guard to freeze the copy",
        on_timeout=lambda: rig.journal()[-3000:],
    )
    # max_freeze 3 s: the freeze becomes a clean stop (SIGTERM), while the volume stays low
    wait_until(
        lambda: actions(rig).get('action="stop",reason="space",result="ok"') == 1,
        30,
        "the guard to stop the copy frozen past max_freeze",
        on_timeout=lambda: rig.journal()[-3000:],
    )
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=30)
    assert re.search(
        rf"alice: frozen for \d+s \(max_freeze 3s\): stopping it; it resumes through "
        rf"{re.escape(RESUME_UNIT)}",
        rig.journal(),
    ), rig.journal()[-3000:]
    complete = {p for p, data in tree_files(destination).items() if data == files[p]}
    assert complete < set(files)  # the stop cut the copy short
    assert sandbox.show(RESUME_UNIT, "ActiveState") == "inactive"  # not resumed while low

    ballast.unlink()  # an operator frees space: after the hold-down, the resume unit
    wait_until(
        lambda: actions(rig).get('action="start",reason="resume",result="ok"') == 1,
        30,
        "the guard to start the resume unit",
        on_timeout=rig.journal,
    )
    # rclone exits 0 and the guard sees it (systemd unloads the inactive unit, its
    # properties with it: the guard's record of the exit is what stays)
    wait_until(
        lambda: f"alice: {RESUME_UNIT} finished successfully" in rig.journal(),
        90,
        "the resumed copy to finish",
        on_timeout=lambda: rig.journal()[-3000:] + log.read_text()[-3000:],
    )
    rclone_check(rclone, source, destination)  # nothing lost
    text = log.read_text()
    assert "no space left on device" not in text and "ENOSPC" not in text
    # the resume copied what was missing: a file complete before the stop, never again
    copies = Counter(re.findall(r" INFO  : (\S+): Copied \(", text))
    assert set(copies) == set(files), copies
    assert {p: copies[p] for p in complete} == dict.fromkeys(complete, 1), copies
    # one freeze, one stop, one start of the resume unit, and nothing else
    assert actions(rig) == {
        'action="freeze",reason="space",result="ok"': 1,
        'action="stop",reason="space",result="ok"': 1,
        'action="start",reason="resume",result="ok"': 1,
    }, actions(rig)
    assert not incidents(rig)


def test_staggered_resume_of_ten_writers_pauses_each_once(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = ballast_leaving(volume, 32 + 40)
    accounts = [f"w{index}" for index in range(10)]
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(
        volume_section(volume, 'resume_step = "2s"\nresume_batch = 3')
        + "".join(
            migration(account, f"priority = {index}") for index, account in enumerate(accounts)
        )
    )
    sandbox.up(writers(venv_python, volume, tmp_path, dict.fromkeys(accounts, "12M"), "2M"))
    rig.install()
    rig.start()
    for account in accounts:
        sandbox.systemctl("start", f"writer@{account}.service")
    for account in accounts:
        sandbox.wait_for(f"writer@{account}.service", "FreezerState", "frozen", timeout=60)

    ballast.unlink()
    wait_until(
        lambda: all(finished(tmp_path, account) for account in accounts),
        90,
        "all ten writers to finish",
        on_timeout=rig.journal,
    )
    actions = done_actions(rig)
    for account in accounts:
        unit = f"writer@{account}.service"
        assert finished(tmp_path, account) == [12 * MIB], account
        assert "ENOSPC" not in words(tmp_path, account), account
        froze = sum(n for (u, kind, _), n in actions.items() if u == unit and kind == "freeze")
        thawed = sum(n for (u, kind, _), n in actions.items() if u == unit and kind == "thaw")
        assert (froze, thawed) == (1, 1), (unit, actions)
    # staggered: three at a time, highest priority first
    order = [
        match.group(3) for match in DONE_LINE.finditer(rig.journal()) if match.group(2) == "thaw"
    ]
    batches = [set(order[i : i + 3]) for i in range(0, 10, 3)]
    expected = [
        {f"writer@w{n}.service" for n in range(high, max(-1, high - 3), -1)}
        for high in (9, 6, 3, 0)
    ]
    assert batches == expected, order
