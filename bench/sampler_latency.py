#!/usr/bin/env python3
"""What sampling on a thread (volumes.VolumeSampler) adds to the detection of a threshold
crossing, against sampling on the loop (the sampler before the hung-mount fault).

    sudo .venv/bin/python bench/sampler_latency.py [--trials 20] [--old PATH/volumes.py]

Real parts: a 1 GiB ext4 loop volume mounted nodelalloc, an unthrottled writer process
filling it in 1 MiB writes. The writer notes (CLOCK_MONOTONIC, shared by processes) when
its own statvfs after a write first shows less than pause_below free; the sampler's
callback, on an asyncio loop in this process, notes when a sample first shows it.
Detection = the second minus the first (negative: the sampler saw it first). With --old
(a copy of the previous volumes.py, e.g. from `git show b0a8f1a~1:daemon/spaceguard/
volumes.py`), both samplers run in alternate trials. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "daemon"))

from spaceguard import volumes  # noqa: E402
from spaceguard.config import VolumeConfig  # noqa: E402
from spaceguard.model import VolumeSampled  # noqa: E402
from spaceguard.quantities import Threshold  # noqa: E402

from tests.sandbox import LoopVolume  # noqa: E402

MIB = 1024 * 1024
PAUSE_BELOW = 32 * MIB

WRITER = """
import os, sys, time
path, limit = sys.argv[1], int(sys.argv[2])
chunk = b"\\1" * (1 << 20)
crossed = None
with open(path, "wb", buffering=0) as handle:
    while True:
        try:
            handle.write(chunk)
        except OSError:
            break
        st = os.statvfs(os.path.dirname(path))
        if st.f_bavail * st.f_frsize < limit:
            crossed = time.monotonic()
            break
print(crossed)
"""


def config(path: Path) -> VolumeConfig:
    return VolumeConfig(
        name="space",
        path=path,
        pause_below=Threshold(amount=PAUSE_BELOW),
        resume_above=Threshold(amount=2 * PAUSE_BELOW),
        pause_below_inodes=Threshold(percent=0.1, counts_inodes=True),
        resume_above_inodes=Threshold(percent=0.2, counts_inodes=True),
        resume_after=1.0,
        predict=0.0,
    )


def load_old(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("spaceguard.volumes_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def trial(module: ModuleType, volume: LoopVolume) -> float | None:
    """One fill: detection latency in ms (None: the writer never crossed)."""
    target = volume.mountpoint / "fill.bin"
    seen: list[float] = []

    def emit(event: Any) -> None:
        if not seen and isinstance(event, VolumeSampled) and event.avail_bytes < PAUSE_BELOW:
            seen.append(time.monotonic())

    sampler = module.VolumeSampler(config(volume.mountpoint), emit, lambda: False)
    sampler.start()
    await asyncio.sleep(0.2)  # sampling at its idle pace
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        str(target),
        str(PAUSE_BELOW),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await writer.communicate()
    deadline = time.monotonic() + 2
    while not seen and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    sampler.stop()
    target.unlink()
    os.sync()
    await asyncio.sleep(0.3)
    crossed = out.decode().strip()
    if crossed == "None" or not seen:
        return None
    return (seen[0] - float(crossed)) * 1000


def summary(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return (
        f"{name}: median {statistics.median(values):.2f} ms, p90 {p90:.2f} ms, "
        f"worst {max(values):.2f} ms, best {min(values):.2f} ms ({len(values)} trials)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--old", type=Path, help="a copy of the on-loop volumes.py")
    args = parser.parse_args()
    samplers: dict[str, ModuleType] = {"thread (now)": volumes}
    if args.old:
        samplers["loop (before)"] = load_old(args.old)
    results: dict[str, list[float]] = {name: [] for name in samplers}
    with tempfile.TemporaryDirectory(prefix="sampler-bench-") as tmp:
        volume = LoopVolume(Path(tmp) / "vol", 1024, options=["nodelalloc"])
        with volume:
            for _ in range(args.trials):
                for name, module in samplers.items():
                    value = await trial(module, volume)
                    if value is not None:
                        results[name].append(value)
    print(
        f"threshold crossing (writer's own statvfs) -> first sample below it on the loop; "
        f"1 GiB ext4 nodelalloc, unthrottled 1 MiB writes, load {os.getloadavg()[0]:.1f}"
    )
    for name, values in results.items():
        print("  " + summary(name, values))


if __name__ == "__main__":
    asyncio.run(main())
