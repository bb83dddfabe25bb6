"""A batch's cost is per line, not per byte: a log full of error lines (an old log read at
a first start, a systemic failure) must not hold the guard's loop for seconds. Each turn
of the loop reads at most MAX_BYTES_PER_TURN or MAX_SECONDS_PER_TURN, whichever ends
first (bench/item_errors.py measures what that means in milliseconds)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

from spaceguard.logwatch import MAX_SECONDS_PER_TURN, LogWatcher
from test_logwatch import run, wait_until


def test_a_slow_consumer_gets_one_batch_per_loop_turn(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("".join(f"error line {i}\n" for i in range(2000)))

    async def scenario() -> None:
        batches: list[int] = []
        seen_by_turn: list[int] = []
        done = asyncio.Event()

        def slow(key: str, lines: list[str]) -> None:
            time.sleep(MAX_SECONDS_PER_TURN * 1.2)  # each batch outlasts a turn's budget
            batches.append(len(lines))
            if sum(batches) == 2000:
                done.set()

        async def ticker() -> None:
            while not done.is_set():
                seen_by_turn.append(len(batches))
                await asyncio.sleep(0)

        # 64 batches of 512 bytes; the byte budget alone would read all in one turn
        watcher = LogWatcher(read_chunk_bytes=512, max_bytes_per_turn=1 << 20)
        task = asyncio.create_task(ticker())
        watcher.add("k", path, None, slow)
        await wait_until(done.is_set, timeout=30)
        await task
        watcher.close()
        assert len(batches) > 10
        steps = [b - a for a, b in itertools.pairwise(seen_by_turn)]
        assert max(steps) == 1, steps  # the loop turned between any two batches

    run(scenario)


def test_cheap_batches_share_a_turn(tmp_path: Path) -> None:
    """The time budget does not cost cheap lines a turn per batch."""
    path = tmp_path / "m.log"
    path.write_text("".join(f"info line {i}\n" for i in range(2000)))

    async def scenario() -> None:
        batches: list[int] = []
        turns = 0
        done = asyncio.Event()

        def quick(key: str, lines: list[str]) -> None:
            batches.append(len(lines))
            if sum(batches) == 2000:
                done.set()

        async def ticker() -> None:
            nonlocal turns
            while not done.is_set():
                turns += 1
                await asyncio.sleep(0)

        watcher = LogWatcher(read_chunk_bytes=512, max_bytes_per_turn=1 << 20)
        task = asyncio.create_task(ticker())
        watcher.add("k", path, None, quick)
        await wait_until(done.is_set, timeout=30)
        await task
        watcher.close()
        assert len(batches) > 10
        assert turns < len(batches)

    run(scenario)
