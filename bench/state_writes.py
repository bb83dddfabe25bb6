#!/usr/bin/env python3
"""What a state change costs the event loop, and what a slow disk does to the writes.

    python3 bench/state_writes.py [--changes 2000] [--migrations 50] [--delay 0.05]

* loop cost: the time `StateStore.save_soon` (hand the snapshot over to the writer
  thread) holds the caller, against encoding the state (done on the writer thread) and a
  synchronous `write_atomic` (what an fsync on the loop would cost) on the same file system
  (this script's temp directory);
* a slow disk: every write sleeps --delay first (as a device with that latency would);
  --changes state changes arrive as fast as the loop makes them; how many writes reach the
  disk (coalesced: the newest wins), how many copies ever waited at once (bounded: 1), and
  that the file on disk is the last state once the writer is flushed.

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from spaceguard import state as state_module
from spaceguard.atomicfile import write_atomic
from spaceguard.model import GuardState, Hold, MigrationState
from spaceguard.state import StateStore


def guard_state(migrations: int, seq: int) -> GuardState:
    return GuardState(
        incident_seq=seq,
        migrations={
            f"user{i}": MigrationState(
                account=f"user{i}",
                hold=Hold(by="guard", reason="space", since=1000.0 + seq) if i % 2 else None,
                paused_units=frozenset({f"m365-migrate@user{i}.service"}) if i % 2 else frozenset(),
                transferred_bytes=seq * 1000 + i,
            )
            for i in range(migrations)
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument("--migrations", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        directory = Path(tmp)
        positions = {f"user{i}": {"inode": i, "offset": 1000 * i} for i in range(args.migrations)}
        store = StateStore(directory)
        handover = []
        for seq in range(args.changes):
            state = guard_state(args.migrations, seq)
            started = time.perf_counter()
            store.save_soon(state, positions)
            handover.append(time.perf_counter() - started)
        store.flush(None)
        data = (directory / "state.json").read_bytes()
        encode = []
        for seq in range(200):
            state = guard_state(args.migrations, seq)
            started = time.perf_counter()
            StateStore(directory).encode(state, positions)
            encode.append(time.perf_counter() - started)
        sync = []
        for _ in range(50):
            started = time.perf_counter()
            write_atomic(directory / "sync.json", data)
            sync.append(time.perf_counter() - started)
        print(f"state file: {len(data):,} bytes ({args.migrations} migrations)")
        print(
            f"loop cost of a state change (save_soon): median "
            f"{statistics.median(handover) * 1e3:.3f} ms, max {max(handover) * 1e3:.3f} ms"
        )
        print(
            f"encoding it (on the writer thread): median {statistics.median(encode) * 1e3:.3f} ms"
        )
        print(
            f"a synchronous atomic write here (temp, fsync, rename, fsync dir): median "
            f"{statistics.median(sync) * 1e3:.3f} ms, max {max(sync) * 1e3:.3f} ms"
        )
        store.close()

        real_write = state_module.write_atomic

        def slow_write(path: Path, payload: bytes) -> None:
            time.sleep(args.delay)
            real_write(path, payload)

        state_module.write_atomic = slow_write  # type: ignore[assignment]
        slow = StateStore(directory)
        most_pending = 0
        started = time.perf_counter()
        for seq in range(args.changes):
            slow.save_soon(guard_state(args.migrations, 10_000 + seq), positions)
            most_pending = max(most_pending, slow.health().pending)
        offered = time.perf_counter() - started
        slow.flush(None)
        health = slow.health()
        saved = json.loads((directory / "state.json").read_bytes())
        print(
            f"slow disk ({args.delay * 1e3:.0f} ms a write): {args.changes} changes offered in "
            f"{offered:.2f} s, {health.written_total} writes reached the disk, at most "
            f"{most_pending} copy waiting, last state on disk: "
            f"{saved['state']['incident_seq'] == 10_000 + args.changes - 1}"
        )
        slow.close()


if __name__ == "__main__":
    main()
