"""The guard's TOML configuration: parsing, units of measure, validation.

Every key the guard reads is declared here, and every error names the file, the key
path and what is wrong, like `nginx -t`. A bad file never half-applies: `load()` either
returns a complete `Config` or raises `ConfigError`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .names import check_unit_name, is_account, is_label_name, is_receiver_name
from .quantities import Threshold, parse_duration, parse_size, parse_threshold
from .smallfile import NotARegularFile, read_small_file

PauseMode = Literal["freeze", "stop"]
FAILURE_CLASSES = ("transient", "unrecoverable", "disk_full")


class ConfigError(ValueError):
    """A configuration problem, already phrased for the operator."""


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    path: Path
    pause_below: Threshold
    resume_above: Threshold
    pause_below_inodes: Threshold
    resume_above_inodes: Threshold
    resume_after: float
    predict: float
    require_mount: bool = True
    # The fastest this volume can be filled (bytes/s): it sets how often we sample, so a
    # writer at full speed cannot cross the headroom between two samples.
    max_write_speed: int = 2 * 1024**3
    poll_min: float = 0.001
    poll_max: float = 1.0
    # What fills the volume (consumers.py): a scan every usage_interval (0: only when the
    # volume runs low and on demand), entries down to usage_depth, the usage_top largest,
    # cut after usage_budget seconds or usage_max_entries entries.
    usage_interval: float = 3600.0
    usage_depth: int = 1
    usage_top: int = 10
    usage_budget: float = 30.0
    usage_max_entries: int = 5_000_000
    usage_old_after: float = 30 * 86400.0
    # The ladder (space planning): below warn_below (for warn_after) an alert only; below
    # admit_below no migration starts writing (a unit that starts is held); below
    # pause_below everything is paused; a freeze older than max_freeze becomes a stop
    # (resumed later through resume_unit). Resuming after recovery: in batches, highest
    # priority first, a batch every resume_step while the fill rate leaves room (see
    # policy._release_slot). None: that step is off.
    warn_below: Threshold | None = None
    warn_after: float = 0.0
    admit_below: Threshold | None = None
    max_freeze: float = 3600.0  # measured: README, "Long freezes (measured)"
    resume_batch: int = 0  # 0: sized from the rate the writers filled the volume at
    resume_step: float = 10.0
    # the slice this volume's migrations run in (Slice= in their units), and nothing else:
    # one FreezeUnit of it freezes them all ("": one FreezeUnit per unit)
    slice: str = ""


@dataclass(frozen=True)
class MigrationConfig:
    account: str
    unit: str
    volume: str
    log: Path | None = None
    pause: PauseMode = "freeze"
    resume_unit: str = ""
    destination: Path | None = None
    stall_after: float = 0.0
    max_retries: int = 3
    retry_backoff: float = 60.0
    retry_backoff_max: float = 3600.0
    verify_command: tuple[str, ...] = ()
    verify_unit: str = ""
    verify_timeout: float = 3600.0
    # the circuit breaker: more item errors than this within item_error_window (0: in the
    # whole run) is not a few bad items but a systemic failure; the run is stopped
    max_item_errors: int = 500
    item_error_window: float = 600.0
    log_time: Literal["local", "utc"] = "local"  # how the log's text lines give the time
    # Space planning: what the run will still write when rclone has not said yet (its
    # "Transferred: x / y" totals win once known); higher priority resumes first;
    # admission = false starts it whether or not it fits; max_freeze overrides the volume's.
    expected_size: int | None = None
    priority: int = 0
    admission: bool = True
    max_freeze: float | None = None
    # the size probe: a oneshot unit the guard starts (as verify_unit) when a run's size is
    # unknown; it writes rclone size --json's output to size_file (policy: "sizing")
    size_unit: str = ""
    size_file: Path | None = None
    size_timeout: float = 1800.0

    @property
    def verifies(self) -> bool:
        return bool(self.verify_command or self.verify_unit)

    @property
    def units(self) -> tuple[str, ...]:
        """Every unit that runs this migration (the main one and its resume unit)."""
        if self.resume_unit and self.resume_unit != self.unit:
            return (self.unit, self.resume_unit)
        return (self.unit,)


@dataclass(frozen=True)
class RuleConfig:
    name: str
    pattern: str
    failure_class: str
    scope: str = ""  # "item", "run", or "" (as the line's structure says)


@dataclass(frozen=True)
class ReceiverConfig:
    name: str
    kind: Literal["alertmanager", "webhook"]
    url: str
    bearer_token: str | None = None
    basic_auth: tuple[str, str] | None = None
    timeout: float = 5.0
    # deliveries go straight to the receiver, whatever http_proxy says, unless this is set
    proxy: str = ""


@dataclass(frozen=True)
class AlertsConfig:
    receivers: tuple[ReceiverConfig, ...] = ()
    resend_interval: float = 60.0
    max_backoff: float = 300.0
    generator_url: str = ""
    # added to every alert the guard pushes (e.g. instance, site: which guard says it)
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GuardConfig:
    state_dir: Path = Path("/var/lib/spaceguard")
    control_socket: Path = Path("/run/spaceguard/control.sock")
    metrics_listen: str = "127.0.0.1:9839"
    bus_address: str = ""
    reader_group: str = ""
    admin_group: str = ""
    log_level: str = "info"
    log_recheck_interval: float = 5.0
    # acknowledged incidents kept: the newest N, none acknowledged longer ago (0: no limit);
    # an incident nobody acknowledged is never pruned
    acked_incidents_keep: int = 1000
    acked_incidents_max_age: float = 90 * 86400.0
    # the freezer helper (spaceguard-freezer.socket), used when systemd refuses FreezeUnit
    freezer_socket: Path = Path("/run/spaceguard-freezer/freezer.sock")
    # every unit's state is compared with systemd's this often (0: never), a backstop for
    # what no signal says (systemd 252 sends none when only FreezerState changes)
    resync_interval: float = 60.0


@dataclass(frozen=True)
class Config:
    source: Path
    guard: GuardConfig
    volumes: Mapping[str, VolumeConfig]
    migrations: tuple[MigrationConfig, ...]
    rules: tuple[RuleConfig, ...] = ()
    alerts: AlertsConfig = field(default_factory=AlertsConfig)

    def migration(self, account: str) -> MigrationConfig | None:
        for migration in self.migrations:
            if migration.account == account:
                return migration
        return None


# --- the reader ---------------------------------------------------------------------------


class _Section:
    """A TOML table read key by key, so that errors name the key path and leftovers fail."""

    def __init__(self, source: Path, where: str, table: object) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {where}: expected a table, got {type(table).__name__}")
        self.source, self.where, self.table = source, where, dict(table)
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.path(key)}: {message}")

    def get(
        self, key: str, convert: Callable[[Any], Any], default: Any = None, required: bool = False
    ) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if required:
                raise ConfigError(f"{self.source}: {self.path(key)}: missing (required)")
            return default
        try:
            return convert(self.table[key])
        except (ValueError, TypeError) as error:
            raise self.error(key, str(error)) from None

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.error(
                unknown[0],
                "unknown key (check the spelling; see config/spaceguard.toml for every key)",
            )


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number ≥ 0, got {value!r}")
    return value


SLICE_RE = re.compile(r"[A-Za-z0-9:_.\\-]+\.slice")
SHARED_SLICES = frozenset({"-.slice", "system.slice", "user.slice", "machine.slice"})


def _slice_name(value: object) -> str:
    text = _string(value)
    if len(text) > 255 or SLICE_RE.fullmatch(text) is None or text.startswith("-"):
        raise ValueError(
            f"{text!r} is not a valid systemd slice name (letters, digits, ':_.\\-', "
            "ending in .slice)"
        )
    if text in SHARED_SLICES:
        raise ValueError(
            f"{text} holds other services too: freezing it would freeze them; give this "
            "volume's migrations a slice of their own (Slice= in their units)"
        )
    return text


def _abs_path(value: object) -> Path:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return Path(text)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 10**6:
        raise ValueError(f"expected a whole number between -1000000 and 1000000, got {value!r}")
    return value


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be above 0, got {value!r}")
    return seconds


def _at_least_a_second(value: object) -> float:
    # the first retry of a delivery waits a second: a cap below it cannot hold
    seconds = parse_duration(value)
    if seconds < 1.0:
        raise ValueError(f"must be at least 1s, got {value!r}")
    return seconds


# labels the guard sets on its own alerts: [alerts.labels] may not replace them
GUARD_ALERT_LABELS = frozenset(
    {"alertname", "severity", "account", "unit", "volume", "reason", "by", "class", "incident"}
)


def _alert_labels(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError('expected a table, like labels = { instance = "guard-a:9839" }')
    labels = []
    for name, label in value.items():
        if not is_label_name(name) or name.startswith("__"):
            raise ValueError(
                f"{name!r} is not a label name (letters, digits, '_', not starting with a "
                "digit or '__')"
            )
        if name in GUARD_ALERT_LABELS:
            raise ValueError(f"{name!r} is set by the guard on each alert; choose another name")
        if not isinstance(label, str) or not label or len(label) > 1024:
            raise ValueError(f"{name}: expected a non-empty string of at most 1024 characters")
        labels.append((name, label))
    return tuple(sorted(labels))


def _proxy_url(value: object) -> str:
    url = _string(value)
    if url and not re.fullmatch(r"https?://[^\s/]+/?", url):
        raise ValueError(f"expected an http:// proxy URL like http://proxy:3128, got {url!r}")
    return url


def _log_time(value: object) -> Literal["local", "utc"]:
    if value == "local":
        return "local"
    if value == "utc":
        return "utc"
    raise ValueError(
        f'must be "local" (rclone\'s default) or "utc" (--log-format UTC), got {value!r}'
    )


def _listen(value: object) -> str:
    text = _string(value)
    if text == "":
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'expected HOST:PORT (or "" to disable), got {text!r}')
    return text


def _command(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
        raise ValueError('expected a list of strings, e.g. ["rclone", "check", "a:", "/b"]')
    if value and not value[0].startswith("/") and "/" in value[0]:
        raise ValueError("the program must be a bare name or an absolute path")
    return tuple(value)


def _read_secret(section: _Section, key: str) -> str | None:
    path = section.get(key, _abs_path)
    if path is None:
        return None
    try:
        return str(path.read_text(encoding="utf-8").strip())
    except OSError as error:
        raise section.error(key, f"cannot read {path}: {error.strerror}") from None


def _read_guard(source: Path, raw: object) -> GuardConfig:
    section = _Section(source, "guard", raw)
    defaults = GuardConfig()
    guard = GuardConfig(
        state_dir=section.get("state_dir", _abs_path, defaults.state_dir),
        control_socket=section.get("control_socket", _abs_path, defaults.control_socket),
        metrics_listen=section.get("metrics_listen", _listen, defaults.metrics_listen),
        bus_address=section.get("bus_address", _string, defaults.bus_address),
        reader_group=section.get("reader_group", _string, defaults.reader_group),
        admin_group=section.get("admin_group", _string, defaults.admin_group),
        log_level=section.get("log_level", _string, defaults.log_level),
        log_recheck_interval=section.get(
            "log_recheck_interval", parse_duration, defaults.log_recheck_interval
        ),
        freezer_socket=section.get("freezer_socket", _abs_path, defaults.freezer_socket),
        acked_incidents_keep=section.get(
            "acked_incidents_keep", _count, defaults.acked_incidents_keep
        ),
        acked_incidents_max_age=section.get(
            "acked_incidents_max_age", parse_duration, defaults.acked_incidents_max_age
        ),
        resync_interval=section.get("resync_interval", parse_duration, defaults.resync_interval),
    )
    if guard.log_level not in ("debug", "info", "warning", "error"):
        raise section.error("log_level", "must be one of debug, info, warning, error")
    if 0 < guard.resync_interval < 1:
        raise section.error(
            "resync_interval", f"{guard.resync_interval:g}s is too often: 0 (off) or at least 1s"
        )
    section.finish()
    return guard


def _read_volume(source: Path, name: str, raw: object) -> VolumeConfig:
    section = _Section(source, f"volumes.{name}", raw)
    pause_below = section.get("pause_below", parse_threshold, Threshold(percent=5.0))
    resume_above = section.get("resume_above", parse_threshold, Threshold(percent=10.0))
    inode_threshold = lambda value: parse_threshold(value, sizes=False)  # noqa: E731
    pause_inodes = section.get("pause_below_inodes", inode_threshold, Threshold(percent=1.0))
    resume_inodes = section.get("resume_above_inodes", inode_threshold, None)
    if resume_inodes is None:
        resume_inodes = (
            Threshold(percent=min(100.0, pause_inodes.percent * 2))
            if pause_inodes.percent is not None
            else Threshold(amount=(pause_inodes.amount or 0) * 2, counts_inodes=True)
        )
    volume = VolumeConfig(
        name=name,
        path=section.get("path", _abs_path, required=True),
        pause_below=pause_below,
        resume_above=resume_above,
        pause_below_inodes=pause_inodes,
        resume_above_inodes=resume_inodes,
        resume_after=section.get("resume_after", parse_duration, 120.0),
        predict=section.get("predict", parse_duration, 600.0),
        require_mount=section.get("require_mount", _bool, True),
        max_write_speed=section.get("max_write_speed", parse_size, 2 * 1024**3),
        poll_min=section.get("poll_min", parse_duration, 0.001),
        poll_max=section.get("poll_max", parse_duration, 1.0),
        **_read_usage_keys(section),
        **_read_ladder_keys(section),
        slice=section.get("slice", _slice_name, ""),
    )
    _check_hysteresis(section, "resume_above", volume.pause_below, volume.resume_above)
    _check_hysteresis(
        section, "resume_above_inodes", volume.pause_below_inodes, volume.resume_above_inodes
    )
    if volume.max_write_speed <= 0:
        raise section.error("max_write_speed", "must be above 0")
    if not 0 < volume.poll_min <= volume.poll_max:
        raise section.error("poll_min", "must be above 0 and at most poll_max")
    section.finish()
    return volume


def _read_ladder_keys(section: _Section) -> dict[str, Any]:
    """The space-planning keys of a volume table."""
    keys: dict[str, Any] = {
        "warn_below": section.get("warn_below", parse_threshold, None),
        "warn_after": section.get("warn_after", parse_duration, 0.0),
        "admit_below": section.get("admit_below", parse_threshold, None),
        "max_freeze": section.get("max_freeze", parse_duration, 3600.0),
        "resume_batch": section.get("resume_batch", _count, 0),
        "resume_step": section.get("resume_step", _positive_duration, 10.0),
    }
    if keys["max_freeze"] <= 0:
        raise section.error(
            "max_freeze", "must be above 0 (a freeze that lasts for ever is a stop)"
        )
    return keys


def _read_usage_keys(section: _Section) -> dict[str, Any]:
    """The usage_* keys of a volume table, each checked against what a scan can do."""
    keys: dict[str, Any] = {
        "usage_interval": section.get("usage_interval", parse_duration, 3600.0),
        "usage_depth": section.get("usage_depth", _count, 1),
        "usage_top": section.get("usage_top", _count, 10),
        "usage_budget": section.get("usage_budget", parse_duration, 30.0),
        "usage_max_entries": section.get("usage_max_entries", _count, 5_000_000),
        "usage_old_after": section.get("usage_old_after", parse_duration, 30 * 86400.0),
    }
    if keys["usage_interval"] and keys["usage_interval"] < 60:
        raise section.error(
            "usage_interval",
            "must be 0 (no scheduled scans) or at least 1m (a scan reads the whole tree)",
        )
    if not 1 <= keys["usage_depth"] <= 8:
        raise section.error("usage_depth", "must be between 1 and 8")
    if not 1 <= keys["usage_top"] <= 100:
        raise section.error("usage_top", "must be between 1 and 100 (each is a metric series)")
    if not 1 <= keys["usage_budget"] <= 600:
        raise section.error("usage_budget", "must be between 1s and 10m")
    if keys["usage_max_entries"] < 1000:
        raise section.error("usage_max_entries", "must be at least 1000")
    if keys["usage_old_after"] < 86400:
        raise section.error("usage_old_after", "must be at least 1d")
    return keys


def _check_hysteresis(section: _Section, key: str, pause: Threshold, resume: Threshold) -> None:
    same_kind = (pause.percent is None) == (resume.percent is None)
    if not same_kind:
        raise section.error(
            key,
            "must use the same kind of value as its pause threshold "
            "(both percentages or both absolute)",
        )
    if pause.percent is not None and resume.percent is not None:
        if resume.percent <= pause.percent:
            raise section.error(
                key,
                f"{resume} must be above the pause threshold {pause} "
                "(hysteresis: otherwise the guard would flap)",
            )
    elif (resume.amount or 0) <= (pause.amount or 0):
        raise section.error(
            key,
            f"{resume} must be above the pause threshold {pause} "
            "(hysteresis: otherwise the guard would flap)",
        )


def _read_migration(
    source: Path, index: int, raw: object, volumes: Mapping[str, VolumeConfig]
) -> MigrationConfig:
    section = _Section(source, f"migrations[{index}]", raw)
    account = section.get("account", _string, required=True)
    if not is_account(account):
        raise section.error(
            "account",
            f"{account!r} is not a usable account name (letters, digits, '_.@-', at most 128)",
        )
    unit = section.get("unit", check_unit_name, required=True)
    volume = section.get("volume", _string, required=True)
    if volume not in volumes:
        known = ", ".join(sorted(volumes)) or "none"
        raise section.error("volume", f"names unknown volume {volume!r} (configured: {known})")
    pause = section.get("pause", _string, "freeze")
    if pause not in ("freeze", "stop"):
        raise section.error("pause", f'must be "freeze" or "stop", got {pause!r}')
    migration = MigrationConfig(
        account=account,
        unit=unit,
        volume=volume,
        log=section.get("log", _abs_path),
        pause=pause,
        resume_unit=section.get("resume_unit", check_unit_name, unit),
        destination=section.get("destination", _abs_path),
        stall_after=section.get("stall_after", parse_duration, 0.0),
        max_retries=section.get("max_retries", _count, 3),
        retry_backoff=section.get("retry_backoff", parse_duration, 60.0),
        retry_backoff_max=section.get("retry_backoff_max", parse_duration, 3600.0),
        verify_command=section.get("verify_command", _command, ()),
        verify_unit=section.get("verify_unit", check_unit_name, ""),
        verify_timeout=section.get("verify_timeout", parse_duration, 3600.0),
        max_item_errors=section.get("max_item_errors", _count, 500),
        item_error_window=section.get("item_error_window", parse_duration, 600.0),
        log_time=section.get("log_time", _log_time, "local"),
        expected_size=section.get("expected_size", parse_size, None),
        priority=section.get("priority", _integer, 0),
        admission=section.get("admission", _bool, True),
        max_freeze=section.get("max_freeze", _positive_duration, None),
        size_unit=section.get("size_unit", check_unit_name, ""),
        size_file=section.get("size_file", _abs_path, None),
        size_timeout=section.get("size_timeout", _positive_duration, 1800.0),
    )
    if migration.verify_command and migration.verify_unit:
        raise section.error("verify_unit", "give verify_command or verify_unit, not both")
    if migration.verify_unit in migration.units:
        raise section.error("verify_unit", "must not be the migration's own unit")
    _check_size_probe(section, migration)
    section.finish()
    return migration


def _check_size_probe(section: _Section, migration: MigrationConfig) -> None:
    if migration.size_unit and migration.size_file is None:
        raise section.error("size_file", "missing: size_unit writes its result there (required)")
    if migration.size_file is not None and not migration.size_unit:
        raise section.error("size_file", "needs size_unit (the unit that writes it)")
    if migration.size_unit and migration.expected_size is not None:
        raise section.error("size_unit", "give expected_size or size_unit, not both")
    if migration.size_unit in migration.units:
        raise section.error("size_unit", "must not be the migration's own unit")


def _read_rules(source: Path, raw: object) -> tuple[RuleConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: rules: expected an array of tables ([[rules]])")
    rules = []
    for index, item in enumerate(raw):
        section = _Section(source, f"rules[{index}]", item)
        name = section.get("name", _string, required=True)
        pattern = section.get("pattern", _string, required=True)
        failure_class = section.get("class", _string, required=True)
        scope = section.get("scope", _string, "")
        if scope not in ("", "item", "run"):
            raise section.error("scope", f'must be "item" or "run", got {scope!r}')
        if failure_class not in FAILURE_CLASSES:
            raise section.error("class", f"must be one of {', '.join(FAILURE_CLASSES)}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise section.error("pattern", f"not a valid regular expression: {error}") from None
        section.finish()
        rules.append(
            RuleConfig(name=name, pattern=pattern, failure_class=failure_class, scope=scope)
        )
    return tuple(rules)


def _read_alerts(source: Path, raw: object) -> AlertsConfig:
    section = _Section(source, "alerts", raw)
    raw_receivers = section.get("receivers", lambda value: value, [])
    if not isinstance(raw_receivers, list):
        raise section.error("receivers", "expected an array of tables ([[alerts.receivers]])")
    receivers: list[ReceiverConfig] = []
    for index, item in enumerate(raw_receivers):
        receiver = _Section(source, f"alerts.receivers[{index}]", item)
        name = receiver.get("name", _string, required=True)
        if not is_receiver_name(name):
            raise receiver.error(
                "name", "letters, digits, '_.-', at most 64, no leading '.' (it names a spool file)"
            )
        if any(existing.name == name for existing in receivers):
            raise receiver.error("name", f"receiver {name!r} is configured twice")
        kind = receiver.get("kind", _string, required=True)
        if kind not in ("alertmanager", "webhook"):
            raise receiver.error("kind", 'must be "alertmanager" or "webhook"')
        url = receiver.get("url", _string, required=True)
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise receiver.error("url", f"expected an http:// or https:// URL, got {url!r}")
        user = receiver.get("basic_auth_user", _string)
        password = _read_secret(receiver, "basic_auth_password_file")
        if (user is None) != (password is None):
            raise receiver.error(
                "basic_auth_user", "basic_auth_user and basic_auth_password_file go together"
            )
        receivers.append(
            ReceiverConfig(
                name=name,
                kind=kind,
                url=url.rstrip("/"),
                bearer_token=_read_secret(receiver, "bearer_token_file"),
                basic_auth=(user, password) if user is not None and password is not None else None,
                timeout=receiver.get("timeout", _positive_duration, 5.0),
                proxy=receiver.get("proxy", _proxy_url, ""),
            )
        )
        receiver.finish()
    alerts = AlertsConfig(
        receivers=tuple(receivers),
        resend_interval=section.get("resend_interval", _positive_duration, 60.0),
        max_backoff=section.get("max_backoff", _at_least_a_second, 300.0),
        generator_url=section.get("generator_url", _string, ""),
        labels=section.get("labels", _alert_labels, ()),
    )
    section.finish()
    return alerts


def parse(source: Path, document: Mapping[str, Any]) -> Config:
    """Build and validate a Config from an already-parsed TOML document."""
    top = _Section(source, "", document)
    guard = _read_guard(source, top.get("guard", lambda value: value, {}))
    raw_volumes = top.get("volumes", lambda value: value, {})
    if not isinstance(raw_volumes, dict) or not raw_volumes:
        raise ConfigError(f"{source}: volumes: at least one [volumes.NAME] table is required")
    volumes = {name: _read_volume(source, name, raw) for name, raw in raw_volumes.items()}
    raw_migrations = top.get("migrations", lambda value: value, [])
    if not isinstance(raw_migrations, list):
        raise ConfigError(f"{source}: migrations: expected an array of tables ([[migrations]])")
    migrations = tuple(
        _read_migration(source, index, raw, volumes) for index, raw in enumerate(raw_migrations)
    )
    _check_unique(source, migrations)
    _check_slices(source, volumes)
    rules = _read_rules(source, top.get("rules", lambda value: value, []))
    alerts = _read_alerts(source, top.get("alerts", lambda value: value, {}))
    top.finish()
    return Config(
        source=source,
        guard=guard,
        volumes=volumes,
        migrations=migrations,
        rules=rules,
        alerts=alerts,
    )


def _check_slices(source: Path, volumes: Mapping[str, VolumeConfig]) -> None:
    owners: dict[str, str] = {}
    for name, volume in volumes.items():
        if volume.slice and volume.slice in owners:
            raise ConfigError(
                f"{source}: volumes.{name}.slice: {volume.slice} is already the slice of "
                f"volumes.{owners[volume.slice]} (a slice freezes as a whole: one volume each)"
            )
        owners[volume.slice] = name


def _check_unique(source: Path, migrations: tuple[MigrationConfig, ...]) -> None:
    accounts: dict[str, int] = {}
    units: dict[str, int] = {}
    for index, migration in enumerate(migrations):
        if migration.account in accounts:
            raise ConfigError(
                f"{source}: migrations[{index}].account: {migration.account!r} "
                f"is already used by migrations[{accounts[migration.account]}]"
            )
        accounts[migration.account] = index
        for unit in migration.units:
            if unit in units and units[unit] != index:
                key = "unit" if unit == migration.unit else "resume_unit"
                raise ConfigError(
                    f"{source}: migrations[{index}].{key}: {unit!r} is already "
                    f"managed by migrations[{units[unit]}] (one unit, one migration)"
                )
            units[unit] = index
    for index, migration in enumerate(migrations):
        owner = units.get(migration.verify_unit)
        if owner is not None:
            raise ConfigError(
                f"{source}: migrations[{index}].verify_unit: "
                f"{migration.verify_unit!r} runs migrations[{owner}] "
                "(a verification must not start a migration)"
            )
        owner = units.get(migration.size_unit)
        if owner is not None:
            raise ConfigError(
                f"{source}: migrations[{index}].size_unit: "
                f"{migration.size_unit!r} runs migrations[{owner}] "
                "(a size probe must not start a migration)"
            )


MAX_CONFIG_BYTES = 1 << 20  # a real config is a few KiB; /dev/zero must not fill memory


def read_config_file(path: Path) -> bytes:
    """The file's bytes, refusing what is not a regular file (a FIFO would block the
    reader forever, /dev/zero never ends) and what is larger than MAX_CONFIG_BYTES."""
    try:
        data, _ = read_small_file(path, MAX_CONFIG_BYTES)
    except NotARegularFile as error:
        raise ConfigError(f"{path}: not a regular file ({error.kind}); nothing was read") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a spaceguard config"
        )
    return data


def load(path: Path) -> Config:
    """Read and validate the file; raise ConfigError with a message naming what is wrong."""
    data = read_config_file(path)
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse(path, document)
