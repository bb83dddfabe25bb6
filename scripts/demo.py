#!/usr/bin/env python3
"""Live demonstration: spaceguard protects a real rclone migration from a full disk.

It boots its own systemd sandbox (a real systemd and system bus in private namespaces, so it
works whether or not the host runs systemd, and touches none of the host's units), makes a
small ext4 volume standing in for /space, and runs, as systemd units:
  - m365-migrate@alice.service: a real `rclone copy` of a generated tree into the volume,
    rate-limited so a person can watch it;
  - spaceguard.service: the guard (Type=notify, watchdog), as shipped.
Then it narrates: the volume fills, the guard freezes the migration before the disk is full,
an operator frees space, the guard thaws it after the hold-down, rclone finishes, and
`rclone check` confirms the copy. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.guardrig import GuardRig, wait_until  # noqa: E402
from tests.sandbox import LoopVolume, SandboxError, SystemdSandbox, missing_for_sandbox  # noqa: E402

MIB = 1024 * 1024
UNIT = "m365-migrate@alice.service"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    print((result.stdout + result.stderr).rstrip(), flush=True)


def make_source(root: Path, files: int, size: int) -> None:
    root.mkdir(parents=True)
    for index in range(files):
        (root / f"report-{index:03d}.bin").write_bytes(os.urandom(size))


def migration_unit(source: Path, destination: Path, log: Path, rate: str) -> str:
    rclone = shutil.which("rclone") or "/usr/bin/rclone"
    return (
        "[Unit]\nDescription=OneDrive to /space migration for alice (demo: local source)\n"
        "[Service]\nType=simple\n"
        f"ExecStart={rclone} copy {source} {destination} --bwlimit {rate} -v --stats 2s "
        f"--transfers 2 --log-file {log}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", default="24M", help="rclone --bwlimit (default 24M)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(
            "demo: run as root (it mounts a loop volume and boots a sandboxed systemd)",
            file=sys.stderr,
        )
        return 1
    missing = missing_for_sandbox()
    if missing:
        print("demo: cannot boot a systemd sandbox: " + "; ".join(missing), file=sys.stderr)
        return 1
    python = sys.executable
    ctl = [python, "-m", "spaceguard.ctl"]
    os.environ["PYTHONPATH"] = str(REPO / "daemon")
    with tempfile.TemporaryDirectory(prefix="spaceguard-demo-") as tmp:
        work = Path(tmp)
        volume = LoopVolume(work / "space", 256, options=["nodelalloc"])
        sandbox = SystemdSandbox(work / "sandbox")
        try:
            say("A 256 MiB ext4 volume stands in for /space; 120 MiB of it is already used")
            volume.mount()
            ballast = volume.mountpoint / "old-archive.tar"
            ballast.write_bytes(b"\0" * (120 * MIB))
            os.sync()
            source = work / "onedrive-alice"
            make_source(source, 30, 4 * MIB)
            print(f"source tree: {source} (30 files, 120 MiB: the account to migrate)")
            show(["df", "-h", str(volume.mountpoint)])

            say("Boot a sandboxed systemd with the migration unit and the guard")
            log = work / "m365-migrate-alice.log"
            destination = volume.mountpoint / "alice"
            sandbox.up({UNIT: migration_unit(source, destination, log, args.rate)})
            rig = GuardRig(sandbox, work, python, watchdog_sec=5)
            rig.write_config(f"""
                [volumes.space]
                path = "{volume.mountpoint}"
                pause_below = "48MiB"
                resume_above = "96MiB"
                resume_after = "3s"
                predict = "2s"

                [[migrations]]
                account = "alice"
                unit = "{UNIT}"
                volume = "space"
                log = "{log}"
                destination = "{destination}"
                pause = "freeze"
                """)
            rig.install()
            rig.start()
            ctl_socket = ["--socket", str(rig.host_socket)]
            print(
                f"spaceguard is up (Type=notify, WatchdogSec=5s); metrics on "
                f"http://127.0.0.1:{rig.metrics_port}/metrics"
            )
            show([*ctl, *ctl_socket, "status"])

            say(f"Start the migration: rclone copy at {args.rate}/s into the volume")
            sandbox.systemctl("start", UNIT)
            started = time.monotonic()
            while sandbox.show(UNIT, "FreezerState") != "frozen":
                free = volume.usable_bytes / MIB
                print(
                    f"  t={time.monotonic() - started:4.1f}s  free {free:6.1f} MiB  "
                    f"rclone {sandbox.show(UNIT, 'ActiveState')}",
                    flush=True,
                )
                if sandbox.show(UNIT, "ActiveState") not in ("active", "activating"):
                    raise SystemExit("demo: rclone ended before the guard acted; see " + str(log))
                time.sleep(1)
            say(
                f"The guard froze the migration with {volume.usable_bytes / MIB:.1f} MiB "
                "still free: no write error, nothing lost"
            )
            print(
                f"systemd: {UNIT} FreezerState={sandbox.show(UNIT, 'FreezerState')}, "
                f"ActiveState={sandbox.show(UNIT, 'ActiveState')}"
            )
            show([*ctl, *ctl_socket, "status"])
            print("guard's journal:")
            for line in rig.journal().splitlines():
                if any(word in line for word in ("low on", "pausing", "freeze ")):
                    print("  " + line)
            metrics = rig.metrics()
            print(
                "metrics: "
                + ", ".join(
                    f"{key}={value:g}"
                    for key, value in metrics.items()
                    if key.startswith(("spaceguard_migration_paused{", "spaceguard_volume_low"))
                )
            )

            say("An operator frees space (scenario 3, step 2): removes the old archive")
            ballast.unlink()
            os.sync()
            show(["df", "-h", str(volume.mountpoint)])
            wait_until(
                lambda: sandbox.show(UNIT, "FreezerState") == "running",
                30,
                "the guard to thaw the migration",
            )
            say("After 3 s above resume_above (96 MiB) the guard thawed the migration")
            for line in rig.journal().splitlines():
                if any(word in line for word in ("recovered", "releasing", "thaw ")):
                    print("  " + line)
            wait_until(
                lambda: sandbox.show(UNIT, "ActiveState") == "inactive", 120, "rclone to finish"
            )
            say(f"rclone finished: Result={sandbox.show(UNIT, 'Result')}; verify the copy")
            show(["rclone", "check", str(source), str(destination)])
            errors = [line for line in log.read_text().splitlines() if "ERROR" in line]
            print(f"rclone log: {len(errors)} ERROR lines")
            show([*ctl, *ctl_socket, "status"])
            rig.stop()
            say("Done: the guard paused before the disk filled and resumed when space was back")
        except (SandboxError, AssertionError, subprocess.SubprocessError) as error:
            print(f"demo failed: {error}", file=sys.stderr)
            return 1
        finally:
            sandbox.down()
            volume.umount()
    return 0


if __name__ == "__main__":
    sys.exit(main())
