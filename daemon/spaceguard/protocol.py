"""The control protocol, pure: what `spaceguardctl` and the guard say to each other.

Newline-delimited JSON, one request per line and one reply per line::

    → {"v": 1, "verb": "pause", "args": {"account": "alice", "reason": "disk swap"}, "id": 7}
    ← {"v": 1, "ok": true, "result": {"message": "alice: paused ..."}, "id": 7}
    ← {"v": 1, "ok": false, "error": {"code": "forbidden", "message": "..."}}

The envelope, the verbs, every argument's check and the reply encoding live here; the
server (`control`) and the client (`ctl`) both import them. Standard library only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from .names import is_account, is_incident_id

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024  # a request line, without its newline
MAX_REASON_CHARS = 500
MAX_PATH_CHARS = 4096
MAX_REQUEST_ID_CHARS = 200
MAX_VOLUME_CHARS = 200
MAX_REQUEST_ID_INT = 2**53  # what a JSON number can hold exactly in every client

READ_VERBS = frozenset({"status", "incidents", "show", "check-config", "version", "usage"})
CHANGE_VERBS = frozenset({"pause", "resume", "retry", "ack", "reload"})
VERBS = READ_VERBS | CHANGE_VERBS


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def error_reply(code: str, message: str, request_id: str | int | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "ok": False,
        "error": {"code": code, "message": message},
    }
    if request_id is not None:
        reply["id"] = request_id
    return reply


def check_account(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise RequestError("bad-request", f"{name} must be a string, got {kind(value)}")
    if not is_account(value):
        raise RequestError(
            "bad-request",
            f"{name} {clip(value)!r} is not an account name (letters, digits, '_.@-', at most 128)",
        )
    return value


def check_incident_id(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise RequestError("bad-request", f"{name} must be a string, got {kind(value)}")
    if not is_incident_id(value):
        raise RequestError(
            "bad-request",
            f"{name} {clip(value)!r} is not an incident id (letters, digits, '_.@:-', at most 200)",
        )
    return value


def check_reason(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise RequestError("bad-request", f"{name} must be a string, got {kind(value)}")
    if len(value) > MAX_REASON_CHARS:
        raise RequestError(
            "bad-request", f"{name} is {len(value)} characters; at most {MAX_REASON_CHARS}"
        )
    # it ends up in the journal and in STATUS=: one printable line, or it could forge entries
    if any(not char.isprintable() for char in value):
        raise RequestError("bad-request", f"{name} must be one line of printable text")
    return value


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise RequestError("bad-request", f"{name} must be true or false, got {kind(value)}")
    return value


def check_volume(name: str, value: object) -> str:
    """A volume's name as the config spells it (a TOML key: any one line of text)."""
    if not isinstance(value, str):
        raise RequestError("bad-request", f"{name} must be a string, got {kind(value)}")
    if not value or len(value) > MAX_VOLUME_CHARS or not value.isprintable():
        raise RequestError(
            "bad-request",
            f"{name} must be a volume name: printable text of 1 to {MAX_VOLUME_CHARS} characters",
        )
    return value


def check_config_path(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise RequestError("bad-request", f"{name} must be a string, got {kind(value)}")
    if not value.startswith("/") or len(value) > MAX_PATH_CHARS or "\0" in value:
        raise RequestError(
            "bad-request", f"{name} must be an absolute path (at most {MAX_PATH_CHARS} characters)"
        )
    return value


ArgCheck = Callable[[str, object], Any]

# verb → {argument: (check, required)}
ARGUMENTS: Mapping[str, Mapping[str, tuple[ArgCheck, bool]]] = {
    "status": {},
    "version": {},
    "incidents": {"account": (check_account, False)},
    "show": {"incident": (check_incident_id, True)},
    "check-config": {"path": (check_config_path, False)},
    "usage": {"volume": (check_volume, False), "rescan": (check_flag, False)},
    "pause": {"account": (check_account, True), "reason": (check_reason, False)},
    "resume": {"account": (check_account, True), "force": (check_flag, False)},
    "retry": {"account": (check_account, True)},
    # one incident, or every open incident of a migration (exactly one of the two)
    "ack": {"incident": (check_incident_id, False), "account": (check_account, False)},
    "reload": {},
}
assert set(ARGUMENTS) == VERBS


def kind(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def check_args(verb: str, raw: object) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RequestError("bad-request", f"args must be an object, got {kind(raw)}")
    spec = ARGUMENTS[verb]
    unknown = sorted(set(raw) - set(spec))
    if unknown:
        allowed = ", ".join(spec) or "none"
        raise RequestError(
            "bad-request", f"{verb}: unknown argument {clip(unknown[0])!r} (allowed: {allowed})"
        )
    args: dict[str, Any] = {}
    for name, (check, required) in spec.items():
        if name in raw:
            args[name] = check(name, raw[name])
        elif required:
            raise RequestError("bad-request", f"{verb}: missing argument {name!r}")
    if verb == "ack" and len(args) != 1:
        raise RequestError(
            "bad-request", "ack: give either 'incident' or 'account' (every open incident of it)"
        )
    return args


def read_request_id(request: dict[str, Any]) -> str | int | None:
    if "id" not in request:
        return None
    value = request["id"]
    if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_REQUEST_ID_INT:
        return value
    raise RequestError(
        "bad-request",
        f"id must be a string of at most {MAX_REQUEST_ID_CHARS} "
        f"characters or an integer, got {kind(value)}",
    )


def parse_request(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE_BYTES:
        raise RequestError("too-long", f"request is {len(line)} bytes; at most {MAX_LINE_BYTES}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError("bad-json", f"request is not UTF-8 (byte {error.start})") from None
    if not text.strip():
        raise RequestError("bad-json", "empty request line")
    try:
        request = json.loads(text)
    except RecursionError:  # deeply nested arrays: the parser recurses
        raise RequestError("bad-json", "request is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, and integers too long to convert
        raise RequestError("bad-json", f"request is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestError("bad-request", f"request must be a JSON object, got {kind(request)}")
    return request


def check_envelope(request: dict[str, Any]) -> str:
    """Check v, verb and the top-level keys; return the verb."""
    unknown = sorted(set(request) - {"v", "verb", "args", "id"})
    if unknown:
        raise RequestError(
            "bad-request", f"unknown key {clip(unknown[0])!r} (a request has v, verb, args and id)"
        )
    if "v" not in request:
        raise RequestError(
            "bad-request", f'missing protocol version "v" (this guard speaks {PROTOCOL_VERSION})'
        )
    version = request["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise RequestError("bad-request", f"v must be an integer, got {kind(version)}")
    if version != PROTOCOL_VERSION:
        raise RequestError(
            "unsupported-version",
            f"protocol version {clip(str(version))} is "
            f"not supported (this guard speaks "
            f"{PROTOCOL_VERSION})",
        )
    verb = request.get("verb")
    if not isinstance(verb, str):
        raise RequestError("bad-request", f"verb must be a string, got {kind(verb)}")
    if verb not in VERBS:
        raise RequestError(
            "unknown-verb", f"unknown verb {clip(verb)!r} (known: {', '.join(sorted(VERBS))})"
        )
    return verb


def outcome_result(verb: str, outcome: object) -> dict[str, Any]:
    """A backend's (ok, message) as a result, or a `refused` error."""
    if (
        not isinstance(outcome, tuple)
        or len(outcome) != 2
        or not isinstance(outcome[0], bool)
        or not isinstance(outcome[1], str)
    ):
        raise RequestError(
            "internal", f"{verb}: the guard returned {kind(outcome)} instead of (ok, message)"
        )
    ok, message = outcome
    if not ok:
        raise RequestError("invalid-config" if verb == "check-config" else "refused", message)
    return {"message": message}


def jsonable(value: object, depth: int = 0) -> object:
    """`value` as plain JSON data; non-finite floats become null (JSON has no NaN, and
    `jq` rejects Python's `Infinity`). Raises TypeError for anything else."""
    if depth > 64:
        raise TypeError("result is nested too deeply")
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("result has an object key that is not a string")
        return {key: jsonable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item, depth + 1) for item in value]
    raise TypeError(f"result contains {type(value).__name__}, which JSON cannot carry")


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    return (
        json.dumps(reply, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8"
        )
        + b"\n"
    )


def ok_reply(result: object, request_id: str | int | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": True, "result": result}
    if request_id is not None:
        reply["id"] = request_id
    return reply


def encode_request(verb: str, args: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, "verb": verb, "args": dict(args)}).encode() + b"\n"
