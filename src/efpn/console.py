"""Timestamped progress lines, for output that is not a terminal (logs, CI, nohup),
where progress bars would be noise."""

from __future__ import annotations

import time

__all__ = ["stamped"]


def stamped(msg: str) -> str:
    """``msg`` behind the local time: ``[2026-12-05 01:00:00] msg``."""
    return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
