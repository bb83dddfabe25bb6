"""`spaceguardctl check-config PATH` reaches the guard's own check_config: on a FIFO or
/dev/zero it answers with a clear error at once (the file is read on a worker thread, so
the loop goes on meanwhile; only regular files, at most 1 MiB)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from spaceguard.config import load
from spaceguard.daemon import Guard

CONFIG = """\
[guard]
state_dir = "{state}"
control_socket = "{state}/control.sock"
metrics_listen = ""

[volumes.space]
path = "/space"
pause_below = "5%"
resume_above = "10%"

[[migrations]]
account = "alice"
unit = "m365-migrate@alice.service"
volume = "space"
"""


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory", "good"])
def test_check_config_verb_on_what_would_block(tmp_path: Path, kind: str) -> None:
    config_path = tmp_path / "spaceguard.toml"
    config_path.write_text(CONFIG.format(state=tmp_path / "state"))
    target = {
        "fifo": tmp_path / "fifo.toml",
        "/dev/zero": Path("/dev/zero"),
        "directory": tmp_path,
        "good": config_path,
    }[kind]
    if kind == "fifo":
        os.mkfifo(target)

    async def scenario() -> tuple[bool, str]:
        guard = Guard(config_path, load(config_path))
        try:  # a generous deadline: the old read of a FIFO never returned
            return await asyncio.wait_for(guard.check_config(str(target)), 30)
        finally:
            guard.store.close()

    ok, message = asyncio.run(scenario())
    if kind == "good":
        assert ok and message.startswith(f"{target}: OK (1 volumes, 1 migrations)")
    else:
        assert not ok and message.startswith(f"{target}: not a regular file")
