"""Free-space watermarks, pure: a volume's pause and resume limits for its current size, and
how soon the current fill rate crosses the pause limit. The policy decides with them; the
metrics and `status` report them.
"""

from __future__ import annotations

from .config import VolumeConfig
from .model import VolumeState


def thresholds(volume: VolumeConfig, state: VolumeState) -> tuple[int, int, int, int]:
    """(pause bytes, resume bytes, pause files, resume files) for the volume's current size."""
    return (
        volume.pause_below.limit(state.size_bytes),
        volume.resume_above.limit(state.size_bytes),
        volume.pause_below_inodes.limit(state.files),
        volume.resume_above_inodes.limit(state.files),
    )


def seconds_to_pause(volume: VolumeConfig, state: VolumeState) -> float:
    """Predicted seconds until free bytes cross `pause_below` at the current fill rate."""
    pause_bytes = volume.pause_below.limit(state.size_bytes)
    if state.avail_bytes <= pause_bytes:
        return 0.0
    if state.fill_rate <= 0:
        return float("inf")
    return (state.avail_bytes - pause_bytes) / state.fill_rate
