#!/bin/bash
# The whole test suite, on a fresh Debian 12 machine too: set-up (scripts/setup.sh),
# then ruff (lint and format), mypy (strict, from pyproject) and pytest over tests/ (unit, integration,
# e2e) with the venv's Python. Extra arguments go to pytest: scripts/test.sh -k freeze
# Exits non-zero if any step fails, and when pytest ran no test (its exit 5).
# CI=true (exported through) turns skips of integration tests into failures.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
bash scripts/setup.sh || { echo "test.sh: setup failed" >&2; exit 1; }
[[ -n ${CI:-} ]] && export CI
py=.venv/bin/python
failed=()

lint_dirs=()
for d in daemon tests bench scripts; do [[ -d $d ]] && lint_dirs+=("$d"); done
echo "== ruff check ${lint_dirs[*]}"
"$py" -m ruff check "${lint_dirs[@]}" || failed+=(ruff)

echo "== ruff format --check ${lint_dirs[*]}"
"$py" -m ruff format --check "${lint_dirs[@]}" || failed+=("ruff format")

echo "== mypy daemon"
"$py" -m mypy daemon || failed+=(mypy)

echo "== pytest"
# A hung test must not eat CI's whole budget: SIGINT makes pytest report what it has.
timeout --foreground -s INT -k 60 "${SPACEGUARD_TEST_TIMEOUT:-1800}" \
  "$py" -m pytest -p no:cacheprovider "$@"
rc=$?
case $rc in
  0) ;;
  5) echo "test.sh: pytest collected no test (exit 5)" >&2; failed+=("pytest: no tests") ;;
  124) failed+=("pytest: timed out") ;;
  *) failed+=("pytest: exit $rc") ;;
esac

if ((${#failed[@]})); then
  echo "test.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
