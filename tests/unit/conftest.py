"""Shared set-up for the unit tests of the pure code (config, policy, volumes, state).

The package lives under ``daemon/``; when it is not installed (no ``pip install -e``),
put that directory on the import path so that ``import spaceguard`` works.
"""

from __future__ import annotations

import sys
from pathlib import Path

DAEMON_DIR = Path(__file__).resolve().parents[2] / "daemon"

try:
    import spaceguard  # noqa: F401
except ImportError:
    sys.path.insert(0, str(DAEMON_DIR))
