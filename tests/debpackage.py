"""The project's Debian package, built by ``scripts/build-deb.sh``, for tests that check or
install what is shipped.

    package = build_package()          # reuses build/spaceguard_*.deb if the files are the same
    root = package.extract(tmp_path)   # the .deb's files under tmp_path/root

``build_package`` fails (``PackageError``) with the script's output when the build fails;
callers decide whether that is a skip or a failure (``tests.sandbox.require``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build-deb.sh"
# Debian's tools only (the script sets the same PATH itself)
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class PackageError(RuntimeError):
    """The package could not be built (or linted); the message has the script's output."""


def missing_for_build() -> list[str]:
    """What this host lacks to build the package (empty when the script can do it)."""
    missing = [
        f"no `{tool}`"
        for tool in ("bash", "dpkg-deb", "dpkg-query")
        if shutil.which(tool, path=DEBIAN_PATH) is None
    ]
    if os.geteuid() != 0 and shutil.which("dpkg-buildpackage", path=DEBIAN_PATH) is None:
        missing.append(
            "not root and no dpkg-buildpackage (the script installs the build "
            "dependencies with apt-get, which needs root)"
        )
    if os.geteuid() == 0 and shutil.which("apt-get", path=DEBIAN_PATH) is None:
        missing.append("no `apt-get`")
    return missing


@dataclass(frozen=True)
class BuiltPackage:
    deb: Path
    source: Path  # the staged tree it was built from (debian/ at its top)
    output: str  # what build-deb.sh printed

    def extract(self, where: Path) -> Path:
        """Unpack the .deb's files (not its maintainer scripts) under ``where``/root."""
        root = where / "root"
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(self.deb), str(root)], check=True, env=_env())
        return root

    def control(self, where: Path) -> Path:
        """Unpack the control files (control, conffiles, postinst, ...) under ``where``."""
        subprocess.run(["dpkg-deb", "-e", str(self.deb), str(where)], check=True, env=_env())
        return where

    def field(self, name: str) -> str:
        result = subprocess.run(
            ["dpkg-deb", "-f", str(self.deb), name],
            check=True,
            capture_output=True,
            text=True,
            env=_env(),
        )
        return result.stdout.strip()

    def contents(self) -> dict[str, str]:
        """Every path in the .deb (without the leading ".") -> its `dpkg-deb -c` line."""
        result = subprocess.run(
            ["dpkg-deb", "-c", str(self.deb)],
            check=True,
            capture_output=True,
            text=True,
            env=_env(),
        )
        paths = {}
        for line in result.stdout.splitlines():
            name = line.split(None, 5)[5].split(" -> ")[0]
            paths[name[1:].rstrip("/") or "/"] = line
        return paths


def _env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "VIRTUAL_ENV", "PYENV"))
    }
    env["PATH"] = DEBIAN_PATH
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def build_package(lint: bool = False, timeout: float = 600.0) -> BuiltPackage:
    """Run scripts/build-deb.sh (it reuses a .deb built from the same files)."""
    command = ["bash", str(BUILD_SCRIPT)] + ([] if lint else ["--no-lint"])
    try:
        result = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env()
        )
    except subprocess.TimeoutExpired as error:
        raise PackageError(f"{BUILD_SCRIPT.name} took over {timeout:g} s") from error
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise PackageError(f"{BUILD_SCRIPT.name} exited {result.returncode}:\n{output}")
    deb = Path(result.stdout.strip().splitlines()[-1])
    version = deb.name.split("_")[1]
    return BuiltPackage(
        deb=deb, source=ROOT / "build" / "deb" / f"spaceguard-{version}", output=output
    )
