"""The DRMAA scheduler, tested against Grid Engine (see plugin.py)."""
from .plugin import DrmaaScheduler

__all__ = ["DrmaaScheduler"]
