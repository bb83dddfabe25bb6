"""Fixtures for integration tests: a real systemd sandbox and real ext4 loop volumes.

Compose them like this (volumes first: mount propagation into the sandbox is private,
so a volume must be mounted before ``sandbox.up()``)::

    def test_x(loop_volume, sandbox, venv_python, tmp_path):
        vol = loop_volume(64, options=["nodelalloc"])
        sandbox.up({"w.service": writer_service(vol.mountpoint, 8 << 20,
                                               tmp_path / "w.status", python=venv_python)})
        sandbox.systemctl("start", "w.service")

``sandbox`` is created but not booted, so a test chooses its units (or calls
``sandbox.up()`` with none and adds units later with ``add_unit`` + ``daemon_reload``).
Under CI=true a sandbox or volume that cannot be made fails the test; elsewhere it skips.
Teardown (sandbox down, then volumes unmounted) runs even when the test fails.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # `pytest` run as a script does not put the cwd on the path
    sys.path.insert(0, str(_ROOT))

from tests.sandbox import (  # noqa: E402
    LoopVolume,
    SandboxError,
    SystemdSandbox,
    UnitSource,
    cleanup_stale,
    missing_for_sandbox,
    missing_for_volumes,
    require,
)

_HERE = Path(__file__).resolve().parent

VolumeFactory = Callable[..., LoopVolume]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration with ``pytest.mark.integration``."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def _stale_cleaned() -> list[str]:
    """Once per session: remove sandboxes/volumes that crashed earlier runs left."""
    try:
        from tests.installed import remove_stale_rules

        return cleanup_stale() + remove_stale_rules()
    except (OSError, SandboxError) as exc:  # never a reason to fail the session
        return [f"cleanup failed: {exc}"]


class _TestSandbox(SystemdSandbox):
    """A sandbox whose boot failure fails the test under CI and skips it elsewhere."""

    def up(self, units: UnitSource | None = None, *, timeout: float = 20.0) -> SystemdSandbox:
        try:
            return super().up(units, timeout=timeout)
        except SandboxError as exc:
            error = str(exc)
        require(False, error)  # outside `except`: no chained traceback in the report
        raise AssertionError("unreachable: require() skips or fails")


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory per test that the shipped guard can see: under
    /var/lib/spaceguard-test, traversable (its PrivateTmp= and ProtectHome= hide /tmp and
    /root, and the spaceguard user must reach the test's config, logs and volumes)."""
    from tests.installed import BASE, cleanup_rigs

    BASE.mkdir(parents=True, exist_ok=True)
    BASE.chmod(0o755)
    # short: AF_UNIX paths (the sandbox bus, the control socket) hold 107 bytes
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[5:25]
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=BASE))
    path.chmod(0o755)
    yield path
    cleanup_rigs()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def venv_python() -> str:
    """The Python running the tests; units inside the sandbox run the project with it
    (the file system is shared with the host; only /run differs)."""
    return sys.executable


@pytest.fixture
def loop_volume(tmp_path: Path, _stale_cleaned: list[str]) -> Iterator[VolumeFactory]:
    """Factory: ``loop_volume(size_mib=64, *, name=None, options=(), inodes=None,
    reserved_percent=0) -> LoopVolume``, mounted under tmp_path; unmounted at teardown.

    Call it BEFORE ``sandbox.up()``: a volume mounted later is invisible inside.
    """
    volumes: list[LoopVolume] = []

    def make(
        size_mib: int = 64,
        *,
        name: str | None = None,
        options: Sequence[str] = (),
        inodes: int | None = None,
        reserved_percent: int = 0,
    ) -> LoopVolume:
        missing = missing_for_volumes()
        require(not missing, "cannot make loop volumes: " + "; ".join(missing))
        if SystemdSandbox.live():
            raise RuntimeError(
                "mount loop volumes before sandbox.up(): mount propagation into the "
                "sandbox is private, so a volume mounted now would be invisible inside"
            )
        vol = LoopVolume(
            tmp_path / (name or f"vol{len(volumes)}"),
            size_mib,
            options=options,
            inodes=inodes,
            reserved_percent=reserved_percent,
        )
        try:
            vol.mount()
        except SandboxError as exc:
            require(False, f"loop volume did not mount: {exc}")
        volumes.append(vol)
        return vol

    yield make
    errors: list[str] = []
    for vol in reversed(volumes):
        try:
            vol.umount()
        except SandboxError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("volume teardown: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def sandbox(
    tmp_path: Path, loop_volume: VolumeFactory, _stale_cleaned: list[str]
) -> Iterator[SystemdSandbox]:
    """A systemd sandbox in tmp_path/sandbox, NOT yet booted: call ``sandbox.up(units)``.

    Depends on ``loop_volume`` only so that teardown always takes the sandbox down
    before the volumes are unmounted.
    """
    missing = missing_for_sandbox()
    require(not missing, "cannot boot a systemd sandbox: " + "; ".join(missing))
    sb = _TestSandbox(tmp_path / "sandbox")
    yield sb
    sb.down()
