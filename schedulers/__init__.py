"""Scheduler plugins: one module per batch system, all on the contract in `schedulers.base`."""
