"""spaceguard: protects rclone migrations into /space from a full disk and from failures."""

__version__ = "0.1.0"
