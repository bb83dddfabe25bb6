#!/bin/bash
# Live demo on a fresh Debian 12 machine: set-up (scripts/setup.sh), then the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
