"""The local scheduler: tasks run on the gateway's own machine (see plugin.py)."""
from .plugin import LocalScheduler

__all__ = ["LocalScheduler"]
