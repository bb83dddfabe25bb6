"""A state saved before the logs are followed again keeps their saved positions (issue 12,
found by tests/integration/test_kill_windows.py: after a restart, a state change saved
before the bus was connected, and so before the log followers started, wrote no log
position; a SIGKILL then made the next guard read the whole log again)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from spaceguard.config import parse
from spaceguard.model import GuardState
from spaceguard.state import StateStore
from test_config_builds import base_document


def test_positions_saved_before_the_logs_start_keep_the_saved_ones(tmp_path: Path) -> None:
    from spaceguard.daemon import Guard

    config = parse(tmp_path / "spaceguard.toml", base_document(tmp_path))
    saved = {"alice": {"dev": 1, "inode": 2, "offset": 345}}
    store = StateStore(tmp_path / "state")
    assert store.save(GuardState(), saved)
    store.close()

    async def build() -> None:
        guard = Guard(tmp_path / "spaceguard.toml", config)
        try:
            assert not guard.logs_started
            guard._save(force=True)  # a state change before the bus is connected
        finally:
            guard.store.close()

    asyncio.run(build())
    data = json.loads((tmp_path / "state" / "state.json").read_text())
    assert data["log_positions"]["alice"]["offset"] == 345
