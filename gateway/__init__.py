"""JobProxy: an HTTP gateway in front of HPC batch schedulers."""
