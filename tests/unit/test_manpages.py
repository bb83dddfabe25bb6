"""spaceguard.toml(5) and the commented reference config show every key config.py reads.

The keys come from config.py itself: a minimal document with every table is parsed while
`_Section.get` records each (table, key) it is asked for. Every reader asks for all of its
keys whether the document has them or not, so a new key in config.py shows up here
without this file knowing its name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from spaceguard import config

REPO = Path(__file__).resolve().parents[2]
MAN_PAGE = REPO / "packaging" / "man" / "spaceguard.toml.5"
REFERENCE = REPO / "config" / "spaceguard.toml"

# a document with one of every table, each with only its required keys
EVERY_TABLE: dict[str, Any] = {
    "guard": {},
    "volumes": {"space": {"path": "/space"}},
    "migrations": [{"account": "alice", "unit": "m@alice.service", "volume": "space"}],
    "rules": [{"name": "r", "pattern": "x", "class": "transient"}],
    "alerts": {"receivers": [{"name": "am", "kind": "alertmanager", "url": "http://a:9093"}]},
}


def table_name(where: str) -> str:
    """`volumes.space` → `volumes.NAME`, `migrations[0]` → `migrations`, `` → `` (the top)."""
    where = re.sub(r"\[\d+\]", "", where)
    return re.sub(r"^volumes\.[^.]+", "volumes.NAME", where)


def keys_config_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    read: dict[str, set[str]] = {}
    original: Callable[..., Any] = config._Section.get

    def recording(self: config._Section, key: str, *args: Any, **kwargs: Any) -> Any:
        read.setdefault(table_name(self.where), set()).add(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(config._Section, "get", recording)
    config.parse(Path("/etc/spaceguard/spaceguard.toml"), EVERY_TABLE)
    return read


def page_entries(man: str) -> dict[str, set[str]]:
    """Per `.SH`/`.SS [table]` of the page, the keys its `.TP`/`.TQ` entries name: the
    bold words of an entry's first line that start it or follow a ", " (`.BR a ", " b
    " (durations, defaults " 1m ", " 1h )` names a and b, not 1m)."""
    entries: dict[str, set[str]] = {}
    table = ""
    previous = ""
    for line in man.splitlines():
        heading = re.fullmatch(r"\.S[HS] \[{1,2}([\w.]+)\]{1,2}", line)
        if heading:
            table = heading.group(1)
            entries.setdefault(table, set())
        elif line.startswith(".SH") or line.startswith(".SS"):
            table = ""
        elif table and previous in (".TP", ".TQ") and re.match(r"\.BR? ", line):
            macro, _, rest = line.partition(" ")
            words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', rest)]
            for index, word in enumerate(words):
                bold = macro == ".B" or index % 2 == 0
                if bold and (index == 0 or words[index - 1].endswith(", ")):
                    entries[table].add(word.replace("\\-", "-"))
        previous = line
    return entries


def reference_keys(text: str) -> dict[str, set[str]]:
    """Per table of the reference config, the keys it shows, set or commented out."""
    shown: dict[str, set[str]] = {}
    table = ""
    for line in text.splitlines():
        heading = re.fullmatch(r"#?\s*\[{1,2}([\w.]+)\]{1,2}\s*", line)
        if heading:
            table = table_name(heading.group(1))
            shown.setdefault(table, set())
            continue
        key = re.match(r"#?\s*(\w+)\s*=", line)
        if key and table:
            shown[table].add(key.group(1))
    return shown


def missing(read: dict[str, set[str]], shown: dict[str, set[str]]) -> Iterator[str]:
    """Every key read but not shown; a key that is a table of its own (the top level's
    `volumes`, `[alerts]`'s `receivers`) counts as shown by its heading."""
    for table, keys in sorted(read.items()):
        for key in sorted(keys):
            path = f"{table}.{key}" if table else key
            if table_name(path) in shown or f"{path}.NAME" in shown:
                continue
            if key not in shown.get(table, set()):
                yield path


def test_the_recorded_keys_are_the_whole_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording sees every table and the keys known to matter (else the tests below
    would pass on nothing)."""
    read = keys_config_reads(monkeypatch)
    assert set(read) == {
        "",
        "guard",
        "volumes.NAME",
        "migrations",
        "rules",
        "alerts",
        "alerts.receivers",
    }
    assert {"warn_below", "admit_below", "max_freeze", "resume_step", "slice"} <= read[
        "volumes.NAME"
    ]
    assert {"expected_size", "priority", "admission", "max_freeze"} <= read["migrations"]
    assert {"bearer_token_file", "basic_auth_password_file"} <= read["alerts.receivers"]


def test_the_page_parser_finds_entries() -> None:
    entries = page_entries(
        '.SH [guard]\n.TP\n.BR a_key " (path, default " /x )\n.TP\n'
        '.BR b_key ", " c_key " (durations, defaults " 1m ", " 1h )\n'
        '.TQ\n.BR d_key " (string), " e_key " (path)"\n'
        '.TP\n.BR f_key " (unit name, default " unit )\n.SH FILES\n.TP\n.B g_key\n'
    )
    assert entries == {"guard": {"a_key", "b_key", "c_key", "1h", "d_key", "e_key", "f_key"}}


def test_the_man_page_documents_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    read = keys_config_reads(monkeypatch)
    entries = page_entries(MAN_PAGE.read_text(encoding="utf-8"))
    undocumented = list(missing(read, entries))
    assert undocumented == [], f"{MAN_PAGE.relative_to(REPO)} has no entry for {undocumented}"


def test_the_reference_config_shows_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    read = keys_config_reads(monkeypatch)
    shown = reference_keys(REFERENCE.read_text(encoding="utf-8"))
    unshown = list(missing(read, shown))
    assert unshown == [], f"{REFERENCE.relative_to(REPO)} does not show {unshown}"


def test_neither_shows_a_key_config_does_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    read = keys_config_reads(monkeypatch)
    shown = reference_keys(REFERENCE.read_text(encoding="utf-8"))
    stale = sorted(
        f"{table}.{key}" for table in shown for key in shown[table] - read.get(table, set())
    )
    assert stale == []
    entries = page_entries(MAN_PAGE.read_text(encoding="utf-8"))
    # the page's entry lines also name a default now and then (1h, 5s): keys only here
    names = {
        table: {k for k in keys if re.fullmatch(r"[a-z_]+", k)} for table, keys in entries.items()
    }
    stale = sorted(
        f"{table}.{key}" for table in names for key in names[table] - read.get(table, set())
    )
    assert stale == []
