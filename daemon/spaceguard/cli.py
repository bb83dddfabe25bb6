"""`spaceguard`: run the daemon, or check a configuration file (exit 0/1, like nginx -t)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from . import __version__, journal
from .config import ConfigError, load

DEFAULT_CONFIG = Path("/etc/spaceguard/spaceguard.toml")


def check_config(path: Path) -> int:
    try:
        config = load(path)
    except ConfigError as error:
        print(f"spaceguard: {error}", file=sys.stderr)
        print(f"spaceguard: configuration file {path} test failed", file=sys.stderr)
        return 1
    print(
        f"spaceguard: configuration file {path} syntax is ok "
        f"({len(config.volumes)} volumes, {len(config.migrations)} migrations)"
    )
    return 0


def polkit_rule(path: Path, user: str, any_unit: bool) -> int:
    from .polkitrule import RuleError, render

    try:
        print(render(load(path), user, any_unit), end="")
    except (ConfigError, RuleError) as error:
        print(f"spaceguard: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spaceguard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spaceguard {__version__}")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the daemon (the default)")
    run.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG)
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG)
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=DEFAULT_CONFIG,
        dest="top_config",
        help=argparse.SUPPRESS,
    )
    freezer = commands.add_parser(
        "freezer", help="the privileged freeze/thaw helper (spaceguard-freezer.service)"
    )
    freezer.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG)
    freezer.add_argument("--user", default="spaceguard", help="the only peer allowed")
    freezer.add_argument(
        "--socket", type=Path, default=Path("/run/spaceguard-freezer/freezer.sock")
    )
    rule = commands.add_parser("polkit-rule", help="print a polkit rule for the configured units")
    rule.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG)
    rule.add_argument("--user", default="spaceguard")
    rule.add_argument(
        "--any-unit", action="store_true", help="allow units the shipped rule does not"
    )
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "polkit-rule":
        return polkit_rule(args.file, args.user, args.any_unit)
    if args.command == "freezer":
        from .freezer import run_freezer

        journal.setup()
        return asyncio.run(run_freezer(args.config, args.user, args.socket))
    config_path = args.config if args.command == "run" else args.top_config
    journal.setup()
    from .daemon import run_guard  # the daemon's imports are only needed to run it

    try:
        return asyncio.run(run_guard(config_path))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
