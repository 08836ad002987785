"""The Slurm scheduler, through Slurm's own commands (see plugin.py)."""
from .plugin import SlurmScheduler

__all__ = ["SlurmScheduler"]
