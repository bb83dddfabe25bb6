"""Names the guard accepts from outside, pure: accounts, systemd service names, incident ids,
alert receivers.

One definition each, for the config, the control protocol and the incident store. Every
check matches the whole string (`fullmatch`): `$` in a Python regex also matches before a
trailing newline, and "alice\\n" is not an account.
"""

from __future__ import annotations

import re

ACCOUNT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
INCIDENT_ID_RE = re.compile(r"[A-Za-z0-9_.@:-]{1,200}")
# it names a spool file too: no leading '.' (no hidden files, no '..')
RECEIVER_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
# systemd's unit name rules (unit_name_is_valid): [a-zA-Z0-9:_.\\-] plus one '@' for templates
SERVICE_RE = re.compile(r"[a-zA-Z0-9:_.\\-]+(@[a-zA-Z0-9:_.\\-]*)?\.service")
# Prometheus's (and Alertmanager's) label names
LABEL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_account(name: str) -> bool:
    return ACCOUNT_RE.fullmatch(name) is not None


def is_incident_id(name: str) -> bool:
    return INCIDENT_ID_RE.fullmatch(name) is not None


def is_receiver_name(name: str) -> bool:
    return RECEIVER_NAME_RE.fullmatch(name) is not None


def is_label_name(name: str) -> bool:
    return LABEL_NAME_RE.fullmatch(name) is not None


def check_unit_name(name: object) -> str:
    """A systemd service name, or ValueError saying what is wrong with it."""
    if not isinstance(name, str):
        raise ValueError(f"expected a unit name, got {name!r}")
    if len(name) > 255:
        raise ValueError("a unit name is at most 255 characters")
    if SERVICE_RE.fullmatch(name) is None or name.startswith("@") or name.endswith("@.service"):
        raise ValueError(
            f"{name!r} is not a valid systemd service name "
            "(letters, digits, ':_.\\-', an optional '@instance', ending in .service)"
        )
    return name
