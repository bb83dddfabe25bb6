"""config.py: units of measure, validation, and errors that name file, key path and problem."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from spaceguard.config import (
    Config,
    ConfigError,
    load,
    parse,
)
from spaceguard.names import check_unit_name
from spaceguard.quantities import (
    Threshold,
    parse_duration,
    parse_size,
    parse_threshold,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO_ROOT / "config" / "spaceguard.toml"
GiB = 1024**3

GOOD = """\
[guard]
state_dir = "/var/lib/spaceguard"

[volumes.space]
path = "/space"
pause_below = "5%"
resume_above = "10%"

[[migrations]]
account = "alice"
unit = "m365-migrate@alice.service"
volume = "space"
resume_unit = "m365-migrate-resume@alice.service"

[[migrations]]
account = "bob"
unit = "m365-migrate@bob.service"
volume = "space"
pause = "stop"
"""


def write(tmp_path: Path, text: str, name: str = "spaceguard.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load(write(tmp_path, text))


def config_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message  # every error names the file first
    return message


# --- units of measure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1048576, 1048576),
        ("1048576", 1048576),
        ("50GiB", 50 * GiB),
        ("50 GiB", 50 * GiB),
        ("500MiB", 500 * 1024**2),
        ("1KiB", 1024),
        ("2TiB", 2 * 1024**4),
        ("1.5TB", 1_500_000_000_000),
        ("1.5 GB", 1_500_000_000),
        ("10k", 10_000),
        ("10b", 10),
        ("3gib", 3 * GiB),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        -1,
        True,
        1.5,
        None,
        [],
        "",
        "GiB",
        "-5GiB",
        "5 XB",
        "5%",
        "1e9",
        "five",
        "5 GiB extra",
        "9" * 400 + "GiB",  # overflows a float: still a clear error, not an OverflowError
    ],
)
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5%", Threshold(percent=5.0)),
        (" 2.5 % ", Threshold(percent=2.5)),
        ("0%", Threshold(percent=0.0)),
        ("100%", Threshold(percent=100.0)),
        ("50GiB", Threshold(amount=50 * GiB)),
        (4096, Threshold(amount=4096)),
    ],
)
def test_parse_threshold(text: object, expected: Threshold) -> None:
    assert parse_threshold(text) == expected


@pytest.mark.parametrize("text", ["101%", "-1%", "x%", "nan%", "%", "5 apples"])
def test_parse_threshold_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_threshold(text)


def test_inode_thresholds_are_counts_or_percentages() -> None:
    assert parse_threshold(1000, sizes=False) == Threshold(amount=1000, counts_inodes=True)
    assert str(parse_threshold(1000, sizes=False)) == "1000 inodes"
    assert parse_threshold("1%", sizes=False) == Threshold(percent=1.0)
    for bad in ("10k", "1GiB", -1, True, 1.5):
        with pytest.raises(ValueError):
            parse_threshold(bad, sizes=False)


def test_threshold_limit() -> None:
    assert Threshold(percent=5.0).limit(100 * GiB) == 5 * GiB
    assert Threshold(percent=10.0).limit(0) == 0
    assert Threshold(amount=123).limit(100 * GiB) == 123
    assert str(Threshold(percent=5.0)) == "5%"
    assert str(Threshold(amount=123)) == "123B"
    assert str(Threshold(amount=50 * GiB)) == "50GiB"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", 30.0),
        ("15m", 900.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("250ms", 0.25),
        ("1m500ms", 60.5),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("10", 10.0),
        (10, 10.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "s",
        "10x",
        "-5s",
        "5S",
        "1m30",
        "ten seconds",
        -1,
        -0.5,
        True,
        None,
        [],
        float("nan"),
        float("inf"),  # TOML has nan and inf: neither is a duration
        "9" * 400 + "s",
    ],
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "name",
    [
        "m365-migrate@alice.service",
        "plain.service",
        "a:b_c.d-e\\x2d.service",
        "m365-migrate@alice.smith@contoso.com.service".replace("@contoso", "-contoso"),
        "x" * 247 + ".service",  # 255 characters: systemd's limit
    ],
)
def test_valid_unit_names(name: str) -> None:
    assert check_unit_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "m365-migrate@alice",  # no .service
        "m365-migrate@alice.timer",
        "m365 migrate.service",  # space
        "m365$migrate.service",
        "m365/migrate.service",
        "m365-migrate@.service",  # a template without an instance
        "@alice.service",
        "a@b@c.service",
        ".service",
        "x" * 248 + ".service",  # 256 characters
        "",
        42,
    ],
)
def test_invalid_unit_names(name: object) -> None:
    with pytest.raises(ValueError):
        check_unit_name(name)


# --- whole files ---------------------------------------------------------------------------


def test_good_config(tmp_path: Path) -> None:
    config = load_text(tmp_path, GOOD)
    assert config.source == tmp_path / "spaceguard.toml"
    space = config.volumes["space"]
    assert space.path == Path("/space")
    assert space.pause_below == Threshold(percent=5.0)
    assert space.resume_above == Threshold(percent=10.0)
    # defaults
    assert space.pause_below_inodes == Threshold(percent=1.0)
    assert space.resume_above_inodes == Threshold(percent=2.0)  # twice pause_below_inodes
    assert space.resume_after == 120.0
    assert space.predict == 600.0
    alice, bob = config.migrations
    assert alice.units == ("m365-migrate@alice.service", "m365-migrate-resume@alice.service")
    assert alice.pause == "freeze"
    assert bob.pause == "stop"
    assert bob.resume_unit == bob.unit  # defaults to the unit itself
    assert bob.units == ("m365-migrate@bob.service",)
    assert config.migration("bob") is bob
    assert config.migration("carol") is None
    assert config.rules == ()
    assert config.alerts.receivers == ()


def test_alert_labels_say_which_guard_speaks(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, GOOD + '[alerts.labels]\ninstance = "guard-a:9839"\nsite = "paris"\n'
    )
    assert config.alerts.labels == (("instance", "guard-a:9839"), ("site", "paris"))
    assert load_text(tmp_path, GOOD).alerts.labels == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('account = "x"', "alerts.labels: 'account' is set by the guard on each alert"),
        ('severity = "x"', "alerts.labels: 'severity' is set by the guard on each alert"),
        ('__meta = "x"', "alerts.labels: '__meta' is not a label name"),
        ('"a-b" = "x"', "alerts.labels: 'a-b' is not a label name"),
        ('"1a" = "x"', "alerts.labels: '1a' is not a label name"),
        ('site = ""', "alerts.labels: site: expected a non-empty string"),
        ("site = 3", "alerts.labels: site: expected a non-empty string"),
    ],
)
def test_bad_alert_labels_are_named(tmp_path: Path, body: str, message: str) -> None:
    assert message in config_error(tmp_path, GOOD + f"[alerts.labels]\n{body}\n")


def test_alert_labels_must_be_a_table(tmp_path: Path) -> None:
    error = config_error(tmp_path, GOOD + '[alerts]\nlabels = "instance=a"\n')
    assert "alerts.labels: expected a table" in error


def test_absolute_thresholds_and_durations(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        GOOD.replace('pause_below = "5%"', 'pause_below = "50GiB"').replace(
            'resume_above = "10%"',
            "resume_above = 107374182400\n"
            'resume_after = "1h30m"\npredict = 0\n'
            'pause_below_inodes = 1000\npoll_min = "250ms"',
        ),
    )
    space = config.volumes["space"]
    assert space.pause_below == Threshold(amount=50 * GiB)
    assert space.resume_above == Threshold(amount=100 * GiB)
    assert space.resume_after == 5400.0
    assert space.predict == 0.0
    assert space.pause_below_inodes == Threshold(amount=1000, counts_inodes=True)
    assert space.resume_above_inodes == Threshold(amount=2000, counts_inodes=True)
    assert space.poll_min == 0.25


def test_shipped_config_loads(tmp_path: Path) -> None:
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    # Secrets are read at load time: point any *_file key at a temporary file.
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n", encoding="utf-8")
    text = re.sub(r'^(\s*\w+_file\s*=\s*)"[^"]*"', rf'\1"{secret}"', text, flags=re.MULTILINE)
    config = load_text(tmp_path, text)
    assert "space" in config.volumes
    assert config.volumes["space"].path == Path("/space")
    assert config.migrations and config.migrations[0].account == "alice"
    assert config.migrations[0].verify_command[0] == "rclone"
    assert config.rules and config.rules[0].failure_class == "unrecoverable"
    assert config.alerts.receivers[0].kind == "alertmanager"


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda t: "colour = 1\n" + t, "colour"),
        (lambda t: t.replace("[guard]\n", '[guard]\nstate_dri = "/x"\n'), "guard.state_dri"),
        (
            lambda t: t.replace('path = "/space"', 'path = "/space"\npause_bellow = "5%"'),
            "volumes.space.pause_bellow",
        ),
        (
            lambda t: t.replace('volume = "space"\npause', 'volume = "space"\nuint = "x"\npause'),
            "migrations[1].uint",
        ),
        (
            lambda t: t + '[[rules]]\nname = "r"\npattern = "x"\nclass = "transient"\nextra = 1\n',
            "rules[0].extra",
        ),
        (lambda t: t + '[alerts]\nresend = "1m"\n', "alerts.resend"),
        (
            lambda t: (
                t + '[[alerts.receivers]]\nname = "am"\nkind = "alertmanager"\n'
                'url = "http://am:9093"\nusername = "x"\n'
            ),
            "alerts.receivers[0].username",
        ),
    ],
)
def test_unknown_keys_are_named(tmp_path: Path, edit, where: str) -> None:
    message = config_error(tmp_path, edit(GOOD))
    assert f": {where}: unknown key" in message


@pytest.mark.parametrize(
    ("pause", "resume", "key"),
    [
        ('"10%"', '"10%"', "resume_above"),
        ('"10%"', '"5%"', "resume_above"),
        ('"50GiB"', '"50GiB"', "resume_above"),
        ('"50GiB"', '"10GiB"', "resume_above"),
    ],
)
def test_resume_must_be_above_pause(tmp_path: Path, pause: str, resume: str, key: str) -> None:
    text = GOOD.replace('pause_below = "5%"', f"pause_below = {pause}").replace(
        'resume_above = "10%"', f"resume_above = {resume}"
    )
    message = config_error(tmp_path, text)
    assert f"volumes.space.{key}:" in message
    assert "must be above the pause threshold" in message


@pytest.mark.parametrize(("pause", "resume"), [('"5%"', '"50GiB"'), ('"50GiB"', '"10%"')])
def test_thresholds_of_mixed_kinds(tmp_path: Path, pause: str, resume: str) -> None:
    text = GOOD.replace('pause_below = "5%"', f"pause_below = {pause}").replace(
        'resume_above = "10%"', f"resume_above = {resume}"
    )
    message = config_error(tmp_path, text)
    assert "volumes.space.resume_above:" in message
    assert "same kind" in message


def test_inode_hysteresis(tmp_path: Path) -> None:
    text = GOOD.replace(
        'path = "/space"', 'path = "/space"\npause_below_inodes = "2%"\nresume_above_inodes = "2%"'
    )
    message = config_error(tmp_path, text)
    assert "volumes.space.resume_above_inodes:" in message


def test_unknown_volume(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, GOOD.replace('volume = "space"\npause', 'volume = "data"\npause')
    )
    assert "migrations[1].volume:" in message
    assert "'data'" in message and "space" in message


@pytest.mark.parametrize(
    "unit",
    [
        "m365-migrate@bob",
        "m365 migrate@bob.service",
        "m365-migrate@.service",
        "x" * 300 + ".service",
    ],
)
def test_invalid_unit_in_file(tmp_path: Path, unit: str) -> None:
    message = config_error(tmp_path, GOOD.replace('"m365-migrate@bob.service"', f'"{unit}"'))
    assert "migrations[1].unit:" in message


def test_invalid_resume_unit_in_file(tmp_path: Path) -> None:
    message = config_error(
        tmp_path,
        GOOD.replace('"m365-migrate-resume@alice.service"', '"m365-migrate-resume@.service"'),
    )
    assert "migrations[0].resume_unit:" in message


def test_one_unit_one_migration(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, GOOD.replace('"m365-migrate@bob.service"', '"m365-migrate@alice.service"')
    )
    assert "migrations[1].unit:" in message
    assert "m365-migrate@alice.service" in message and "migrations[0]" in message


def test_one_unit_one_migration_via_resume_unit(tmp_path: Path) -> None:
    # bob's unit is alice's resume unit
    message = config_error(
        tmp_path, GOOD.replace('"m365-migrate@bob.service"', '"m365-migrate-resume@alice.service"')
    )
    assert "migrations[1].unit:" in message and "migrations[0]" in message
    # bob's resume unit is alice's unit: the error names the key that is wrong
    text = GOOD.replace(
        'pause = "stop"', 'pause = "stop"\nresume_unit = "m365-migrate@alice.service"'
    )
    message = config_error(tmp_path, text)
    assert "migrations[1].resume_unit:" in message
    assert "m365-migrate@alice.service" in message and "migrations[0]" in message


def test_duplicate_accounts(tmp_path: Path) -> None:
    message = config_error(tmp_path, GOOD.replace('account = "bob"', 'account = "alice"'))
    assert "migrations[1].account:" in message and "'alice'" in message


@pytest.mark.parametrize("account", ["", "-alice", "al ice", "a/b", "x" * 129])
def test_bad_account_names(tmp_path: Path, account: str) -> None:
    message = config_error(tmp_path, GOOD.replace('account = "bob"', f'account = "{account}"'))
    assert "migrations[1].account:" in message


def test_bad_regex_in_rules(tmp_path: Path) -> None:
    message = config_error(
        tmp_path,
        GOOD + '[[rules]]\nname = "r"\npattern = "token (expired"\nclass = "unrecoverable"\n',
    )
    assert "rules[0].pattern: not a valid regular expression" in message


def test_bad_rule_class(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, GOOD + '[[rules]]\nname = "r"\npattern = "x"\nclass = "fatal"\n'
    )
    assert "rules[0].class:" in message


def receiver(**keys: str) -> str:
    base = {"name": '"am"', "kind": '"alertmanager"', "url": '"http://127.0.0.1:9093"'}
    base.update(keys)
    lines = [f"{key} = {value}" for key, value in base.items() if value]
    return "[[alerts.receivers]]\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("block", "where"),
    [
        (receiver(kind='"slack"'), "alerts.receivers[0].kind"),
        (receiver(url='"ftp://x"'), "alerts.receivers[0].url"),
        (receiver(url='"127.0.0.1:9093"'), "alerts.receivers[0].url"),
        (receiver(name='"a b"'), "alerts.receivers[0].name"),
        (receiver(name=""), "alerts.receivers[0].name"),
        (receiver(kind=""), "alerts.receivers[0].kind"),
        (receiver(url=""), "alerts.receivers[0].url"),
        (receiver() + receiver(), "alerts.receivers[1].name"),
        (receiver(basic_auth_user='"spaceguard"'), "alerts.receivers[0].basic_auth_user"),
        (
            receiver(bearer_token_file='"/nonexistent/token"'),
            "alerts.receivers[0].bearer_token_file",
        ),
        (receiver(bearer_token_file='"relative/token"'), "alerts.receivers[0].bearer_token_file"),
        (receiver(timeout='"soon"'), "alerts.receivers[0].timeout"),
    ],
)
def test_bad_receivers(tmp_path: Path, block: str, where: str) -> None:
    message = config_error(tmp_path, GOOD + "[alerts]\n" + block)
    assert f": {where}: " in message


def test_receiver_secrets_are_read(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok\n", encoding="utf-8")
    password = tmp_path / "password"
    password.write_text("pw\n", encoding="utf-8")
    text = (
        GOOD
        + "[alerts]\n"
        + receiver(bearer_token_file=f'"{token}"')
        + receiver(
            name='"hook"',
            kind='"webhook"',
            url='"https://hooks.example.org/x/"',
            basic_auth_user='"u"',
            basic_auth_password_file=f'"{password}"',
        )
    )
    am, hook = load_text(tmp_path, text).alerts.receivers
    assert am.bearer_token == "tok"
    assert hook.basic_auth == ("u", "pw")
    assert hook.url == "https://hooks.example.org/x"


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda t: t.replace('path = "/space"\n', ""), "volumes.space.path: missing"),
        (lambda t: t.replace('account = "bob"\n', ""), "migrations[1].account: missing"),
        (
            lambda t: t.replace('unit = "m365-migrate@bob.service"\n', ""),
            "migrations[1].unit: missing",
        ),
        (lambda t: t.replace('volume = "space"\npause', "pause"), "migrations[1].volume: missing"),
        (lambda t: t + '[[rules]]\npattern = "x"\nclass = "transient"\n', "rules[0].name: missing"),
        (lambda t: t.split("[volumes.space]")[0], "volumes: at least one"),
    ],
)
def test_missing_required_keys(tmp_path: Path, edit, where: str) -> None:
    message = config_error(tmp_path, edit(GOOD))
    assert where in message


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda t: t.replace('pause = "stop"', 'pause = "kill"'), "migrations[1].pause:"),
        (lambda t: t.replace('pause = "stop"', 'log = "var/log/x.log"'), "migrations[1].log:"),
        (lambda t: t.replace('pause = "stop"', "max_retries = -1"), "migrations[1].max_retries:"),
        (lambda t: t.replace('pause = "stop"', "max_retries = true"), "migrations[1].max_retries:"),
        (
            lambda t: t.replace('pause = "stop"', 'verify_command = "rclone check"'),
            "migrations[1].verify_command:",
        ),
        (
            lambda t: t.replace('pause = "stop"', 'verify_command = ["bin/rclone", "check"]'),
            "migrations[1].verify_command:",
        ),
        (lambda t: t.replace('pause = "stop"', "stall_after = nan"), "migrations[1].stall_after:"),
        (
            lambda t: t.replace('pause = "stop"', "retry_backoff = inf"),
            "migrations[1].retry_backoff:",
        ),
        (lambda t: t.replace('path = "/space"', 'path = "space"'), "volumes.space.path:"),
        (
            lambda t: t.replace('path = "/space"', 'path = "/space"\nresume_after = nan'),
            "volumes.space.resume_after:",
        ),
        (
            lambda t: t.replace('path = "/space"', 'path = "/space"\nmax_write_speed = 0'),
            "volumes.space.max_write_speed:",
        ),
        (
            lambda t: t.replace('path = "/space"', 'path = "/space"\npoll_min = "2s"'),
            "volumes.space.poll_min:",
        ),
        (
            lambda t: t.replace('path = "/space"', 'path = "/space"\nrequire_mount = "yes"'),
            "volumes.space.require_mount:",
        ),
        (
            lambda t: t.replace('pause_below = "5%"', 'pause_below = "five"'),
            "volumes.space.pause_below:",
        ),
        (
            lambda t: t.replace('state_dir = "/var/lib/spaceguard"', 'log_level = "chatty"'),
            "guard.log_level:",
        ),
        (
            lambda t: t.replace('state_dir = "/var/lib/spaceguard"', 'metrics_listen = "9839"'),
            "guard.metrics_listen:",
        ),
        (
            lambda t: t.replace('[guard]\nstate_dir = "/var/lib/spaceguard"', "guard = 5"),
            "guard: expected a table",
        ),
        (
            lambda t: t.replace("[[migrations]]", "[migrations.x]", 1).split("[[migrations]]")[0],
            "migrations: expected an array",
        ),
    ],
)
def test_bad_values_are_named(tmp_path: Path, edit, where: str) -> None:
    assert where in config_error(tmp_path, edit(GOOD))


def test_invalid_toml(tmp_path: Path) -> None:
    message = config_error(tmp_path, GOOD + "[volumes.space\n")
    assert "not valid TOML" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spaceguard.toml"
    path.write_bytes(GOOD.encode() + b"# \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(path)


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load(missing)
    assert str(caught.value).startswith(f"{missing}: cannot read")
    # a directory is refused before anything is read (works as root too, unlike chmod 000)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    assert str(caught.value) == f"{tmp_path}: not a regular file (a directory); nothing was read"


def load_in_a_thread(path: Path) -> str:
    """load(path)'s error, from a thread: a load that blocks (the old read of a FIFO did,
    forever) fails this test after a generous deadline instead of hanging the run."""
    outcome: list[str] = []

    def run() -> None:
        try:
            load(path)
        except ConfigError as error:
            outcome.append(str(error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), f"load({path}) blocked"
    (message,) = outcome
    return message


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "spaceguard.toml"
    os.mkfifo(fifo)  # nobody writes to it: reading it would wait forever
    assert load_in_a_thread(fifo) == f"{fifo}: not a regular file (a FIFO); nothing was read"


def test_dev_zero_is_refused_without_reading_it() -> None:
    zero = Path("/dev/zero")  # reading it never ends and fills memory
    assert load_in_a_thread(zero) == f"{zero}: not a regular file (a device); nothing was read"


def test_a_huge_regular_file_is_refused_after_a_bounded_read(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    with big.open("wb") as handle:
        handle.truncate(64 << 30)  # 64 GiB, sparse: only the first MiB and a bit is read
    assert load_in_a_thread(big) == f"{big}: larger than 1024 KiB; not a spaceguard config"
    ok = write(tmp_path, GOOD + "\n#" + "x" * ((1 << 20) - len(GOOD) - 10) + "\n")
    assert ok.stat().st_size <= 1 << 20
    load(ok)  # just under the bound: fine


def test_parse_takes_a_document() -> None:
    config = parse(Path("/etc/x.toml"), {"volumes": {"v": {"path": "/v"}}})
    assert config.migrations == ()
    with pytest.raises(ConfigError, match=r"^/etc/x.toml: volumes\.v\.path: missing"):
        parse(Path("/etc/x.toml"), {"volumes": {"v": {}}})


# --- the check-config command ----------------------------------------------------------------


def run_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "daemon")}
    return subprocess.run(
        [sys.executable, "-m", "spaceguard", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_config_good(tmp_path: Path) -> None:
    result = run_check_config(write(tmp_path, GOOD))
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stdout
    assert result.stderr == ""


def test_check_config_bad(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('account = "bob"', 'account = "alice"'))
    result = run_check_config(path)
    assert result.returncode == 1
    assert f"{path}: migrations[1].account:" in result.stderr
    assert "test failed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_check_config_refuses_a_fifo_and_dev_zero(tmp_path: Path, kind: str) -> None:
    """`spaceguard check-config` (ExecStartPre=, and the control verb's backend) on what
    would block it or never end: a clear error at once, exit 1."""
    path = Path(kind)
    if kind == "fifo":
        path = tmp_path / "spaceguard.toml"
        os.mkfifo(path)
    result = run_check_config(path)
    assert result.returncode == 1
    assert f"{path}: not a regular file" in result.stderr and "Traceback" not in result.stderr


def test_check_config_shipped_copy(tmp_path: Path) -> None:
    copy = tmp_path / "spaceguard.toml"
    shutil.copy(SHIPPED_CONFIG, copy)
    result = run_check_config(copy)
    assert result.returncode == 0, result.stderr


def test_verify_unit_rules(tmp_path: Path) -> None:
    base = """
[volumes.space]
path = "/space"
[[migrations]]
account = "alice"
unit = "m365-migrate@alice.service"
volume = "space"
"""
    path = tmp_path / "c.toml"
    path.write_text(base + 'verify_unit = "m365-verify@alice.service"\n')
    assert load(path).migrations[0].verify_unit == "m365-verify@alice.service"
    path.write_text(
        base + 'verify_unit = "m365-verify@alice.service"\n'
        'verify_command = ["rclone", "lsd", "m365-alice:"]\n'
    )
    with pytest.raises(
        ConfigError,
        match=r"migrations\[0\]\.verify_unit: give verify_command "
        "or verify_unit, not both",
    ):
        load(path)
    path.write_text(base + 'verify_unit = "m365-migrate@alice.service"\n')
    with pytest.raises(ConfigError, match="must not be the migration's own unit"):
        load(path)
    path.write_text(
        base
        + 'verify_unit = "m365-migrate@bob.service"\n'
        + """
[[migrations]]
account = "bob"
unit = "m365-migrate@bob.service"
volume = "space"
"""
    )
    with pytest.raises(
        ConfigError,
        match=r"migrations\[0\]\.verify_unit: .* runs "
        r"migrations\[1\]",
    ):
        load(path)
    path.write_text(base + 'verify_unit = "not a unit"\n')
    with pytest.raises(ConfigError, match=r"migrations\[0\]\.verify_unit: 'not a unit' is not"):
        load(path)


def test_size_probe_keys(tmp_path: Path) -> None:
    base = """
[volumes.space]
path = "/space"
[[migrations]]
account = "alice"
unit = "m365-migrate@alice.service"
volume = "space"
"""
    probe = 'size_unit = "m365-size@alice.service"\nsize_file = "/var/lib/m/alice.json"\n'
    path = tmp_path / "c.toml"
    path.write_text(base + probe)
    migration = load(path).migrations[0]
    assert migration.size_unit == "m365-size@alice.service"
    assert migration.size_file == Path("/var/lib/m/alice.json")
    assert migration.size_timeout == 1800.0
    path.write_text(base + probe + 'size_timeout = "90s"\n')
    assert load(path).migrations[0].size_timeout == 90.0
    path.write_text(base)
    assert load(path).migrations[0].size_unit == ""
    bad = [
        ('size_unit = "m365-size@alice.service"\n', r"migrations\[0\]\.size_file: missing"),
        ('size_file = "/var/lib/m/alice.json"\n', r"migrations\[0\]\.size_file: needs size_unit"),
        (probe + 'size_timeout = "0s"\n', r"migrations\[0\]\.size_timeout: must be above 0"),
        (probe + 'expected_size = "1GiB"\n', r"size_unit: give expected_size or size_unit"),
        (
            'size_unit = "m365-size@alice.service"\nsize_file = "alice.json"\n',
            r"migrations\[0\]\.size_file: expected an absolute path",
        ),
        (
            'size_unit = "not a unit"\nsize_file = "/a.json"\n',
            r"migrations\[0\]\.size_unit: 'not a unit' is not",
        ),
        (
            'size_unit = "m365-migrate@alice.service"\nsize_file = "/a.json"\n',
            "size_unit: must not be the migration's own unit",
        ),
    ]
    for keys, message in bad:
        path.write_text(base + keys)
        with pytest.raises(ConfigError, match=message):
            load(path)
    path.write_text(
        base
        + 'size_unit = "m365-migrate@bob.service"\nsize_file = "/a.json"\n'
        + """
[[migrations]]
account = "bob"
unit = "m365-migrate@bob.service"
volume = "space"
"""
    )
    with pytest.raises(ConfigError, match=r"migrations\[0\]\.size_unit: .* runs migrations\[1\]"):
        load(path)
