"""Shared set-up for the unit tests of the pure code (config, policy, volumes, state).

The package lives under ``daemon/``; when it is not installed (no ``pip install -e``),
put that directory on the import path so that ``import spaceguard`` works; the
repository root too, for ``tests.sandbox``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAEMON_DIR = REPO / "daemon"
if str(REPO) not in sys.path:  # for tests.sandbox.require: the one place that knows CI
    sys.path.insert(0, str(REPO))

try:
    import spaceguard  # noqa: F401
except ImportError:
    sys.path.insert(0, str(DAEMON_DIR))
