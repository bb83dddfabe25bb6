"""Fixtures for the end-to-end tests: the integration fixtures (a real systemd sandbox and
real ext4 loop volumes: ``loop_volume``, ``sandbox``, ``venv_python``) reused as they are,
so volumes are mounted before the sandbox boots and torn down after it.

The real Prometheus and Alertmanager are started by the test modules themselves; under
CI=true a missing binary fails those tests, elsewhere it skips them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
for _path in (_ROOT, _ROOT / "daemon"):  # `tests.*` and `spaceguard` without an install
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.integration.conftest import (  # noqa: E402, F401
    _stale_cleaned,
    loop_volume,
    sandbox,
    tmp_path,
    venv_python,
)

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e with ``pytest.mark.e2e``."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
