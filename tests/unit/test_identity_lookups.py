"""NSS lookups of the control socket (control.IdentityCache) run off the loop: passwd and
group may be LDAP or sssd, which can take seconds or hang. A hung lookup ties up one
lookup thread, never the loop; one lookup per key is in flight however many clients
wait; an answer that does not come in time counts as "no name" / "no such group" (rights
then fall back to root only: the safe side).

The slow NSS here is a lookup function that blocks on an Event (no LDAP server in a unit
test); the loop's progress is shown by a task that keeps counting while it blocks."""

from __future__ import annotations

import asyncio
import grp
import pwd
import threading
from typing import Any

import pytest
from spaceguard import control
from spaceguard.control import IdentityCache

WAIT = 10.0


@pytest.fixture
def hung_nss(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[object]]:
    release = threading.Event()
    calls: list[object] = []
    real_pw, real_gr = pwd.getpwuid, grp.getgrnam

    def getpwuid(uid: int) -> Any:
        calls.append(uid)
        assert release.wait(WAIT)
        return real_pw(uid)

    def getgrnam(name: str) -> Any:
        calls.append(name)
        assert release.wait(WAIT)
        return real_gr(name)

    monkeypatch.setattr(control.pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(control.grp, "getgrnam", getgrnam)
    monkeypatch.setattr(control, "NSS_TIMEOUT_SECONDS", 0.2)
    return release, calls


def test_a_hung_lookup_does_not_hold_the_loop(
    hung_nss: tuple[threading.Event, list[object]],
) -> None:
    release, calls = hung_nss
    cache = IdentityCache()

    async def scenario() -> tuple[list[str], int | None, bool]:
        lookups = asyncio.gather(*(cache.user_async(0) for _ in range(50)))
        # the lookup thread is now stuck in getpwuid; this loop still turns (each sleep is
        # a turn) and sees it there, with the lookups still waiting: they never held it
        for _ in range(int(WAIT / 0.005)):
            if calls:
                break
            await asyncio.sleep(0.005)
        ran_meanwhile = bool(calls) and not lookups.done()
        names = await lookups
        gid = await cache.group_async("root")
        return list(names), gid, ran_meanwhile

    names, gid, ran_meanwhile = asyncio.run(scenario())
    assert ran_meanwhile
    assert names == [""] * 50  # no answer in time: no name (shown only, never a right)
    assert gid is None  # a group that does not answer counts as absent: root only
    assert calls == [0]  # one lookup in flight for 50 clients; the group waits behind it
    release.set()
    # the queued group lookup runs now; let it finish here, or it would call the next
    # test's patched getgrnam (looked up at call time) and show up in that test's calls
    assert cache._executor is not None
    cache._executor.shutdown(wait=True)


def test_the_answer_is_cached_once_it_comes(hung_nss: tuple[threading.Event, list[object]]) -> None:
    release, calls = hung_nss
    cache = IdentityCache()

    async def scenario() -> tuple[str, str]:
        first = await cache.user_async(0)  # times out
        release.set()
        for _ in range(int(WAIT / 0.01)):  # the lookup thread finishes and fills the cache
            if cache._users.get(0):
                break
            await asyncio.sleep(0.01)
        return first, await cache.user_async(0)

    first, second = asyncio.run(scenario())
    assert (first, second) == ("", "root")
    assert calls == [0]  # the second answer came from the cache
