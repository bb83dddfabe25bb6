"""The freezer helper and a volume's slice (volumes.X.slice): it freezes the configured
slice in one call, and never thaws it (a slice's thaw would thaw every member, an
operator's hold included: the guard thaws the members one by one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from spaceguard.freezer import FreezerClient, FreezerError

from tests.unit.test_freezer import CONFIG, Rig, _me, serve

SLICED = CONFIG.replace('path = "/space"\n', 'path = "/space"\nslice = "m365-space.slice"\n')


def test_the_configured_slice_is_frozen_and_never_thawed(tmp_path: Path) -> None:
    @serve(_me())
    async def body(rig: Rig) -> None:
        rig.config.write_text(SLICED)
        client = FreezerClient(rig.socket)
        await client.request("freeze", "m365-space.slice")
        with pytest.raises(FreezerError, match=re.escape("refused: m365-space.slice is a slice")):
            await client.request("thaw", "m365-space.slice")
        with pytest.raises(
            FreezerError, match=re.escape("refused: system.slice is not a migration unit")
        ):
            await client.request("freeze", "system.slice")
        await client.close()
        assert rig.calls == [("freeze", "m365-space.slice")]

    body(tmp_path)
