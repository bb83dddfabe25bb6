#!/usr/bin/env python3
"""The control protocol fuzz run: tests/unit/test_control_fuzz.py with 100,000 examples.

    python3 bench/control_fuzz.py [--examples 100000]

The examples are shared by the file's four hypothesis tests (arbitrary bytes, arbitrary
JSON, near-valid requests, valid requests), as in the normal suite, which runs 2,000.
Prints the examples run per test (hypothesis replays and shrinks add a few), the total
and the time; exits non-zero if any test fails. Generating the data takes most of it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--examples",
        type=int,
        default=100_000,
        help="examples in total, shared by the fuzz tests (default 100000)",
    )
    options = parser.parse_args()
    # read when the test module is imported: set it first
    os.environ["SPACEGUARD_FUZZ_EXAMPLES"] = str(options.examples)
    sys.path[:0] = [str(ROOT / "daemon"), str(ROOT)]
    # the refusals and backend errors the fuzzer provokes are logged; not wanted here
    logging.disable(logging.CRITICAL)
    from tests.unit import test_control_fuzz as fuzz

    tests = [
        fuzz.test_arbitrary_bytes,
        fuzz.test_arbitrary_json,
        fuzz.test_near_valid_requests,
        fuzz.test_valid_requests_reach_the_backend,
    ]
    failed = 0
    started = time.perf_counter()
    for test in tests:
        before = sum(fuzz.EXAMPLES_RUN.values())
        test_started = time.perf_counter()
        try:
            test()
            outcome = "ok"
        except Exception:
            failed += 1
            outcome = "FAILED"
            traceback.print_exc()
        run = sum(fuzz.EXAMPLES_RUN.values()) - before
        seconds = time.perf_counter() - test_started
        print(
            f"{test.__name__:40} {run:>8,} examples  {seconds:7.1f} s  "
            f"{1e6 * seconds / max(run, 1):6.0f} µs/example  {outcome}",
            flush=True,
        )
    total = sum(fuzz.EXAMPLES_RUN.values())
    seconds = time.perf_counter() - started
    print(
        f"{'total':40} {total:>8,} examples  {seconds:7.1f} s  "
        f"({total / seconds:,.0f} examples/s); {failed} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
