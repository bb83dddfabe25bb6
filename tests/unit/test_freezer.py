"""The freezer helper's protocol and checks, on a real Unix socket with a real config file.

The helper's one outside call (FreezeUnit/ThawUnit over D-Bus) is replaced by a recorder
here: what is under test is what it lets through. The integration test
(tests/integration/test_privilege.py) runs it as shipped against a real systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from spaceguard.freezer import (
    MAX_LINE,
    FreezerClient,
    FreezerError,
    FreezerServer,
    Request,
    choose_path,
    format_reply,
    is_refusal,
    parse_reply,
    parse_request,
)

CONFIG = """
[guard]
state_dir = "/var/lib/spaceguard"

[volumes.space]
path = "/space"

[[migrations]]
account = "alice"
unit = "m365-migrate@alice.service"
resume_unit = "m365-migrate-resume@alice.service"
verify_unit = "m365-verify@alice.service"
volume = "space"
"""


# --- the protocol ----------------------------------------------------------------------------


def test_requests_that_parse() -> None:
    assert parse_request(b"1 freeze m365-migrate@alice.service\n") == Request(
        "1", "freeze", "m365-migrate@alice.service"
    )
    assert parse_request(b"ab12 thaw a\\x2db.service").verb == "thaw"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"freeze x.service\n", "expected 'ID VERB UNIT'"),
        (b"1 freeze x.service extra\n", "expected 'ID VERB UNIT'"),
        (b"1  freeze x.service\n", "expected 'ID VERB UNIT'"),
        (b"1 stop x.service\n", "unknown verb 'stop'"),
        (b"1 FreezeUnit x.service\n", "unknown verb"),
        (b"12345678901234567 freeze x.service\n", "ID must be"),
        (b"a-b freeze x.service\n", "ID must be"),
        (b"1 freeze x/../y.service\n", "not a unit name"),
        (b"1 freeze \xff.service\n", "not ASCII"),
        (b"\n", "expected"),
    ],
)
def test_bad_requests_say_why(line: bytes, why: str) -> None:
    with pytest.raises(FreezerError, match="bad request") as error:
        parse_request(line)
    assert why in str(error.value)


def test_replies_are_one_line() -> None:
    assert format_reply("7") == b"7 ok\n"
    assert format_reply("7", "Name: two\nlines") == b"7 error Name: two lines\n"
    long = format_reply("7", "org.freedesktop.DBus.Error.AccessDenied: " + "x" * 2000)
    assert len(long) == MAX_LINE and long.endswith(b"...\n")
    assert parse_reply(b"7 ok\n") == ("7", None)
    assert parse_reply(b"7 error Name: text\n") == ("7", "Name: text")
    with pytest.raises(FreezerError, match="unreadable reply"):
        parse_reply(b"7 maybe\n")


def test_the_probe_decides_the_path() -> None:
    denied = "org.freedesktop.DBus.Error.AccessDenied: Rejected send message"
    assert choose_path(denied, helper=True)[0] == "helper"
    assert choose_path(denied, helper=False)[0] == "direct"  # nothing better to try
    interactive = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired: x"
    assert choose_path(interactive, helper=True)[0] == "helper"
    missing = "org.freedesktop.systemd1.NoSuchUnit: Unit spaceguard-probe-1.service not loaded."
    assert choose_path(missing, helper=True) == (
        "direct",
        "systemd lets this process call FreezeUnit",
    )
    assert choose_path(None, helper=True)[0] == "direct"
    assert "unexpectedly" in choose_path("org.x.Other: y", helper=True)[1]
    assert is_refusal(denied) and is_refusal(interactive) and not is_refusal(missing)


# --- the helper on a real socket ---------------------------------------------------------------


class Rig:
    def __init__(self, tmp_path: Path, user: str) -> None:
        self.config = tmp_path / "spaceguard.toml"
        self.config.write_text(CONFIG)
        self.socket = tmp_path / "run" / "freezer.sock"
        self.server = FreezerServer(self.config, user, self.socket)
        self.calls: list[tuple[str, str]] = []
        self.gate: dict[str, asyncio.Event] = {}
        self.server.call = self.call  # type: ignore[method-assign]

    async def call(self, verb: str, unit: str) -> str | None:
        self.calls.append((verb, unit))
        if unit in self.gate:
            await self.gate[unit].wait()
        if unit.startswith("m365-migrate-resume@"):
            return "org.freedesktop.systemd1.UnitBusy: Unit has a pending job."
        return None

    async def raw(self, *lines: bytes) -> list[bytes]:
        """Send lines on a fresh connection; every reply line until the helper closes or a
        short quiet time."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        for line in lines:
            writer.write(line)
        await writer.drain()
        replies = []
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), 1.0)
                if not line:
                    break
                replies.append(line)
                if len(replies) == len(lines):
                    break
        except TimeoutError:
            pass
        writer.close()
        return replies


def serve(user: str) -> Callable[..., Callable[..., Awaitable[None]]]:
    """Run the test body with a started helper that only lets `user` in."""

    def decorate(body: Callable[[Rig], Awaitable[None]]) -> Callable[[Path], None]:
        def run(tmp_path: Path) -> None:
            async def main() -> None:
                rig = Rig(tmp_path, user)
                await rig.server.start()
                try:
                    await body(rig)
                finally:
                    await rig.server.close()

            asyncio.run(main())

        run.__name__ = body.__name__
        return run

    return decorate  # type: ignore[return-value]


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _other_user() -> str:
    import pwd

    for name in ("nobody", "daemon", "root"):
        try:
            if pwd.getpwnam(name).pw_uid != os.getuid():
                return name
        except KeyError:
            continue
    raise AssertionError("no second user on this system")


def test_configured_units_only(tmp_path: Path) -> None:
    @serve(_me())
    async def body(rig: Rig) -> None:
        client = FreezerClient(rig.socket)
        await client.request("freeze", "m365-migrate@alice.service")
        await client.request("thaw", "m365-migrate@alice.service")
        # the resume unit is a migration unit too; systemd's refusal comes back as text
        with pytest.raises(FreezerError, match="UnitBusy: Unit has a pending job"):
            await client.request("freeze", "m365-migrate-resume@alice.service")
        for unit in ("m365-verify@alice.service", "m365-migrate@bob.service", "dbus.service"):
            with pytest.raises(FreezerError, match=f"refused: {unit} is not a migration unit"):
                await client.request("freeze", unit)
        await client.close()
        assert rig.calls == [
            ("freeze", "m365-migrate@alice.service"),
            ("thaw", "m365-migrate@alice.service"),
            ("freeze", "m365-migrate-resume@alice.service"),
        ]

    body(tmp_path)


def test_the_config_is_followed_and_a_broken_file_keeps_the_last_list(tmp_path: Path) -> None:
    @serve(_me())
    async def body(rig: Rig) -> None:
        client = FreezerClient(rig.socket)
        with pytest.raises(FreezerError, match="refused"):
            await client.request("freeze", "m365-migrate@bob.service")
        rig.config.write_text(
            CONFIG
            + textwrap.dedent("""
            [[migrations]]
            account = "bob"
            unit = "m365-migrate@bob.service"
            volume = "space"
            """)
        )
        await client.request("freeze", "m365-migrate@bob.service")  # no SIGHUP needed
        rig.config.write_text("[guard\n")
        await client.request("thaw", "m365-migrate@bob.service")  # the last good list
        with pytest.raises(FreezerError, match=r"the config does not load: .*not valid TOML"):
            await client.request("freeze", "m365-migrate@carol.service")
        await client.close()
        assert rig.calls == [
            ("freeze", "m365-migrate@bob.service"),
            ("thaw", "m365-migrate@bob.service"),
        ]

    body(tmp_path)


def test_bad_lines_get_an_error_and_change_nothing(tmp_path: Path) -> None:
    @serve(_me())
    async def body(rig: Rig) -> None:
        replies = await rig.raw(
            b"1 stop m365-migrate@alice.service\n",
            b"garbage\n",
            b"2 freeze m365-migrate@alice.service\n",  # the connection goes on
        )
        assert replies == [
            b"- error bad request: unknown verb 'stop' (only freeze, thaw)\n",
            b"- error bad request: expected 'ID VERB UNIT'\n",
            b"2 ok\n",
        ]
        long = await rig.raw(b"1 freeze " + b"a" * MAX_LINE + b".service\n")
        assert long == [b"- error bad request: line longer than 512 bytes\n"]
        assert rig.calls == [("freeze", "m365-migrate@alice.service")]

    body(tmp_path)


def test_replies_come_as_each_request_is_done(tmp_path: Path) -> None:
    @serve(_me())
    async def body(rig: Rig) -> None:
        rig.config.write_text(
            CONFIG.replace(
                'resume_unit = "m365-migrate-resume@alice', 'resume_unit = "m365-migrate@slow'
            )
        )
        rig.gate["m365-migrate@slow.service"] = asyncio.Event()
        client = FreezerClient(rig.socket)
        slow = asyncio.create_task(client.request("freeze", "m365-migrate@slow.service"))
        await asyncio.sleep(0.05)
        await asyncio.wait_for(client.request("freeze", "m365-migrate@alice.service"), 5)
        assert not slow.done()  # the second answer did not wait for the first
        rig.gate["m365-migrate@slow.service"].set()
        await asyncio.wait_for(slow, 5)
        await client.close()

    body(tmp_path)


def test_other_peers_are_refused(tmp_path: Path) -> None:
    @serve(_other_user())
    async def body(rig: Rig) -> None:
        replies = await rig.raw(b"1 freeze m365-migrate@alice.service\n")
        assert len(replies) == 1 and replies[0].startswith(b"- error forbidden: only user ")
        client = FreezerClient(rig.socket)
        with pytest.raises(FreezerError, match="forbidden"):
            await client.request("freeze", "m365-migrate@alice.service")
        assert rig.calls == []

    body(tmp_path)


def test_a_missing_helper_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        client = FreezerClient(tmp_path / "nothing.sock", timeout=2)
        with pytest.raises(FreezerError, match=r"cannot reach the freezer helper at .*nothing"):
            await client.request("freeze", "m365-migrate@alice.service")

    asyncio.run(main())


def test_an_unknown_user_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FreezerError, match="user 'no-such-user-sg' does not exist"):
        FreezerServer(tmp_path / "x.toml", "no-such-user-sg", tmp_path / "s.sock")


def test_socket_mode(tmp_path: Path) -> None:
    @serve(_me())
    async def body(rig: Rig) -> None:
        assert rig.socket.stat().st_mode & 0o777 == 0o660
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(rig.socket))

    body(tmp_path)
