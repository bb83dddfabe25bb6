"""Fuzzing the control protocol's parser and dispatcher (`handle_line`) with hypothesis.

Whatever the line (arbitrary bytes, arbitrary JSON, near-valid requests) and whatever the
backend does (answers, answers nonsense, raises), no exception escapes and the reply is a
JSON object with `v` and `ok`. The backend never sees an argument that fails the
protocol's checks, and nobody gets a result for a verb they may not use.

SPACEGUARD_FUZZ_EXAMPLES is the number of examples for the whole file, shared evenly by
its four tests: 2,000 by default (about 10 s), 100,000 from bench/control_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

DAEMON_DIR = Path(__file__).resolve().parents[2] / "daemon"
if str(DAEMON_DIR) not in sys.path:
    sys.path.insert(0, str(DAEMON_DIR))

from spaceguard.control import Access, Peer, handle_line  # noqa: E402
from spaceguard.protocol import ARGUMENTS, VERBS  # noqa: E402

FUZZ_TESTS = 4
EXAMPLES = int(os.environ.get("SPACEGUARD_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(
    max_examples=max(1, -(-EXAMPLES // FUZZ_TESTS)),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ERROR_CODES = {
    "bad-json",
    "bad-request",
    "unknown-verb",
    "too-long",
    "forbidden",
    "not-found",
    "refused",
    "invalid-config",
    "internal",
    "unsupported-version",
}
EXAMPLES_RUN: Counter[str] = Counter()  # per test, for bench/control_fuzz.py

READER_GID, ADMIN_GID = 5001, 5002
ACCESS = Access(
    reader_group="readers", admin_group="admins", reader_gid=READER_GID, admin_gid=ADMIN_GID
)
PEERS = [
    Peer(uid=0, gid=0, pid=1, user="root", gids=frozenset({0})),
    Peer(uid=1000, gid=1000, pid=2, user="reader", gids=frozenset({1000, READER_GID})),
    Peer(uid=1001, gid=1001, pid=3, user="admin", gids=frozenset({1001, ADMIN_GID})),
    Peer(uid=65534, gid=65534, pid=4, user="", gids=frozenset({65534})),
]

_loop: asyncio.AbstractEventLoop | None = None


def run(coroutine: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """One loop for every example: a new loop each time would dominate the run time."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coroutine)


# --- a backend that checks what it is given and answers whatever it is told to ------------


class NotJson:
    pass


ODD_RESULTS: list[Any] = [
    None,
    0,
    "text",
    [1, 2],
    float("nan"),
    float("inf"),
    {"k": float("-inf")},
    (True, "ok"),
    (False, "no"),
    (1, "x"),
    (True,),
    {1: "int key"},
    {"x": NotJson()},
    NotJson(),
    {"x": {1, 2}},
    b"bytes",
    [[[[[[[[]]]]]]]],
    {"deep": [{"deeper": (1, 2.5, None)}]},
]


# --- the oracle: what the backend may be given, written out here on its own -----------------
#
# Not the production regular expressions (an oracle that imports what it checks agrees with
# every bug in it: with `^...$` and re.match, "alice\n" passed both), but the documented
# character sets, one character at a time.

ACCOUNT_FIRST = frozenset(string.ascii_letters + string.digits)
ACCOUNT_CHARS = ACCOUNT_FIRST | frozenset("_.@-")
INCIDENT_CHARS = frozenset(string.ascii_letters + string.digits + "_.@:-")
REASON_MAX_CHARS = 500


def oracle_account(value: object) -> bool:
    """Letters, digits and '_.@-', at most 128, starting with a letter or digit."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 128
        and value[0] in ACCOUNT_FIRST
        and all(char in ACCOUNT_CHARS for char in value)
    )


def oracle_incident_id(value: object) -> bool:
    """Letters, digits and '_.@:-', 1 to 200 of them."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 200
        and all(char in INCIDENT_CHARS for char in value)
    )


def oracle_one_line(value: str) -> bool:
    """No control character and no line or paragraph separator (it goes to the journal)."""
    return not any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in value)


def test_the_oracle_itself() -> None:
    for good in ("alice", "a", "A.b_c-d@e", "a" * 128):
        assert oracle_account(good), good
    for bad in (
        "",
        "alice\n",
        "alice\r",
        "\nalice",
        " alice",
        "-x",
        ".x",
        "a/b",
        "é",
        "a" * 129,
        "ali ce",
        "alice\x00",
        7,
        None,
    ):
        assert not oracle_account(bad), bad
    assert oracle_incident_id("20240101T000000Z-bob-1")
    for bad in ("", "x\n", "../etc", "a/b", "x" * 201, 1):
        assert not oracle_incident_id(bad), bad
    assert oracle_one_line("disk swap tonight") and not oracle_one_line("line\nforged")


# accounts and incident ids the oracle accepts, built from the same character sets
oracle_accounts = st.builds(
    str.__add__,
    st.sampled_from(sorted(ACCOUNT_FIRST)),
    st.text(alphabet=sorted(ACCOUNT_CHARS), max_size=127),
)
oracle_incident_ids = st.text(alphabet=sorted(INCIDENT_CHARS), min_size=1, max_size=200)


class FuzzBackend:
    """Returns `outcome` from every method, or raises it; records argument violations."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.violations: list[str] = []
        self.called = False

    def _answer(self, well_formed: Any) -> Any:
        self.called = True
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return well_formed if self.outcome == "well-formed" else self.outcome

    def _check_account(self, account: object) -> None:
        if not oracle_account(account):
            self.violations.append(f"account {account!r}")

    def _check_incident(self, incident_id: object) -> None:
        if not oracle_incident_id(incident_id):
            self.violations.append(f"incident {incident_id!r}")

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._answer({"version": "x", "volumes": [], "migrations": []})
        return result

    async def usage(self, volume: str | None, rescan: bool) -> dict[str, Any]:
        await asyncio.sleep(0)
        if volume is not None and (
            not isinstance(volume, str) or not 0 < len(volume) <= 200 or not volume.isprintable()
        ):
            self.violations.append(f"volume {volume!r}")
        if not isinstance(rescan, bool):
            self.violations.append(f"rescan {rescan!r}")
        result: dict[str, Any] = self._answer({"volumes": [], "now": 0.0})
        return result

    async def operator(
        self, verb: str, account: str, reason: str, force: bool, who: str
    ) -> tuple[bool, str]:
        await asyncio.sleep(0)
        self._check_account(account)
        if verb not in ("pause", "resume", "retry"):
            self.violations.append(f"verb {verb!r}")
        if (
            not isinstance(reason, str)
            or len(reason) > REASON_MAX_CHARS
            or not oracle_one_line(reason)
        ):
            self.violations.append(f"reason {reason!r}")
        if not isinstance(force, bool) or not isinstance(who, str):
            self.violations.append(f"force {force!r} / who {who!r}")
        result: tuple[bool, str] = self._answer((True, "done"))
        return result

    def incidents(self, account: str | None) -> list[dict[str, Any]]:
        if account is not None:
            self._check_account(account)
        result: list[dict[str, Any]] = self._answer([{"id": "a-1"}])
        return result

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        self._check_incident(incident_id)
        result: dict[str, Any] | None = self._answer({"id": incident_id, "text": "t"})
        return result

    def ack(self, incident_id: str, who: str) -> tuple[bool, str]:
        self._check_incident(incident_id)
        result: tuple[bool, str] = self._answer((True, "acked"))
        return result

    async def ack_account(self, account: str, who: str) -> tuple[bool, str]:
        self._check_account(account)
        result: tuple[bool, str] = self._answer((True, "acked"))
        return result

    async def reload(self) -> tuple[bool, str]:
        result: tuple[bool, str] = self._answer((True, "reloaded"))
        return result

    async def check_config(self, path: str | None) -> tuple[bool, str]:
        if path is not None and (
            not isinstance(path, str) or not path.startswith("/") or "\0" in path
        ):
            self.violations.append(f"path {path!r}")
        result: tuple[bool, str] = self._answer((True, "OK"))
        return result


# --- strategies ---------------------------------------------------------------------------------

# kept small: generating data is most of the run time, the server's work is tiny
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.integers(min_value=-(2**70), max_value=2**70)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)

# values that come close to what each argument accepts, and some that are just over
argument_values = (
    oracle_accounts
    | oracle_incident_ids
    | oracle_accounts.map(lambda name: name + "\n")
    | st.sampled_from(
        [
            "alice",
            "a" * 128,
            "a" * 129,
            "-x",
            "a/b",
            "../etc",
            "",
            "a\n",
            "alice\r\n",
            "\nalice",
            "20240101T000000Z-bob-1\n",
            "/etc/x",
            "x" * 500,
            "x" * 501,
            "relative",
            "/" + "p" * 5000,
            "/a\x00b",
            "é",
        ]
    )
    | st.booleans()
    | st.text(max_size=30)
    | json_values
)
argument_names: st.SearchStrategy[str] = st.sampled_from(
    sorted({name for spec in ARGUMENTS.values() for name in spec} | {"", "Account", "x"})
)
verbs = st.sampled_from(sorted(VERBS)) | st.text(max_size=20)
request_ids = (
    st.none()
    | st.integers()
    | st.text(max_size=210)
    | st.floats()
    | st.booleans()
    | st.lists(st.integers(), max_size=2)
)


def valid_values(name: str) -> st.SearchStrategy[Any]:
    if name == "account":
        return oracle_accounts
    if name == "incident":
        return oracle_incident_ids
    if name == "reason":
        return st.text(PRINTABLE, max_size=30)
    if name in ("force", "rescan"):
        return st.booleans()
    if name == "volume":
        return st.text(PRINTABLE, min_size=1, max_size=30)
    return st.text(PRINTABLE, max_size=30).map(lambda text: "/" + text)  # path


@st.composite
def near_valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    # mostly the right version and a known verb, so that the arguments get exercised
    verb = draw(st.sampled_from(sorted(VERBS))) if draw(st.integers(0, 4)) else draw(verbs)
    version = (
        1
        if draw(st.integers(0, 4))
        else draw(st.sampled_from([0, 2, "1", 1.0, True, None, -1, 2**64]))
    )
    request: dict[str, Any] = {"v": version, "verb": verb}
    shape = draw(st.integers(0, 3))
    if verb in ARGUMENTS and shape <= 1:
        # valid arguments for the verb, then (shape 1) one of them changed or added
        args = {
            name: draw(valid_values(name))
            for name, (_, required) in ARGUMENTS[verb].items()
            if required or draw(st.booleans())
        }
        if shape == 1:
            args[draw(argument_names)] = draw(argument_values)
        request["args"] = args
    elif shape == 2:
        request["args"] = draw(
            st.dictionaries(argument_names, argument_values, max_size=4) | json_values
        )
    if draw(st.booleans()):
        request["id"] = draw(request_ids)
    if draw(st.integers(0, 9)) == 0:
        request[draw(st.text(max_size=8))] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        del request[draw(st.sampled_from(sorted(request)))]
    return request


def _json_line(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


backend_outcomes = (
    st.just("well-formed")
    | st.sampled_from(ODD_RESULTS)
    | st.sampled_from(
        [RuntimeError("boom"), KeyError("k"), ValueError("v"), OSError(5, "EIO"), TypeError("t")]
    )
)
peers = st.sampled_from(PEERS)
# what str.isprintable() accepts: no control, format, private, unassigned or separator
# characters except the space
PRINTABLE = st.characters(
    exclude_categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"], include_characters=" "
)


def check_reply(reply: object, peer: Peer, backend: FuzzBackend, verb: object) -> None:
    assert isinstance(reply, dict)
    # --hypothesis-show-statistics shows how often each outcome came up
    event("ok" if reply.get("ok") else f"error {reply.get('error', {}).get('code')}")
    json.dumps(reply, allow_nan=False)  # serialisable as standard JSON
    assert reply["v"] == 1 and isinstance(reply["ok"], bool)
    assert set(reply) <= {"v", "ok", "result", "error", "id"}
    if reply["ok"]:
        assert "result" in reply and "error" not in reply
        assert isinstance(verb, str) and ACCESS.allows(peer, verb)
    else:
        error = reply["error"]
        assert set(error) == {"code", "message"} and isinstance(error["message"], str)
        assert error["code"] in ERROR_CODES, error
    assert not backend.violations, backend.violations
    if backend.called:
        assert isinstance(verb, str) and ACCESS.allows(peer, verb)


def _verb_of(line: bytes) -> object:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return request.get("verb") if isinstance(request, dict) else None


@FUZZ
@given(
    line=st.binary(max_size=3000)
    | st.sampled_from([b"", b"\n", b"{", b"[" * 100_000, b"1" * 70_000, b"\xff" * 10]),
    peer=peers,
    outcome=backend_outcomes,
)
def test_arbitrary_bytes(line: bytes, peer: Peer, outcome: Any) -> None:
    EXAMPLES_RUN["arbitrary bytes"] += 1
    backend = FuzzBackend(outcome)
    reply = run(handle_line(line, peer, backend, ACCESS))
    check_reply(reply, peer, backend, _verb_of(line))


@FUZZ
@given(value=json_values, peer=peers, outcome=backend_outcomes)
def test_arbitrary_json(value: Any, peer: Peer, outcome: Any) -> None:
    EXAMPLES_RUN["arbitrary JSON"] += 1
    backend = FuzzBackend(outcome)
    line = _json_line(value)
    reply = run(handle_line(line.rstrip(b"\n"), peer, backend, ACCESS))
    check_reply(reply, peer, backend, _verb_of(line))


@FUZZ
@given(request=near_valid_requests(), peer=peers, outcome=backend_outcomes)
def test_near_valid_requests(request: dict[str, Any], peer: Peer, outcome: Any) -> None:
    EXAMPLES_RUN["near-valid requests"] += 1
    backend = FuzzBackend(outcome)
    line = _json_line(request)
    reply = run(handle_line(line.rstrip(b"\n"), peer, backend, ACCESS))
    check_reply(reply, peer, backend, request.get("verb"))
    # the id comes back exactly when it was a usable one
    request_id = request.get("id")
    usable_id = (isinstance(request_id, str) and len(request_id) <= 200) or (
        isinstance(request_id, int)
        and not isinstance(request_id, bool)
        and abs(request_id) <= 2**53
    )
    if "id" in reply:
        assert reply["id"] == request_id and usable_id
    elif reply["ok"]:
        assert "id" not in request


@FUZZ
@given(
    verb=st.sampled_from(sorted(VERBS)),
    peer=peers,
    outcome=backend_outcomes,
    account=oracle_accounts,
    incident=oracle_incident_ids,
    reason=st.text(PRINTABLE, max_size=30) | st.just("r" * REASON_MAX_CHARS),
    force=st.booleans(),
    ack_by_account=st.booleans(),
)
def test_valid_requests_reach_the_backend(
    verb: str,
    peer: Peer,
    outcome: Any,
    account: str,
    incident: str,
    reason: str,
    force: bool,
    ack_by_account: bool,
) -> None:
    """Valid requests from someone allowed are served (or fail only through the backend)."""
    EXAMPLES_RUN["valid requests"] += 1
    candidates = {
        "account": account,
        "incident": incident,
        "reason": reason,
        "force": force,
        "path": "/etc/spaceguard/spaceguard.toml",
    }
    args = {
        name: candidates[name]
        for name, (_, required) in ARGUMENTS[verb].items()
        if required or name in ("reason", "force")
    }
    if verb == "ack":  # one incident, or every open one of an account
        args = {"account": account} if ack_by_account else {"incident": incident}
    backend = FuzzBackend(outcome)
    reply = run(
        handle_line(
            _json_line({"v": 1, "verb": verb, "args": args}).rstrip(b"\n"), peer, backend, ACCESS
        )
    )
    check_reply(reply, peer, backend, verb)
    if not ACCESS.allows(peer, verb):
        assert reply["error"]["code"] == "forbidden" and not backend.called
    elif outcome == "well-formed":
        assert reply["ok"], reply
    elif not reply["ok"]:
        assert reply["error"]["code"] in {"internal", "refused", "invalid-config", "not-found"}, (
            reply
        )


TRAILING_NEWLINES = [
    ("pause", {"account": "alice\n"}),
    ("resume", {"account": "alice\n"}),
    ("retry", {"account": "alice\n"}),
    ("incidents", {"account": "alice\n"}),
    ("show", {"incident": "20240101T000000Z-alice-1\n"}),
    ("ack", {"incident": "20240101T000000Z-alice-1\n"}),
]


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    """Python's `$` also matches before a final "\\n": the production check must not let
    "alice\\n" through to the backend (and from there into the journal or a file name)."""
    for verb, args in TRAILING_NEWLINES:
        backend = FuzzBackend("well-formed")
        line = _json_line({"v": 1, "verb": verb, "args": args}).rstrip(b"\n")
        reply = run(handle_line(line, PEERS[0], backend, ACCESS))
        assert not backend.called, f"{verb} {args!r} reached the backend: {reply}"
        assert reply["ok"] is False and reply["error"]["code"] == "bad-request", reply
