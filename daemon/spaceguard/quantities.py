"""Units of measure, pure: sizes, durations and free-space thresholds, read and written.

The config reads them (`parse_*`), the policy, the daemon and the ctl write them for people
(`format_size`); none of them needs the rest of the config to do so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Threshold:
    """A free-space limit: either an absolute amount or a percentage of the total."""

    amount: int | None = None
    percent: float | None = None
    counts_inodes: bool = False

    def limit(self, total: int) -> int:
        if self.percent is not None:
            return int(total * self.percent / 100.0)
        return self.amount or 0

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        amount = self.amount or 0
        if self.counts_inodes:
            return f"{amount} inodes"
        for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if amount >= factor:
                return f"{amount / factor:.4g}{unit}"
        return f"{amount}B"


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_DURATION_FULL_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+")
_BARE_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_size(value: object) -> int:
    """`1048576`, `"50GiB"`, `"1.5 GB"` → bytes (binary units are 1024-based)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 50GiB, got {value!r}")
    match = _SIZE_RE.match(value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f'cannot read {value!r} as a size (use e.g. 1048576, "500MiB", "50GiB")')
    amount = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not math.isfinite(amount):  # hundreds of digits: int() would raise OverflowError
        raise ValueError(f"{value!r} is too large to be a size")
    return int(amount)


def format_size(value: float) -> str:
    """Bytes for people: `"512 B"`, `"3.0 GiB"` (1024-based, like parse_size's IEC units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_threshold(value: object, *, sizes: bool = True) -> Threshold:
    """A size (or, for inodes, a count) or a percentage such as `"5%"`."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"cannot read {value!r} as a percentage") from None
        if not 0 <= percent <= 100:
            raise ValueError(f"a percentage must be between 0% and 100%, got {value!r}")
        return Threshold(percent=percent)
    if not sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f'expected an inode count or a percentage like "1%", got {value!r}')
        return Threshold(amount=value, counts_inodes=True)
    return Threshold(amount=parse_size(value))


def parse_duration(value: object) -> float:
    """`"30s"`, `"15m"`, `"1h30m"`, `"250ms"`, or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value}")
        if not math.isfinite(value):  # TOML has nan and inf; neither is a duration
            raise ValueError(f"a duration must be a finite number of seconds, got {value}")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected a duration like "30s" or "15m", got {value!r}')
    text = value.strip().replace(" ", "")
    if _BARE_NUMBER_RE.fullmatch(text):
        return float(text)
    if not _DURATION_FULL_RE.fullmatch(text):
        raise ValueError(f'cannot read {value!r} as a duration (use e.g. "30s", "15m", "2h")')
    total = 0.0
    for match in _DURATION_RE.finditer(text):
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(total):
        raise ValueError(f"{value!r} is too long to be a duration")
    return total
