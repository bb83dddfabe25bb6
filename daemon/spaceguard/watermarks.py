"""Free-space math, pure: a volume's pause and resume limits for its current size, how soon
the current fill rate crosses the pause limit, and what the migrations still have to write.
The policy decides with them; the metrics and `status` report them.
"""

from __future__ import annotations

from .config import Config, MigrationConfig, VolumeConfig
from .model import GuardState, MigrationState, VolumeState


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


def remaining_bytes(migration: MigrationConfig, state: MigrationState) -> int | None:
    """What the current run still has to write: rclone's totals once it has given them,
    else the configured expected_size, else what its size probe measured (less what it
    wrote); None when nobody says."""
    if state.total_bytes:
        return max(0, state.total_bytes - state.transferred_bytes)
    if migration.expected_size is not None:
        return max(0, migration.expected_size - state.transferred_bytes)
    if state.size_bytes is not None:
        return max(0, state.size_bytes - state.transferred_bytes)
    return None


def committed_bytes(config: Config, state: GuardState, volume: str, but: str = "") -> int:
    """What the admitted, running migrations of a volume (other than `but`) still write."""
    total = 0
    for migration in config.migrations:
        other = state.migrations.get(migration.account)
        if migration.volume != volume or migration.account == but or other is None:
            continue
        if other.hold is None and any(view.running for view in other.units.values()):
            total += remaining_bytes(migration, other) or 0
    return total
